#!/usr/bin/env bash
# One-shot GPU check for the large-model paths (issues 11 and 12), sized for a short device lease:
#   1. bench/gpu_fsdp.py: a ~1B random-init Llama pre-trained in bf16 through tauon's trainer at sequence
#      length 2048, fsdp then ddp (NCCL), one DCP checkpoint each, MFU from the median step;
#   2. bench/llm_serving.py on cuda: tauon's OpenAI server, continuous batching vs one request at a time.
# Python packages the GPU image lacks (fastapi, pydantic, uvicorn...) travel as wheels in .whl/ (see
# bench/README or the device notes); without them step 2 is skipped.
#   OUT=<dir> bash bench/gpu_large.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/smi.txt"
rc=0
timeout 480 "$PY" bench/gpu_fsdp.py --steps "${STEPS:-30}" --batch "${BATCH:-8}" --checkpoint-every 20 \
  --results-dir /tmp/gpu-fsdp || rc=$?
cp /tmp/gpu-fsdp/gpu_fsdp.json "$OUT/" 2>/dev/null
tar czf "$OUT/gpu_fsdp-logs.tgz" -C /tmp/gpu-fsdp . 2>/dev/null
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if "$PY" -c 'import fastapi, uvicorn' 2>/dev/null; then
  timeout 200 "$PY" bench/llm_serving.py --duration 5 --concurrency 1,8,32 --threads 4 --hidden 1024 --layers 8 \
    --server-args '--device cuda' --no-transformers-serve --output-name llm_serving-h200 \
    --results-dir /tmp/gpu-llm || rc=$?
  cp /tmp/gpu-llm/llm_serving-h200.* "$OUT/" 2>/dev/null
else
  echo "fastapi/uvicorn missing: LLM serving check skipped"
fi
exit $rc
