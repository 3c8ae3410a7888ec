#!/usr/bin/env bash
# End-to-end test on kind (machines with Docker; CPU only). `make e2e-kind` runs it. See docs/kind.md.
#
#   1. kind cluster from kind-config.yaml (1 control plane + 2 workers; the host's /tmp/tauon-kind/{data,runs}
#      mounted into both workers at /tauon/{data,runs})
#   2. build the trainer image (trainer_image/Dockerfile, VARIANT=cpu, MiniLM bundled: no hub download) and
#      the operator image (operator.Dockerfile); `kind load` both
#   3. helm install helm/tauon (local images, --allow-host-paths for the file:// demo storage)
#   4. a 2-node CPU FineTuneJob on examples/data/sentiment.jsonl -> Succeeded
#   5. an InferenceService with fineTuneJobRef -> Ready
#   6. port-forward the Service and send an Open Inference Protocol (V2) infer request
#   7. clean up (trap): port-forward stopped, cluster deleted (KEEP_CLUSTER=1 keeps it)
#
# Environment: KIND_CLUSTER_NAME (tauon-e2e), KIND_NODE_IMAGE (kind's default), KEEP_CLUSTER (0),
# E2E_TIMEOUT_SECONDS (1200), LOCAL_PORT (18080), KIND/KUBECTL/HELM/DOCKER (binaries on PATH).
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CLUSTER="${KIND_CLUSTER_NAME:-tauon-e2e}"
NAMESPACE="tauon-e2e"
SYSTEM_NAMESPACE="tauon-system"
RELEASE="tauon"
TAG="e2e"
OPERATOR_IMAGE="tauon/operator:${TAG}"
TRAINER_IMAGE="tauon/trainer:${TAG}"
HOST_DIR="/tmp/tauon-kind" # must match kind-config.yaml's extraMounts
TIMEOUT="${E2E_TIMEOUT_SECONDS:-1200}"
LOCAL_PORT="${LOCAL_PORT:-18080}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
KIND="${KIND:-kind}"
KUBECTL="${KUBECTL:-kubectl}"
HELM="${HELM:-helm}"
DOCKER="${DOCKER:-docker}"

PF_PID=""
CREATED=0

log() { printf '\n[e2e-kind] %s\n' "$*" >&2; }
die() {
  printf '[e2e-kind] FAILED: %s\n' "$*" >&2
  exit 1
}

need() {
  local missing=()
  for bin in "$@"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  if ((${#missing[@]})); then
    die "missing tools: ${missing[*]} (see docs/kind.md)"
  fi
}

k() { "$KUBECTL" --context "kind-${CLUSTER}" "$@"; }

diagnostics() {
  log "diagnostics"
  k get nodes -o wide || true
  k get ftj,tis,pods,deployments,services -n "$NAMESPACE" -o wide || true
  k describe ftj -n "$NAMESPACE" || true
  k describe tis -n "$NAMESPACE" || true
  k get events -n "$NAMESPACE" --sort-by=.lastTimestamp || true
  k logs -n "$NAMESPACE" -l app.kubernetes.io/name=tauon-trainer --tail=50 --prefix || true
  k logs -n "$NAMESPACE" -l app.kubernetes.io/name=tauon-model-server --tail=50 --prefix || true
  k logs -n "$SYSTEM_NAMESPACE" "deployment/${RELEASE}" --tail=100 || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$PF_PID" ]] && kill -0 "$PF_PID" 2>/dev/null; then
    kill "$PF_PID" 2>/dev/null || true
    wait "$PF_PID" 2>/dev/null || true
  fi
  if ((rc != 0)) && ((CREATED)); then
    diagnostics
  fi
  if ((CREATED)) && [[ "$KEEP_CLUSTER" != "1" ]]; then
    log "deleting kind cluster ${CLUSTER}"
    "$KIND" delete cluster --name "$CLUSTER" || true
  elif ((CREATED)); then
    log "KEEP_CLUSTER=1: cluster ${CLUSTER} kept (kind delete cluster --name ${CLUSTER})"
  fi
  if ((rc == 0)); then
    log "PASSED"
  else
    log "FAILED (exit ${rc})"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND until it succeeds, or fail after SECONDS.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      die "timed out after ${seconds}s waiting for ${what}"
    fi
    sleep 5
  done
}

ftj_phase() { k get ftj "$1" -n "$NAMESPACE" -o jsonpath='{.status.phase}' 2>/dev/null; }

job_finished() {
  local phase
  phase="$(ftj_phase sentiment)"
  printf '  FineTuneJob sentiment: %s %s\n' "${phase:-<none>}" \
    "$(k get ftj sentiment -n "$NAMESPACE" -o jsonpath='{.status.progress.percent}' 2>/dev/null)%" >&2
  case "$phase" in
    Succeeded) return 0 ;;
    Failed) die "FineTuneJob sentiment failed: $(k get ftj sentiment -n "$NAMESPACE" \
      -o jsonpath='{range .status.conditions[?(@.type=="Failed")]}{.reason}: {.message}{end}')" ;;
    *) return 1 ;;
  esac
}

server_ready() { curl -fsS "http://127.0.0.1:${LOCAL_PORT}/v2/health/ready" >/dev/null 2>&1; }

# --- 0. tools --------------------------------------------------------------------------------------
need "$KIND" "$KUBECTL" "$HELM" "$DOCKER" curl tar
"$DOCKER" info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info failed)"
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  die "kind cluster ${CLUSTER} already exists (kind delete cluster --name ${CLUSTER}, or set KIND_CLUSTER_NAME)"
fi

