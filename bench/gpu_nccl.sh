#!/usr/bin/env bash
# The NCCL path on a real GPU, as a FineTuneJob pod runs it: torchrun -> tauon_train.train with
# TAUON_DIST_BACKEND=nccl (a process group and DDP even on one GPU), precision auto (bf16 on Hopper),
# then the same run in fp32 for a same-machine ratio (after a short warm-up run, fp32 first).
# Writes $OUT/gpu_nccl.json.
#   MODEL_DIR=<HF model dir> OUT=<dir> bash bench/gpu_nccl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
MODEL_DIR=${MODEL_DIR:?a Hugging Face model directory (e.g. the MiniLM)}
STEPS=${STEPS:-300}
BATCH=${BATCH:-64}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/trainer_image${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TAUON_METRICS_PORT=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NCCL_DEBUG=INFO
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
"$PY" -c 'import torch; c = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if c else "no GPU", "bf16", c and torch.cuda.is_bf16_supported(), "nccl", torch.cuda.nccl.version() if c else None)' | tee "$OUT/device.txt"
run() {  # NAME PRECISION
  cat > "$OUT/$1.json" <<JSON
{"name": "gpu-$1", "namespace": "default",
 "model": {"source": "file://$MODEL_DIR", "path": "$MODEL_DIR", "task": "sequence-classification", "numLabels": 2},
 "dataset": {"source": "file://$PWD/examples/data/sentiment.jsonl", "path": "$PWD/examples/data/sentiment.jsonl",
             "format": "jsonl", "textField": "text", "labelField": "label", "validationSplit": 0.15},
 "method": {"type": "full"},
 "hyperparameters": {"epochs": 1, "maxSteps": $STEPS, "batchSizePerDevice": ${BATCH:-64}, "gradientAccumulationSteps": 1,
                     "learningRate": 5e-5, "weightDecay": 0.01, "warmupRatio": 0.1, "maxSeqLength": 128,
                     "precision": "$2", "seed": 42},
 "output": {"storage": "file:///tmp/gpu-$1", "path": "/tmp/gpu-$1", "checkpointEverySteps": 100}}
JSON
  rm -rf "/tmp/gpu-$1"
  TAUON_DIST_BACKEND=${BACKEND:-nccl} TAUON_TERMINATION_LOG="$OUT/$1.termination-log" timeout 200 \
    "$PY" -m torch.distributed.run --nnodes 1 --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29631 \
    -m tauon_train.train --config "$OUT/$1.json" > "$OUT/$1.log" 2>&1 || { echo "$1 failed"; tail -40 "$OUT/$1.log"; }
  cp "/tmp/gpu-$1/metrics.json" "$OUT/$1.metrics.json" 2>/dev/null || true
}
STEPS_SAVED=$STEPS; STEPS=20 run warmup auto; STEPS=$STEPS_SAVED   # CUDA/cuBLAS/NCCL init, not measured
run fp32 fp32
run auto auto
grep -h "NCCL INFO.*version\|NCCL INFO Init COMPLETE\|comm 0x" "$OUT/auto.log" | head -3 || true
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
res = {"device": open(os.path.join(out, "device.txt")).read().strip(), "runs": {}}
for r in ("auto", "fp32"):
    p = os.path.join(out, f"{r}.metrics.json")
    res["runs"][r] = json.load(open(p)) if os.path.exists(p) else None
a, f = res["runs"]["auto"], res["runs"]["fp32"]
if a and f:
    res["bf16_over_fp32_samples_per_second"] = round(a["samplesPerSecond"] / f["samplesPerSecond"], 3)
json.dump(res, open(os.path.join(out, "gpu_nccl.json"), "w"), indent=1)
for r, m in res["runs"].items():
    if m:
        print(r, {k: m.get(k) for k in ("backend", "precision", "device", "worldSize", "steps", "samplesPerSecond",
                                       "tokensPerSecond", "initialEvalAccuracy", "evalAccuracy", "runtimeSeconds")})
print("bf16/fp32 throughput:", res.get("bf16_over_fp32_samples_per_second"))
PYEOF
