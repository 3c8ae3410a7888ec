"""InferenceService -> children (Deployments, Service, HPA), per docs/api.md. Pure and deterministic.

Children of an InferenceService `<name>`:
- Deployment `<name>-predictor` serving the main model, and `<name>-canary` serving the canary's model when
  `spec.canary` is set (and its model is known). Both run the trainer image's model server
  (`python -m tauon_serve.serve`) on port `cfg.server_port` (8080), named `http`.
  With runtime vllm (see `resolve_runtime`) the container runs `vllm serve` instead (`vllm_args`: only
  what the spec sets, vLLM's defaults otherwise). Models the pod downloads (hf://, s3://) go to the model
  cache volume; each server drains on termination (a preStop hook, then its own drain; see
  PRESTOP_SECONDS).
- Service `<name>` (ClusterIP, port 80 -> `http`) selecting `tauon.dev/inference-service: <name>`, that is
  the pods of both Deployments: the canary's traffic share is its share of the ready replicas.
- HorizontalPodAutoscaler `<name>` (autoscaling/v2, CPU utilisation) targeting `<name>-predictor`, only
  with `spec.autoscaling`. The predictor Deployment then carries no `replicas` (the HPA owns them).

Replica split (see `split_replicas`): `spec.replicas` is the TOTAL over predictor and canary (so the scale
subresource, whose selector covers both, stays consistent). With autoscaling, the split is taken on
`autoscaling.minReplicas`: the canary gets a fixed `ceil(min × percent / 100)` replicas and the predictor's
HPA bounds are the user's bounds minus the canary's replicas (at least 1, since an HPA cannot go to 0).

Every child carries a controller ownerReference (`child_meta`) and the annotation `tauon.dev/spec-hash`
(sha256 of the child's canonical JSON without that annotation) so the planner can skip children that are
already up to date. Deployments also record the model they serve in `tauon.dev/model-source` (and
`tauon.dev/fine-tune-job` when it came from a FineTuneJob, plus `tauon.dev/fine-tune-sweep` when that job
is a FineTuneSweep's best trial), so a canary keeps its model when its job or sweep is deleted. These label and annotation keys are defined in tauon.api.names (LABEL_ISVC, ANN_SPEC_HASH, ...).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal

from tauon.api.finetunejob import FineTuneJob
from tauon.api.inferenceservice import InferenceService, ServedModelSpec
from tauon.api.names import (
    ANN_FINE_TUNE_JOB,
    ANN_FINE_TUNE_SWEEP,
    ANN_MODEL_SOURCE,
    ANN_MODEL_TASK,
    ANN_RUNTIME,
    ANN_SPEC_HASH,
    CAUSAL_LM,
    INFERENCESERVICE,
    LABEL_COMPONENT,
    LABEL_ISVC,
    TASKS,
    Manifest,
    Task,
)
from tauon.render.common import (
    InvalidSpec,
    Storage,
    apply_overrides,
    check_reserved_keys,
    child_meta,
    container_resources,
    container_security,
    env_list,
    gpu_count,
    merge_env,
    pod_security,
    s3_env,
)
from tauon.render.config import OperatorConfig

Component = Literal["predictor", "canary"]
Runtime = Literal["tauon", "vllm"]

CONTAINER = "server"
PORT_NAME = "http"
SERVICE_PORT = 80
TMP_DIR = "/tmp"
HF_HOME = "/tmp/hf"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SHM_DIR = "/dev/shm"
# the model cache volume: an s3:// model is downloaded there before the server starts, hf:// models by
# the server itself (HF_HOME below it); an emptyDir sized by spec.storage.modelCacheSize
MODEL_CACHE_DIR = "/var/cache/tauon/models"
CACHED_HF_HOME = f"{MODEL_CACHE_DIR}/hf"
VLLM_SHM_SIZE = "8Gi"  # NCCL between tensor-parallel workers

# Graceful drain. A terminating pod leaves the Service's endpoints while its preStop hook runs, so
# requests stop arriving before the server gets SIGTERM.
# - tauon: preStop sleeps PRESTOP_SECONDS, then on SIGTERM the server finishes in-flight requests for up
#   to 25 s (its --graceful-timeout-seconds default).
# - vLLM 0.11 cancels in-flight requests at SIGTERM (no drain of its own): its preStop also waits, up to
#   VLLM_DRAIN_SECONDS, until its /metrics report no running or waiting request.
# terminationGracePeriodSeconds covers the hook plus the drain, with a margin.
PRESTOP_SECONDS = 5
# tauon's server answers its probes on a second listener that the request cap (--limit-concurrency) and
# idle connections never reach; the Service does not expose it
HEALTH_PORT = 8081
HEALTH_PORT_NAME = "health"
TAUON_DRAIN_SECONDS = 25
VLLM_DRAIN_SECONDS = 60
GRACE_MARGIN_SECONDS = 5
TERMINATION_GRACE_SECONDS = PRESTOP_SECONDS + TAUON_DRAIN_SECONDS + GRACE_MARGIN_SECONDS
VLLM_TERMINATION_GRACE_SECONDS = PRESTOP_SECONDS + VLLM_DRAIN_SECONDS + GRACE_MARGIN_SECONDS
# vLLM's default --max-num-batched-tokens for its OpenAI server on GPUs under 70 GiB (and A100s); it
# refuses to start when --max-num-seqs is larger
VLLM_MIN_DEFAULT_BATCHED_TOKENS = 2048


def predictor_name(name: str) -> str:
    return f"{name}-predictor"


def canary_name(name: str) -> str:
    return f"{name}-canary"


def deployment_name(name: str, component: Component) -> str:
    return predictor_name(name) if component == "predictor" else canary_name(name)


def service_name(name: str) -> str:
    return name


def hpa_name(name: str) -> str:
    return name


def selector(name: str) -> str:
    """Label selector string of all server pods (predictor and canary), for the scale subresource."""
    return f"{LABEL_ISVC}={name}"


def url(isvc: InferenceService, cfg: OperatorConfig) -> str:
    meta = isvc.metadata
    return f"http://{service_name(meta.name)}.{meta.namespace}.svc.{cfg.cluster_domain}"


def openai_base_url(isvc: InferenceService, cfg: OperatorConfig) -> str:
    """Base URL for OpenAI clients (status.openai.baseURL); both runtimes serve /v1/... on the Service."""
    return url(isvc, cfg) + "/v1"


def served_model_name(isvc: InferenceService) -> str:
    """The model name requests must send (`model` in OpenAI requests, `{name}` in V1/V2 paths)."""
    return isvc.metadata.name


# -- runtime -------------------------------------------------------------------------------------------


def resolve_runtime(isvc: InferenceService, task: str | None, source: str | None = None) -> Runtime:
    """spec.runtime after resolving auto: vllm when the served `task` is causal-lm, the pods request
    nvidia.com/gpu and the model (`source`, when known) is not in s3:// (vLLM cannot read it; the tauon
    server downloads it), tauon otherwise (also when the task is unknown: the tauon server reads it from
    the model)."""
    chosen = isvc.spec.runtime
    if chosen != "auto":
        return chosen
    if source is not None and source.startswith("s3://"):
        return "tauon"
    return "vllm" if task == CAUSAL_LM and gpu_count(isvc.spec.resources) > 0 else "tauon"


def served_task(model_spec: ServedModelSpec, location: ModelLocation | None) -> Task | None:
    """The task served: spec's model.task, else the referenced FineTuneJob's or FineTuneSweep's (carried by
    the location)."""
    if model_spec.task is not None:
        return model_spec.task
    return location.task if location is not None else None


def startup_probe_timing(timeout_seconds: int) -> tuple[int, int]:
    """(periodSeconds, failureThreshold) whose product is exactly `timeout_seconds`, period <= 10 s."""
    period = next(p for p in (10, 5, 2, 1) if timeout_seconds % p == 0)
    return period, timeout_seconds // period


# -- replicas ------------------------------------------------------------------------------------------


def effective_percent(predictor: int, canary: int) -> int:
    total = predictor + canary
    return round(100 * canary / total) if total > 0 else 0


def split_replicas(total: int, percent: int) -> tuple[int, int, int]:
    """(predictor, canary, effective percent) for `total` replicas and a canary share of `percent`.

    canary = ceil(total × percent / 100) when percent > 0, predictor = total − canary; when total >= 2 and
    percent < 100 the predictor keeps at least one replica. The effective percent is the canary's share of
    the replicas (what traffic really sees through the Service); 0 when total is 0.
    """
    total = max(0, total)
    percent = min(100, max(0, percent))
    canary = math.ceil(total * percent / 100) if percent > 0 else 0
    if total >= 2 and percent < 100 and canary >= total:
        canary = total - 1
    predictor = total - canary
    return predictor, canary, effective_percent(predictor, canary)


@dataclass(frozen=True)
class ReplicaPlan:
    predictor: int | None  # None: omitted from the Deployment (the HPA owns it)
    canary: int  # 0 when there is no canary Deployment
    effective_percent: int  # from the planned replicas; with autoscaling, from minReplicas
    hpa_min: int | None = None
    hpa_max: int | None = None


def replica_plan(isvc: InferenceService, with_canary: bool) -> ReplicaPlan:
    """Replicas of each Deployment. `with_canary` is False while the canary's model is not known yet
    (the predictor then takes everything)."""
    spec = isvc.spec
    auto = spec.autoscaling
    total = auto.min_replicas if auto is not None else spec.replicas
    if with_canary and spec.canary is not None:
        predictor, canary, eff = split_replicas(total, spec.canary.traffic_percent)
    else:
        predictor, canary, eff = total, 0, 0
    if auto is None:
        return ReplicaPlan(predictor=predictor, canary=canary, effective_percent=eff)
    hpa_min = max(1, auto.min_replicas - canary)
    hpa_max = max(hpa_min, auto.max_replicas - canary)
    return ReplicaPlan(
        predictor=None,
        canary=canary,
        effective_percent=effective_percent(hpa_min, canary) if canary else 0,
        hpa_min=hpa_min,
        hpa_max=hpa_max,
    )


# -- models --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLocation:
    """A resolved model: its storage URI (pvc://, hf:// or file://), the FineTuneJob it came from and
    that job's spec.model.task (when it came from a job), and the FineTuneSweep whose best trial that job
    is (when it came from a sweep; the task is then the sweep template's)."""

    source: str
    fine_tune_job: str | None = None
    task: Task | None = None
    fine_tune_sweep: str | None = None


@dataclass(frozen=True)
class Models:
    predictor: ModelLocation
    canary: ModelLocation | None = None  # None: no canary Deployment (no canary, or its model is unknown)


def model_path(job: FineTuneJob | Manifest) -> str:
    """Where a (Succeeded) FineTuneJob's final model lives: `status.output.model` when the job recorded it,
    else `spec.output.storage` + "/model" (the trainer's layout). Takes the typed job or its raw body."""
    body: Manifest = job.dump() if isinstance(job, FineTuneJob) else job
    recorded = ((body.get("status") or {}).get("output") or {}).get("model")
    if isinstance(recorded, str) and recorded:
        return recorded
    storage = ((body.get("spec") or {}).get("output") or {}).get("storage")
    if not isinstance(storage, str) or not storage:
        name = (body.get("metadata") or {}).get("name", "?")
        raise InvalidSpec(f"FineTuneJob {name} has no spec.output.storage")
    return storage.rstrip("/") + "/model"


def _task_or_none(value: object) -> Task | None:
    return next((t for t in TASKS if t == value), None)


def job_model_location(body: Manifest) -> ModelLocation:
    """The model of a Succeeded FineTuneJob (raw body): `model_path`, the job's name and spec.model.task."""
    name = str((body.get("metadata") or {}).get("name", ""))
    task = ((body.get("spec") or {}).get("model") or {}).get("task")
    return ModelLocation(model_path(body), name or None, _task_or_none(task))


def location_from_annotations(annotations: dict[str, str]) -> ModelLocation | None:
    """The model a Deployment was rendered for (its tauon.dev/model-* annotations), None when unknown."""
    src = annotations.get(ANN_MODEL_SOURCE)
    if not src:
        return None
    return ModelLocation(
        src,
        annotations.get(ANN_FINE_TUNE_JOB),
        _task_or_none(annotations.get(ANN_MODEL_TASK)),
        annotations.get(ANN_FINE_TUNE_SWEEP),
    )


# -- children ------------------------------------------------------------------------------------------


def base_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tauon-model-server",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/part-of": "tauon",
        LABEL_ISVC: name,
    }


def component_labels(name: str, component: Component) -> dict[str, str]:
    return {**base_labels(name), "app.kubernetes.io/component": component, LABEL_COMPONENT: component}


def selector_labels(name: str, component: Component) -> dict[str, str]:
    return {LABEL_ISVC: name, LABEL_COMPONENT: component}


def spec_hash(manifest: Manifest) -> str:
    """sha256 of the manifest's canonical JSON, ignoring its own spec-hash annotation."""
    m = copy.deepcopy(manifest)
    anns = m.get("metadata", {}).get("annotations")
    if anns is not None:
        anns.pop(ANN_SPEC_HASH, None)
        if not anns:
            del m["metadata"]["annotations"]
    raw = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def with_hash(manifest: Manifest) -> Manifest:
    manifest["metadata"].setdefault("annotations", {})[ANN_SPEC_HASH] = spec_hash(manifest)
    return manifest


def _model_storage(model: ModelLocation, where: str, cfg: OperatorConfig) -> tuple[Storage, str]:
    s = Storage()
    path = s.add(model.source, where, cfg)
    s.finish()
    for m in s.mounts:  # the server only reads its model
        m["readOnly"] = True
    return s, path


def _dedupe_env(env: list[Manifest]) -> list[Manifest]:
    """Last definition of a name wins (as in a pod); server-side apply rejects duplicate names."""
    last = {e["name"]: i for i, e in enumerate(env)}
    return [e for i, e in enumerate(env) if last[e["name"]] == i]


THREADS_ENV = "OMP_NUM_THREADS"


def server_env(isvc: InferenceService, model_spec: ServedModelSpec, hf_home: str = HF_HOME) -> list[Manifest]:
    """The server's environment. ``OMP_NUM_THREADS`` (torch's intra-op threads) is the container's CPU
    limit, rounded up (Kubernetes' ``resourceFieldRef`` with divisor 1), or the node's allocatable CPUs
    without a limit: a server limited to 1 CPU on a 64-core node would otherwise run 64 threads under a
    1-CPU quota and be throttled. ``HF_HOME`` is `hf_home` (in the model cache for hf:// models). The
    user's own ``OMP_NUM_THREADS`` (or ``HF_*``) wins."""
    ours: list[Manifest] = [
        {"name": "HF_HOME", "value": hf_home},
        {"name": "XDG_CACHE_HOME", "value": f"{TMP_DIR}/cache"},
        {
            "name": THREADS_ENV,
            "valueFrom": {
                "resourceFieldRef": {"containerName": CONTAINER, "resource": "limits.cpu", "divisor": "1"}
            },
        },
    ]
    ref = model_spec.token_secret_ref
    if ref is not None:
        ours.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    ours += s3_env(isvc.spec.storage)
    return _dedupe_env(
        merge_env(ours, env_list(list(isvc.spec.env)), overridable_prefix=("HF_", THREADS_ENV))
    )


def _probe(path: str, port: str, period: int, timeout: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "successThreshold": 1,
        "failureThreshold": failures,
    }


def _probes(isvc: InferenceService, live: str, ready: str, port: str = PORT_NAME) -> Manifest:
    """startupProbe with a budget of exactly spec.startupTimeoutSeconds (large models load for minutes),
    then liveness and readiness."""
    period, failures = startup_probe_timing(isvc.spec.startup_timeout_seconds)
    return {
        "startupProbe": _probe(live, port, period=period, timeout=3, failures=failures),
        "readinessProbe": _probe(ready, port, period=5, timeout=3, failures=3),
        "livenessProbe": _probe(live, port, period=10, timeout=5, failures=3),
    }


def _tauon_container(
    isvc: InferenceService,
    model_spec: ServedModelSpec,
    path: str,
    task: Task | None,
    cfg: OperatorConfig,
    hf_home: str,
) -> Manifest:
    spec = isvc.spec
    gen = spec.generation
    args = [
        "--model",
        path,
        "--name",
        served_model_name(isvc),
        "--port",
        str(cfg.server_port),
        "--max-batch-size",
        str(spec.batching.max_batch_size),
        "--max-latency-ms",
        str(spec.batching.max_latency_milliseconds),
        "--max-concurrent-sequences",
        str(gen.max_concurrent_sequences),
        # probes on their own listener: idle or slow clients holding the request cap never fail them
        "--health-port",
        str(HEALTH_PORT),
    ]
    # unset: the server's own (the model's max_position_embeddings; its --max-new-tokens default)
    if gen.max_model_length is not None:
        args += ["--max-model-length", str(gen.max_model_length)]
    if gen.max_new_tokens is not None:
        args += ["--max-new-tokens", str(gen.max_new_tokens)]
    if task is not None:
        args += ["--task", task]
    # The socket listens at once and the model loads in the background: liveness answers early,
    # readiness only once the model is loaded. The startup probe covers a slow first start.
    return {
        "image": spec.image or cfg.default_image,
        "command": ["python", "-m", "tauon_serve.serve"],
        "args": args,
        "env": server_env(isvc, model_spec, hf_home),
        **_probes(isvc, "/v2/health/live", "/v2/health/ready", HEALTH_PORT_NAME),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
    }


def vllm_model_arg(path: str) -> str:
    """What `vllm serve` takes for a model: a local directory, or a Hugging Face id `org/name` (read
    from HF_HOME, downloaded there first) for hf://org/name."""
    return path.removeprefix("hf://")


def vllm_drain_command(port: int) -> list[str]:
    """The vLLM container's preStop: wait PRESTOP_SECONDS, then until its /metrics report no running or
    waiting request (at most VLLM_DRAIN_SECONDS; at once when /metrics does not answer)."""
    script = (
        "import time, urllib.request as u\n"
        f"time.sleep({PRESTOP_SECONDS})\n"
        f"end = time.monotonic() + {VLLM_DRAIN_SECONDS}\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        text = u.urlopen('http://127.0.0.1:{port}/metrics', timeout=2).read().decode()\n"
        "    except Exception:\n"
        "        break\n"
        "    busy = sum(float(line.rsplit(' ', 1)[1]) for line in text.splitlines()\n"
        "               if line.startswith(('vllm:num_requests_running{', 'vllm:num_requests_waiting{')))\n"
        "    if busy == 0:\n"
        "        break\n"
        "    time.sleep(1)\n"
    )
    return ["python3", "-c", script]


def vllm_args(isvc: InferenceService, path: str, cfg: OperatorConfig) -> list[str]:
    """`vllm serve` arguments from what the spec says; vLLM's own defaults (the model's context length,
    its generation config) for what it leaves unset. tests/contract runs them through vLLM's parser."""
    spec = isvc.spec
    gen = spec.generation
    args = [
        "serve",
        vllm_model_arg(path),
        "--served-model-name",
        served_model_name(isvc),
        "--host",
        "0.0.0.0",
        "--port",
        str(cfg.server_port),
        "--tensor-parallel-size",
        str(max(1, gpu_count(spec.resources))),
        "--max-num-seqs",
        str(gen.max_concurrent_sequences),
    ]
    if gen.max_concurrent_sequences > VLLM_MIN_DEFAULT_BATCHED_TOKENS:
        # vLLM refuses max_num_seqs above max_num_batched_tokens, whose default depends on the GPU
        args += ["--max-num-batched-tokens", str(gen.max_concurrent_sequences)]
    if gen.max_model_length is not None:
        args += ["--max-model-len", str(gen.max_model_length)]
    if gen.max_new_tokens is not None:
        # merged over the model's generation_config: vLLM caps every request's max_tokens at it
        cap = json.dumps({"max_new_tokens": gen.max_new_tokens}, separators=(",", ":"))
        args += ["--override-generation-config", cap]
    return args


def _vllm_container(
    isvc: InferenceService, model_spec: ServedModelSpec, path: str, cfg: OperatorConfig, hf_home: str
) -> Manifest:
    spec = isvc.spec
    env = server_env(isvc, model_spec, hf_home)
    # vLLM caches compiled kernels under $HOME; the root filesystem is read-only
    env = _dedupe_env([{"name": "HOME", "value": TMP_DIR}, *env])
    # vLLM answers /health only once the engine is up: the startup probe holds the load budget
    return {
        "image": spec.image or cfg.vllm_image,
        "command": ["vllm"],
        "args": vllm_args(isvc, path, cfg),
        "env": env,
        **_probes(isvc, "/health", "/health"),
        "lifecycle": {"preStop": {"exec": {"command": vllm_drain_command(cfg.server_port)}}},
    }


def _component_model(isvc: InferenceService, component: Component) -> tuple[ServedModelSpec, str]:
    """The component's model spec and where it is in the spec (for messages)."""
    if component == "canary":
        if isvc.spec.canary is None:
            raise ValueError("render_deployment(canary) without spec.canary")
        return isvc.spec.canary.model, "spec.canary.model"
    return isvc.spec.model, "spec.model"


def _server_pod_spec(
    isvc: InferenceService,
    model_spec: ServedModelSpec,
    storage: Storage,
    path: str,
    task: Task | None,
    runtime: Runtime,
    gpus: int,
    cfg: OperatorConfig,
) -> Manifest:
    """The server pod: one container (tauon's server or vllm), its scratch volumes and the model's. A
    model downloaded by the pod (s3://, hf://) goes to the model cache volume."""
    spec = isvc.spec
    cached = path.startswith(("s3://", "hf://"))
    hf_home = CACHED_HF_HOME if cached else HF_HOME
    runtime_part = (
        _vllm_container(isvc, model_spec, path, cfg, hf_home)
        if runtime == "vllm"
        else _tauon_container(isvc, model_spec, path, task, cfg, hf_home)
    )
    volume_mounts: list[Manifest] = [{"name": "tmp", "mountPath": TMP_DIR}]
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    if runtime == "vllm":
        volume_mounts.append({"name": "dshm", "mountPath": SHM_DIR})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": VLLM_SHM_SIZE}})
    if cached:
        volume_mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR})
        size = spec.storage.model_cache_size if spec.storage is not None else None
        volumes.append({"name": "model-cache", "emptyDir": {"sizeLimit": size} if size else {}})
    if path.startswith("s3://"):
        runtime_part["env"] = [
            *runtime_part["env"],
            {"name": "TAUON_MODEL_CACHE_DIR", "value": MODEL_CACHE_DIR},
        ]
    container: Manifest = {
        "name": CONTAINER,
        "image": runtime_part.pop("image"),
        "imagePullPolicy": "IfNotPresent",
        **runtime_part,
        "ports": [
            {"name": PORT_NAME, "containerPort": cfg.server_port, "protocol": "TCP"},
            *(
                [{"name": HEALTH_PORT_NAME, "containerPort": HEALTH_PORT, "protocol": "TCP"}]
                if runtime == "tauon"
                else []
            ),
        ],
        "resources": container_resources(spec.resources),
        "securityContext": {**container_security(), "readOnlyRootFilesystem": True},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [*volume_mounts, *storage.mounts],
    }
    pod_spec: Manifest = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": (
            VLLM_TERMINATION_GRACE_SECONDS if runtime == "vllm" else TERMINATION_GRACE_SECONDS
        ),
        "securityContext": pod_security(cfg),
        "containers": [container],
        "volumes": [*volumes, *storage.volumes],
    }
    apply_overrides(pod_spec, spec.pod_template, [GPU_TOLERATION] if gpus > 0 else [])
    return pod_spec


