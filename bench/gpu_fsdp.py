#!/usr/bin/env python3
"""GPU bench (issue 11): pre-train a ~1B-parameter random-init Llama in bf16 with FSDP2, report MFU.

Runs the real trainer exactly as a FineTuneJob pod does (``torchrun -m tauon_train.train`` with a job
config: ``model.init: scratch`` from a Llama-3.2-1B-shaped config and the shipped tiny-llama
tokenizer, ``parallelism.strategy`` fsdp then ddp, precision auto -> bf16, NCCL) on every visible GPU
of one node, at sequence length 2048. The dataset is long documents made of the shipped corpus's
sentences (every sample is exactly ``--seq`` tokens, no padding), written to a temp dir at start.

MFU = 6 x params x tokens/s / peak bf16 FLOP/s (the issue's definition), from the median optimizer
step; the figure with attention FLOPs (+ 12 x layers x hidden x seq per token) is reported too. The
peak is the datasheet's dense bf16 rate (``--peak-tflops``, 989 for H100/H200 SXM); a bf16 matmul
measured in the same run gives the achieved ceiling for a second ratio.

    python bench/gpu_fsdp.py [--steps 30] [--batch 8] [--strategies fsdp,ddp] [--results-dir DIR]
    # CPU plumbing check (no MFU meaning): --device-check-off --layers 2 --hidden 64 --seq 128 --batch 2

Writes RESULTS_DIR/gpu_fsdp.json; each run's metrics.json, memory report and log beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tauon.local.process import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
CORPUS = REPO / "examples" / "data" / "corpus.jsonl"


def llama_config(a: argparse.Namespace) -> dict[str, Any]:
    """Llama-3.2-1B's shape (hidden 2048, 16 layers, MLP 8192, 32 heads, 8 KV heads) by default."""
    return {
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate or 4 * a.hidden,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "max_position_embeddings": a.seq,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    }


def write_documents(path: Path, n_docs: int, chars: int, seed: int) -> None:
    """Long documents of the corpus's sentences in a seeded random order (each > ``chars`` characters)."""
    sentences: list[str] = []
    for line in CORPUS.read_text().splitlines():
        text = json.loads(line)["text"]
        sentences += [s.strip() + "." for s in text.split(".") if s.strip()]
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            parts: list[str] = []
            size = 0
            while size < chars:
                s = rng.choice(sentences)
                parts.append(s)
                size += len(s) + 1
            f.write(json.dumps({"text": " ".join(parts)}) + "\n")


def job(a: argparse.Namespace, out: Path, data: Path, strategy: str) -> dict[str, Any]:
    return {
        "name": f"gpu-fsdp-{strategy}",
        "uid": f"gpu-fsdp-{strategy}",
        "model": {
            "task": "causal-lm",
            "init": "scratch",
            "config": llama_config(a),
            "tokenizer": f"file://{TOKENIZER}",
            "tokenizerPath": str(TOKENIZER),
        },
        "dataset": {"path": str(data), "format": "jsonl", "textField": "text", "validationSplit": 0.0},
        "hyperparameters": {
            "epochs": 1,
            "maxSteps": a.steps,
            "batchSizePerDevice": a.batch,
            "learningRate": 3e-4,
            "warmupRatio": 0.1,
            "maxSeqLength": a.seq,
            "precision": a.precision,
            "seed": 1,
        },
        "parallelism": {"strategy": strategy, "activationCheckpointing": a.activation_checkpointing},
        "output": {"path": str(out), "checkpointEverySteps": a.checkpoint_every or 1_000_000},
    }


