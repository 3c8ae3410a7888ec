#!/usr/bin/env bash
# GPU check of tauon's trainer: MiniLM fine-tuning on a CUDA GPU with bf16 (precision auto).
#
#   bash bench/gpu_check.sh            # from the repo root, with .venv holding `pip install -e .[trainer]`
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Runs (each bounded by `timeout`; about 1-2 minutes in all on an H100/H200 class GPU):
#   1. one process on cuda:0 (no process group; TAUON_DIST_BACKEND=nccl is what the operator sets),
#      precision auto -> bf16 where torch.cuda.is_bf16_supported();
#   2. two ranks with DDP: NCCL when 2+ GPUs are visible, else both ranks share GPU 0 over gloo
#      (NCCL refuses two ranks on one GPU);
# and prints samples/s, backend, precision, device, accuracy for each. Everything lands in $OUT
# (default: a temp dir): <run>/metrics.json, <run>.log, and gpu_check.json with the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
OUT=${OUT:-$(mktemp -d -t tauon-gpu-check-XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/trainer_image${PYTHONPATH:+:$PYTHONPATH}"
export TAUON_METRICS_PORT=0 TAUON_PROGRESS_INTERVAL=5 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TAUON_TERMINATION_LOG="$OUT/termination-log"

"$PY" - <<'EOF' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "torch does not see CUDA (CPU-only wheel, or no driver/GPU visible)"
n = torch.cuda.device_count()
print(f"torch {torch.__version__} cuda {torch.version.cuda} gpus={n} "
      f"name={torch.cuda.get_device_name(0)} bf16={torch.cuda.is_bf16_supported()} "
      f"nccl={torch.distributed.is_nccl_available()}")
EOF
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

job() {  # job NAME MAXSTEPS BATCH
  cat > "$OUT/$1.json" <<EOF
{"name": "gpu-check", "namespace": "default",
 "model": {"source": "hf://sentence-transformers/all-MiniLM-L6-v2", "path": "hf://sentence-transformers/all-MiniLM-L6-v2",
           "task": "sequence-classification", "numLabels": 2},
 "dataset": {"source": "file://./examples/data/sentiment.jsonl", "path": "$PWD/examples/data/sentiment.jsonl",
             "format": "jsonl", "textField": "text", "labelField": "label", "validationSplit": 0.1},
 "method": {"type": "full"},
 "hyperparameters": {"epochs": 1, "maxSteps": $2, "batchSizePerDevice": $3, "gradientAccumulationSteps": 1,
                     "learningRate": 5e-5, "weightDecay": 0.01, "warmupRatio": 0.1, "maxSeqLength": 128,
                     "precision": "auto", "seed": 42},
 "output": {"storage": "pvc://x/y", "path": "$OUT/$1", "checkpointEverySteps": 100}}
EOF
}

rc=0
job single 300 32
echo "== run 1: one process, cuda:0, precision auto"
TAUON_DIST_BACKEND=nccl timeout 240 "$PY" -m tauon_train.train --config "$OUT/single.json" >"$OUT/single.log" 2>&1 \
  || { rc=$?; echo "run 1 failed ($rc)"; tail -30 "$OUT/single.log"; }

job ddp 150 32
if [ "$NGPU" -ge 2 ]; then BACKEND=nccl; else BACKEND=gloo; fi
echo "== run 2: two ranks, DDP over $BACKEND ($NGPU GPU(s) visible)"
TAUON_DIST_BACKEND=$BACKEND timeout 300 "$TORCHRUN" --nnodes 1 --nproc-per-node 2 --master-addr 127.0.0.1 \
  --master-port 29631 -m tauon_train.train --config "$OUT/ddp.json" >"$OUT/ddp.log" 2>&1 \
  || { rc=$?; echo "run 2 failed ($rc)"; tail -30 "$OUT/ddp.log"; }

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
summary = {"device": open(os.path.join(out, "device.txt")).read().strip(), "runs": {}}
for run in ("single", "ddp"):
    p = os.path.join(out, run, "metrics.json")
    if not os.path.exists(p):
        summary["runs"][run] = None
        print(f"{run}: no metrics.json (see {out}/{run}.log)")
        continue
    m = json.load(open(p))
    keep = ("samplesPerSecond", "tokensPerSecond", "backend", "precision", "device", "worldSize", "steps",
            "trainSeconds", "checkpointSeconds", "initialEvalAccuracy", "evalAccuracy", "evalLoss")
    summary["runs"][run] = {k: m.get(k) for k in keep}
    print(f"{run}: " + " ".join(f"{k}={m.get(k)}" for k in keep))
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(f"wrote {out}/gpu_check.json")
EOF
# keep $OUT small: drop checkpoints and model weights
rm -rf "$OUT"/single/checkpoints "$OUT"/ddp/checkpoints "$OUT"/single/model "$OUT"/ddp/model
exit $rc