# --- 1. host directories and the cluster -----------------------------------------------------------
log "host directories ${HOST_DIR}/{data,runs}"
mkdir -p "${HOST_DIR}/data" "${HOST_DIR}/runs"
cp examples/data/sentiment.jsonl "${HOST_DIR}/data/sentiment.jsonl"
chmod 0755 "${HOST_DIR}/data" && chmod 0644 "${HOST_DIR}/data/sentiment.jsonl"
rm -rf "${HOST_DIR}/runs/sentiment"
# the trainer runs as uid 1000 and hostPath volumes get no fsGroup: make the output directory writable
mkdir -p "${HOST_DIR}/runs/sentiment"
chmod 1777 "${HOST_DIR}/runs"
chmod 0777 "${HOST_DIR}/runs/sentiment"

log "creating kind cluster ${CLUSTER}"
kind_args=(create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s)
if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
  kind_args+=(--image "$KIND_NODE_IMAGE")
fi
CREATED=1
"$KIND" "${kind_args[@]}"

# --- 2. images -------------------------------------------------------------------------------------
# Build contexts are streamed as tarballs of exactly what each Dockerfile copies (never .venv or runs/).
log "building ${TRAINER_IMAGE} (CPU, MiniLM bundled)"
tar --exclude=__pycache__ -cf - pyproject.toml README.md trainer_image |
  "$DOCKER" build -f trainer_image/Dockerfile --build-arg VARIANT=cpu --build-arg BUNDLE_MINILM=true \
    -t "$TRAINER_IMAGE" -
log "building ${OPERATOR_IMAGE}"
tar --exclude=__pycache__ -cf - pyproject.toml README.md operator operator.Dockerfile |
  "$DOCKER" build -f operator.Dockerfile -t "$OPERATOR_IMAGE" -
log "loading images into kind"
"$KIND" load docker-image --name "$CLUSTER" "$TRAINER_IMAGE" "$OPERATOR_IMAGE"

# --- 3. the chart ----------------------------------------------------------------------------------
log "helm install ${RELEASE}"
"$HELM" install "$RELEASE" helm/tauon \
  --kube-context "kind-${CLUSTER}" \
  --namespace "$SYSTEM_NAMESPACE" --create-namespace \
  --set image.repository=tauon/operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set operator.defaultImage="$TRAINER_IMAGE" \
  --set operator.allowHostPaths=true \
  --wait --timeout 5m
k create namespace "$NAMESPACE"

# --- 4. fine-tune ----------------------------------------------------------------------------------
log "FineTuneJob sentiment: 2 CPU nodes (gloo)"
k apply -n "$NAMESPACE" -f - <<'EOF'
apiVersion: tauon.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: sentiment
spec:
  model:
    source: hf://sentence-transformers/all-MiniLM-L6-v2
    task: sequence-classification
    numLabels: 2
  dataset:
    source: file:///tauon/data/sentiment.jsonl
    format: jsonl
    textField: text
    labelField: label
    validationSplit: 0.15
  hyperparameters:
    epochs: 1
    maxSteps: 20
    batchSizePerDevice: 16
    learningRate: 1.0e-4
    maxSeqLength: 64
  output:
    storage: file:///tauon/runs/sentiment
    checkpointEverySteps: 10
  numNodes: 2
  nprocPerNode: 1
  resources:
    requests: {cpu: 500m, memory: 1Gi}
    limits: {memory: 3Gi}
  runPolicy:
    backoffLimit: 2
    scheduleTimeoutSeconds: 300
    startupTimeoutSeconds: 600
EOF
wait_for "FineTuneJob sentiment to succeed" "$TIMEOUT" job_finished

# --- 5. serve --------------------------------------------------------------------------------------
log "InferenceService sentiment (fineTuneJobRef)"
k apply -n "$NAMESPACE" -f - <<'EOF'
apiVersion: tauon.dev/v1alpha1
kind: InferenceService
metadata:
  name: sentiment
spec:
  model:
    fineTuneJobRef: {name: sentiment}
    task: sequence-classification
  replicas: 1
  batching: {maxBatchSize: 16, maxLatencyMilliseconds: 10}
  resources:
    requests: {cpu: 250m, memory: 1Gi}
    limits: {memory: 2Gi}
EOF
k wait tis/sentiment -n "$NAMESPACE" --for=condition=Ready --timeout="${TIMEOUT}s"
k get tis sentiment -n "$NAMESPACE" -o wide

# --- 6. predict ------------------------------------------------------------------------------------
log "port-forward service/sentiment ${LOCAL_PORT}:80 and a V2 infer request"
k port-forward -n "$NAMESPACE" service/sentiment "${LOCAL_PORT}:80" >/dev/null 2>&1 &
PF_PID=$!
wait_for "the model server through the port-forward" 120 server_ready
response="$(curl -fsS -X POST "http://127.0.0.1:${LOCAL_PORT}/v2/models/sentiment/infer" \
  -H 'Content-Type: application/json' \
  -d '{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
        "data": ["What a wonderful, heartfelt film. Loved it.", "Terrible service, I want a refund."]}]}')"
printf '%s\n' "$response"
case "$response" in
  *'"outputs"'*) ;;
  *) die "the infer response has no outputs" ;;
esac
curl -fsS "http://127.0.0.1:${LOCAL_PORT}/metrics" | grep -q '^tauon_server_requests_total' ||
  die "the model server's /metrics has no tauon_server_requests_total"
k get ftj,tis -n "$NAMESPACE"