def _requests_gpus(isvc: InferenceService) -> bool:
    """Whether the pods ask for an NVIDIA device (nvidia.com/gpu, or a MIG slice nvidia.com/mig-*)."""
    res = isvc.spec.resources
    return any(
        k.startswith("nvidia.com/") and str(v) != "0" for k, v in {**res.limits, **res.requests}.items()
    )


def _model_annotations(model: ModelLocation, task: Task | None, runtime: Runtime) -> dict[str, str]:
    """What a Deployment serves (read back by `location_from_annotations`) and with which runtime."""
    annotations = {ANN_MODEL_SOURCE: model.source, ANN_RUNTIME: runtime}
    if model.fine_tune_job is not None:
        annotations[ANN_FINE_TUNE_JOB] = model.fine_tune_job
    if model.fine_tune_sweep is not None:
        annotations[ANN_FINE_TUNE_SWEEP] = model.fine_tune_sweep
    if task is not None:
        annotations[ANN_MODEL_TASK] = task
    return annotations


def _model_field(model_spec: ServedModelSpec) -> str:
    """The field of a model spec that says where the model is (for messages)."""
    if model_spec.source is not None:
        return "source"
    return "fineTuneSweepRef" if model_spec.fine_tune_sweep_ref is not None else "fineTuneJobRef"


