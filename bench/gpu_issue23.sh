#!/usr/bin/env bash
# Issue 23 on one GPU node, in one call: tauon's trainer (FSDP2, compile on, one checkpoint mid-run)
# against the bare compiled FSDP2 loop (bench/bare_fsdp.py) on the same GPUs, model, seq, batch and
# tokens, plus the bare loop with torchao float8 linears; prints peerRatio, mfu, checkpointStallSeconds
# with their targets and a pass each (bench/gpu_fsdp.py does the work; its docstring has the details).
#
#   bash bench/gpu_issue23.sh                 # from the repo root, with .venv holding `pip install -e .[trainer]`
#   OUT=/some/dir BUDGET=480 bash bench/gpu_issue23.sh [extra bench/gpu_fsdp.py flags]
#   TAUON_BENCH_PIP_TORCHAO=1 bash bench/gpu_issue23.sh   # may pip install torchao into a temp dir
#
# Llama-3.2-1B shape, seq 2048, batch 8 per GPU, 30 steps, bf16. About 5-6 minutes on one H200; the
# whole call is bounded by BUDGET seconds (default 540) plus a grace for start and teardown, so it fits
# a 10-minute slot: a part that cannot start in time is recorded as skipped. Everything lands in $OUT
# (default: a temp dir; under the device run tool $OUT is the folder that comes back): gpu_fsdp.json,
# each run's log and metrics.json. Exit code: 0 when every part ran (the targets' pass is in the JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-$(mktemp -d -t tauon-gpu-issue23-XXXXXX)}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/operator:$PWD/trainer_image${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch does not see CUDA (CPU-only wheel, or no driver/GPU visible)"
print(f"torch {torch.__version__} cuda {torch.version.cuda} gpus={torch.cuda.device_count()} "
      f"name={torch.cuda.get_device_name(0)} capability={torch.cuda.get_device_capability(0)}", flush=True)
EOF

rc=0
timeout --kill-after=15 $((BUDGET + 40)) "$PY" bench/gpu_fsdp.py --float8 --budget "$BUDGET" \
  --results-dir "$OUT" "$@" || rc=$?
[ "$rc" = 124 ] && echo "bench/gpu_fsdp.py ran past $((BUDGET + 40)) s and was stopped"

if [ -f "$OUT/gpu_fsdp.json" ]; then
  "$PY" - "$OUT/gpu_fsdp.json" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
drop = {"memory", "stepIntervals", "resolved", "losses"}
slim = lambda r: {k: v for k, v in r.items() if k not in drop} if isinstance(r, dict) else r
view = {**res, "runs": {k: slim(v) for k, v in res.get("runs", {}).items()},
        "bare": slim(res.get("bare")), "float8": slim(res.get("float8"))}
print(json.dumps(view, indent=1))
keys = ("peerRatio", "mfu", "checkpointStallSeconds", "checkpointStallSource", "targets", "pass", "targetsApply")
print("ISSUE23 " + json.dumps({k: res.get(k) for k in keys}
      | {"float8": {k: (res.get("float8") or {}).get(k) for k in ("tokensPerSecond", "ratioVsBf16", "skipped")},
         "wallSeconds": res.get("wallSeconds")}))
EOF
  echo "wrote $OUT/gpu_fsdp.json"
else
  echo "no $OUT/gpu_fsdp.json"
  if [ "$rc" = 0 ]; then rc=1; fi
fi
exit "$rc"