def count_params(a: argparse.Namespace) -> int:
    """The model's parameter count, from its config on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    c = llama_config(a)
    hf = AutoConfig.for_model(c.pop("model_type"), **c)
    from transformers import AutoTokenizer

    hf.vocab_size = len(AutoTokenizer.from_pretrained(str(TOKENIZER)))  # as the trainer sizes it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    return sum(p.numel() for p in model.parameters())


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": 0}
    if torch.cuda.is_available():
        info.update(
            gpus=torch.cuda.device_count(),
            name=torch.cuda.get_device_name(0),
            bf16=torch.cuda.is_bf16_supported(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def matmul_tflops(n: int = 8192, reps: int = 10) -> float | None:
    """Achieved dense bf16 matmul rate on GPU 0 (the same-run ceiling)."""
    import torch

    if not torch.cuda.is_available():
        return None
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ y
    torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return round(rate, 1)


def run_one(a: argparse.Namespace, tmp: Path, data: Path, strategy: str, nproc: int) -> dict[str, Any]:
    out = tmp / strategy
    cfg = tmp / f"{strategy}.json"
    cfg.write_text(json.dumps(job(a, out, data, strategy)))
    report = tmp / f"{strategy}-mem"
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TAUON_METRICS_PORT": "0",
        "TAUON_PROGRESS_INTERVAL": "30",
        "TAUON_MEMORY_REPORT": str(report),
        "PYTHONPATH": str(REPO / "trainer_image"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TAUON_TERMINATION_LOG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "tauon_train.train", "--config", str(cfg)]
    log_path = a.results_dir / f"gpu_fsdp-{strategy}.log"
    t0 = time.monotonic()
    with log_path.open("w") as logf:
        p = subprocess.run(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, timeout=a.timeout)
    wall = round(time.monotonic() - t0, 1)
    if p.returncode != 0:
        print(log_path.read_text()[-4000:], file=sys.stderr)
        return {"strategy": strategy, "failed": p.returncode, "wallSeconds": wall}
    m = json.loads((out / "metrics.json").read_text())
    mem = [json.loads(f.read_text()) for f in sorted(tmp.glob(f"{strategy}-mem.rank*.json"))]
    (a.results_dir / f"gpu_fsdp-{strategy}-metrics.json").write_text(json.dumps(m, indent=1) + "\n")
    n_params = count_params(a)
    steps = int(m["steps"])
    # input tokens through the model per step (FLOPs count every position); the trainer's own count is of
    # target tokens (a sample's first token is never a target), kept for a check that samples are full
    label_tokens_per_step = m["tokensPerSecond"] * m["trainSeconds"] / steps
    tokens_per_step = a.batch * a.seq * nproc
    step_s = float(m["stepSecondsMedian"])
    tok_s = tokens_per_step / step_s
    L, H, S = a.layers, a.hidden, a.seq
    res: dict[str, Any] = {
        "strategy": m["strategy"],
        "precision": m["precision"],
        "backend": m["backend"],
        "device": m["device"],
        "worldSize": m["worldSize"],
        "wallSeconds": wall,
        "runtimeSeconds": m["runtimeSeconds"],
        "steps": steps,
        "tokensPerStep": tokens_per_step,
        "targetTokensPerStep": round(label_tokens_per_step),
        "stepSecondsMedian": step_s,
        "stepSecondsP90": m["stepSecondsP90"],
        "tokensPerSecond": round(tok_s, 1),
        "tokensPerSecondPerGpu": round(tok_s / max(1, nproc), 1),
        "checkpointSeconds": m["checkpointSeconds"],
        "trainLoss": m["trainLoss"],
        "params": n_params,
        "peakGpuMemoryBytes": [r.get("peakGpuMemoryBytes") for r in mem],
        "resolved": m.get("resolved"),
        "memory": mem,
    }
    if n_params:
        flops_6n = 6 * n_params * tok_s / max(1, nproc)
        flops_attn = (6 * n_params + 12 * L * H * S) * tok_s / max(1, nproc)
        res["tflopsPerGpu6N"] = round(flops_6n / 1e12, 1)
        res["mfu"] = round(flops_6n / (a.peak_tflops * 1e12), 4)
        res["mfuWithAttention"] = round(flops_attn / (a.peak_tflops * 1e12), 4)
        if a.matmul_tflops:
            res["fractionOfMeasuredMatmul"] = round(flops_6n / (a.matmul_tflops * 1e12), 4)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="DCP checkpoint every N steps (0: none)")
    ap.add_argument("--strategies", default="fsdp,ddp")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 TFLOP/s per GPU")
    ap.add_argument("--nproc", type=int, default=0, help="processes (default: GPUs, or 1 on CPU)")
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    a = ap.parse_args()
    a.results_dir.mkdir(parents=True, exist_ok=True)
    info = device_info()
    nproc = a.nproc or max(1, info["gpus"])
    a.matmul_tflops = matmul_tflops()
    print(json.dumps({"device": info, "matmulTflops": a.matmul_tflops}), flush=True)
    res: dict[str, Any] = {
        "benchmark": "pre-training a random-init Llama (init: scratch) through tauon's trainer, bf16, seq len",
        "device": info,
        "nproc": nproc,
        "config": llama_config(a),
        "batchPerGpu": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "activationCheckpointing": a.activation_checkpointing,
        "peakTflopsDatasheet": a.peak_tflops,
        "matmulTflopsMeasured": a.matmul_tflops,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="tauon-gpu-fsdp-") as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "docs.jsonl"
        # ~4 characters per token is a safe bound for the tiny-llama BPE: documents longer than --seq
        write_documents(data, a.steps * a.batch * nproc + 8, chars=a.seq * 6, seed=7)
        for strategy in a.strategies.split(","):
            r = run_one(a, tmp, data, strategy, nproc)
            res["runs"][strategy] = r
            print(strategy, json.dumps({k: v for k, v in r.items() if k != "memory"}), flush=True)
            (a.results_dir / "gpu_fsdp.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0 if all("failed" not in r for r in res["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