def render_deployment(
    isvc: InferenceService,
    component: Component,
    model: ModelLocation,
    replicas: int | None,
    cfg: OperatorConfig,
) -> Manifest:
    """One server Deployment. `replicas` None leaves the field out (the HPA owns it)."""
    spec = isvc.spec
    name = isvc.metadata.name
    model_spec, where = _component_model(isvc, component)
    field = f"{where}.{_model_field(model_spec)}"
    check_reserved_keys(spec.pod_template, "spec.podTemplate")
    storage, path = _model_storage(model, field, cfg)
    gpus = gpu_count(spec.resources)
    task = served_task(model_spec, model)
    runtime = resolve_runtime(isvc, task, model.source)
    if runtime == "vllm" and task not in (None, CAUSAL_LM):
        raise InvalidSpec(f"spec.runtime: vllm serves causal-lm models only ({where} is {task})")
    if runtime == "vllm" and path.startswith("s3://"):
        raise InvalidSpec(
            f"{field}: s3:// models are served by the tauon runtime only for now (set spec.runtime: tauon, "
            "or copy the model to a pvc:// volume for vllm)"
        )
    if runtime == "vllm" and spec.image is None and not _requests_gpus(isvc):
        raise InvalidSpec(
            "spec.resources: runtime vllm runs the operator's CUDA vLLM image, which does not start "
            "without a GPU: request nvidia.com/gpu (or set spec.image to a vLLM build for your hardware)"
        )
    pod_spec = _server_pod_spec(isvc, model_spec, storage, path, task, runtime, gpus, cfg)

    labels = component_labels(name, component)
    pod_meta: Manifest = {"labels": {**spec.pod_template.labels, **labels}}
    if spec.pod_template.annotations:
        pod_meta["annotations"] = dict(spec.pod_template.annotations)
    meta = child_meta(INFERENCESERVICE, isvc.metadata, deployment_name(name, component), labels)
    meta["annotations"] = _model_annotations(model, task, runtime)
    dep_spec: Manifest = {}
    if replicas is not None:
        dep_spec["replicas"] = replicas
    dep_spec.update(
        {
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(name, component)},
            # the old version keeps serving until the new one is ready
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": pod_meta, "spec": pod_spec},
        }
    )
    return with_hash({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": dep_spec})


def render_service(isvc: InferenceService) -> Manifest:
    name = isvc.metadata.name
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": child_meta(INFERENCESERVICE, isvc.metadata, service_name(name), base_labels(name)),
            "spec": {
                "type": "ClusterIP",
                "selector": {LABEL_ISVC: name},
                "ports": [
                    {"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}
                ],
            },
        }
    )


def render_hpa(isvc: InferenceService, plan: ReplicaPlan) -> Manifest | None:
    auto = isvc.spec.autoscaling
    if auto is None or plan.hpa_min is None or plan.hpa_max is None:
        return None
    name = isvc.metadata.name
    return with_hash(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": child_meta(
                INFERENCESERVICE, isvc.metadata, hpa_name(name), component_labels(name, "predictor")
            ),
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": predictor_name(name),
                },
                "minReplicas": plan.hpa_min,
                "maxReplicas": plan.hpa_max,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {
                                "type": "Utilization",
                                "averageUtilization": auto.target_cpu_utilization_percentage,
                            },
                        },
                    }
                ],
            },
        }
    )


def render(isvc: InferenceService, models: Models, cfg: OperatorConfig) -> list[Manifest]:
    """All children, in a fixed order: Service, predictor Deployment, canary Deployment (when
    `models.canary` is given and spec.canary is set), HPA (with autoscaling). Raises InvalidSpec (naming the
    field) for a model location that cannot be mounted (file:// without --allow-host-paths, relative
    file://, an unsupported scheme) or a malformed GPU quantity."""
    with_canary = models.canary is not None and isvc.spec.canary is not None
    plan = replica_plan(isvc, with_canary)
    out = [
        render_service(isvc),
        render_deployment(isvc, "predictor", models.predictor, plan.predictor, cfg),
    ]
    if with_canary and models.canary is not None:
        out.append(render_deployment(isvc, "canary", models.canary, plan.canary, cfg))
    hpa = render_hpa(isvc, plan)
    if hpa is not None:
        out.append(hpa)
    return out


__all__ = [
    "InvalidSpec",
    "ModelLocation",
    "Models",
    "ReplicaPlan",
    "canary_name",
    "effective_percent",
    "hpa_name",
    "job_model_location",
    "location_from_annotations",
    "model_path",
    "openai_base_url",
    "resolve_runtime",
    "served_model_name",
    "served_task",
    "startup_probe_timing",
    "predictor_name",
    "vllm_args",
    "vllm_model_arg",
    "render",
    "render_deployment",
    "render_hpa",
    "render_service",
    "replica_plan",
    "selector",
    "service_name",
    "spec_hash",
    "split_replicas",
    "url",
]
