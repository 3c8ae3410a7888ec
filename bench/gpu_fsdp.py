#!/usr/bin/env python3
"""GPU bench (issues 11, 23): tauon's trainer against a bare compiled FSDP2 loop; peerRatio, MFU and the
checkpoint stall, with targets and a pass per figure.

1. tauon: pre-trains a ~1B-parameter random-init Llama in bf16 with FSDP2 exactly as a FineTuneJob pod
   does (``torchrun -m tauon_train.train`` with a job config: ``model.init: scratch`` from a
   Llama-3.2-1B-shaped config and the shipped tiny-llama tokenizer, ``parallelism.strategy`` fsdp,
   ``parallelism.compile`` true, precision auto -> bf16, NCCL) on every visible GPU of one node, at
   sequence length 2048, batch 8 per GPU, with one checkpoint in the middle of the run
   (``--checkpoint-every 20`` of ``--steps 30``; the end of the run saves too).
2. bare: bench/bare_fsdp.py on the same GPUs, model, sequence length, batch, precision and tokens (the
   same documents file and sample order): ``fully_shard`` per block + root, bf16 params / fp32 reduce,
   fused AdamW, ``torch.compile`` per block, the median of the steps after ``--warmup``.
3. ``--float8``: the bare loop again with torchao float8 training on the blocks' linear layers; tokens/s
   and the ratio to the bf16 bare loop (``float8: {"skipped": why}`` without a GPU of compute capability
   >= 8.9 or without torchao; ``TAUON_BENCH_PIP_TORCHAO=1`` lets the script pip install torchao into a
   temp dir first).

Figures (top level of the JSON, each with ``targets`` and ``pass``):

- ``peerRatio`` = tauon tokens/s / bare compiled tokens/s (both from median step times; target >= 0.97).
- ``mfu`` = 6 x params x tokens/s per GPU / peak bf16 FLOP/s of tauon's run (the issue's definition;
  target >= 0.45 at 8 x 2048). The figure with attention FLOPs (+ 12 x layers x hidden x seq per
  token) is reported too. The peak is the datasheet's dense bf16 rate (``--peak-tflops``, 989 for
  H100/H200 SXM); a bf16 matmul measured in the same call gives the achieved ceiling for a second ratio.
- ``checkpointStallSeconds``: the step time lost to one checkpoint (target <= 3 s). ``--stall-source
  auto`` (default): the step log when it has the save, else metrics.json's ``checkpointStallSeconds``
  (the time the loop was blocked by all of the run's saves, the final step's included; the end-of-run
  wait for the last commit is apart, ``checkpointFinalWaitSeconds``); ``steplog``: one mid-run save: rank 0
  prints one ``tauon-progress`` line per step (``TAUON_PROGRESS_INTERVAL=0``), stamped here as it
  arrives; the intervals of the ``STALL_WINDOW`` steps after the save, less the median interval, summed
  (the save's blocking part and any slowdown of the steps its background write overlaps). Both
  estimates are kept in the run (``checkpointStallSecondsMetrics``, ``checkpointStallSecondsStepLog``).

``targetsApply`` says whether the run is the issue's setting (CUDA, batch 8, seq 2048); the CPU plumbing
mode computes the same figures without meaning. The default total wall time on one H200 is about 5-6
minutes (compilation ~1 min per loop, 30 steps of ~0.3 s, the ~12 GB checkpoints): ``--budget`` (540 s)
bounds it, each part gets what is left, and a part that cannot start in time is recorded as skipped.
``--strategies fsdp,ddp --compile false --no-bare --checkpoint-every 0`` is the earlier (issue 11) run.

    python bench/gpu_fsdp.py [--steps 30] [--batch 8] [--float8] [--results-dir DIR]
    # CPU plumbing check (no MFU meaning; results go to a temp dir unless --results-dir):
    python bench/gpu_fsdp.py --device-check-off --layers 2 --hidden 64 --seq 128 --batch 2

Writes RESULTS_DIR/gpu_fsdp.json; each run's metrics.json and log beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOKENIZER = REPO / "examples" / "tokenizers" / "tiny-llama"
CORPUS = REPO / "examples" / "data" / "corpus.jsonl"
BARE = REPO / "bench" / "bare_fsdp.py"
PROGRESS_PREFIX = "tauon-progress "

# the done-when thresholds: figure -> (comparison, value)
TARGETS: dict[str, tuple[str, float]] = {
    "peerRatio": (">=", 0.97),
    "mfu": (">=", 0.45),
    "checkpointStallSeconds": ("<=", 3.0),
}
STALL_WINDOW = 3  # steps after a save whose extra time counts as its stall (asynchronous saves overlap them)
FLOAT8_MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada, Hopper and newer
PIP_TORCHAO_ENV = "TAUON_BENCH_PIP_TORCHAO"


# --- pure: figures, targets, the step log ------------------------------------------------------------


def throughput(
    params: int,
    tokens_per_step: int,
    step_seconds: float,
    nproc: int,
    layers: int,
    hidden: int,
    seq: int,
    peak_tflops: float,
    matmul_tflops: float | None = None,
) -> dict[str, float]:
    """tokens/s from the median step time, and the 6N MFU (plus attention FLOPs) per GPU."""
    if step_seconds <= 0 or tokens_per_step <= 0:
        raise ValueError(f"step_seconds {step_seconds} and tokens_per_step {tokens_per_step} must be > 0")
    n = max(1, nproc)
    tok_s = tokens_per_step / step_seconds
    res = {"tokensPerSecond": round(tok_s, 1), "tokensPerSecondPerGpu": round(tok_s / n, 1)}
    if params > 0:
        flops_6n = 6 * params * tok_s / n
        flops_attn = (6 * params + 12 * layers * hidden * seq) * tok_s / n
        res["tflopsPerGpu6N"] = round(flops_6n / 1e12, 3)
        res["mfu"] = round(flops_6n / (peak_tflops * 1e12), 4)
        res["mfuWithAttention"] = round(flops_attn / (peak_tflops * 1e12), 4)
        if matmul_tflops:
            res["fractionOfMeasuredMatmul"] = round(flops_6n / (matmul_tflops * 1e12), 4)
    return res


def peer_ratio(tauon_tokens_per_second: float | None, bare_tokens_per_second: float | None) -> float | None:
    if not tauon_tokens_per_second or not bare_tokens_per_second:
        return None
    return round(tauon_tokens_per_second / bare_tokens_per_second, 4)


def progress_steps(stamped: list[tuple[float, str]]) -> dict[int, float]:
    """step -> arrival time of its first ``tauon-progress`` line (lines may carry a prefix, e.g.
    torchrun's; malformed ones are skipped)."""
    out: dict[int, float] = {}
    for t, line in stamped:
        i = line.find(PROGRESS_PREFIX)
        if i < 0:
            continue
        try:
            rec = json.loads(line[i + len(PROGRESS_PREFIX) :])
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            continue
        out.setdefault(step, t)
    return out


def step_intervals(times: dict[int, float]) -> dict[int, float]:
    """step k -> seconds from step k-1's line to step k's (only where both were seen)."""
    return {k: times[k] - times[k - 1] for k in sorted(times) if k - 1 in times}


def mid_run_saves(total: int, every: int) -> list[int]:
    """The steps whose checkpoint is followed by more steps (the final save is after the last)."""
    if every <= 0:
        return []
    return list(range(every, total, every))


def stall_from_intervals(
    intervals: dict[int, float], saves: list[int], warmup: int, window: int = STALL_WINDOW
) -> float | None:
    """Seconds one save costs the loop: the intervals of the ``window`` steps after each save, less the
    median of the other intervals past ``warmup``, summed, averaged over the saves (never below 0).
    None when a save's steps or the baseline are missing from the log."""
    affected = {k for s in saves for k in range(s + 1, s + 1 + window)}
    base = sorted(v for k, v in intervals.items() if k > warmup and k not in affected)
    if not saves or not base:
        return None
    median = base[len(base) // 2]
    lost: list[float] = []
    for s in saves:
        ks = [k for k in range(s + 1, s + 1 + window) if k in intervals]
        if not ks:
            return None
        lost.append(sum(intervals[k] - median for k in ks))
    return round(max(0.0, sum(lost) / len(lost)), 3)


STALL_SOURCES = ("auto", "metrics", "steplog")


def checkpoint_stall(
    metrics: dict[str, Any], from_log: float | None, source: str = "auto"
) -> tuple[float | None, str | None]:
    """(stall seconds, source). ``auto``: the step-log estimate (exactly one mid-run save: the figure the
    issue asks for) when there is one, else the trainer's own ``checkpointStallSeconds`` from
    metrics.json (the time the loop was blocked by all of the run's saves, the final step's included);
    ``metrics`` or ``steplog``: only that one (None when it is missing)."""
    if source not in STALL_SOURCES:
        raise ValueError(f"stall source {source!r}: expected one of {', '.join(STALL_SOURCES)}")
    if source in ("auto", "steplog") and from_log is not None:
        return from_log, "step log"
    v = metrics.get("checkpointStallSeconds")
    if source in ("auto", "metrics") and isinstance(v, int | float) and not isinstance(v, bool):
        return round(float(v), 3), "metrics.json"
    return None, None


def check_targets(figures: dict[str, float | None]) -> dict[str, bool | None]:
    """A pass per target figure (None when the figure is missing)."""
    out: dict[str, bool | None] = {}
    for name, (op, limit) in TARGETS.items():
        v = figures.get(name)
        out[name] = None if v is None else (v >= limit if op == ">=" else v <= limit)
    return out


def targets_json() -> dict[str, dict[str, float]]:
    return {name: {op: limit} for name, (op, limit) in TARGETS.items()}


def float8_skip_reason(info: dict[str, Any], torchao_error: str | None) -> str | None:
    """Why float8 cannot be measured here (None: it can)."""
    if not info.get("gpus"):
        return "float8 training needs a CUDA GPU (none visible)"
    cap = tuple(info.get("capability") or (0, 0))
    if cap < FLOAT8_MIN_CAPABILITY:
        need = ".".join(map(str, FLOAT8_MIN_CAPABILITY))
        return f"float8 matmuls need compute capability >= {need} (this GPU: {'.'.join(map(str, cap))})"
    if torchao_error:
        return torchao_error
    return None


def summarize(res: dict[str, Any], tauon_strategy: str, cuda: bool, batch: int, seq: int) -> dict[str, Any]:
    """The top-level figures, ``targets`` and ``pass`` from the runs in ``res``."""
    run = res.get("runs", {}).get(tauon_strategy) or {}
    bare = res.get("bare") or {}
    figures: dict[str, float | None] = {
        "peerRatio": peer_ratio(run.get("tokensPerSecond"), bare.get("tokensPerSecond")),
        "mfu": run.get("mfu"),
        "checkpointStallSeconds": run.get("checkpointStallSeconds"),
    }
    return {
        **figures,
        "checkpointStallSource": run.get("checkpointStallSource"),
        "targets": targets_json(),
        "pass": check_targets(figures),
        "targetsApply": cuda and batch == 8 and seq == 2048,
    }


# --- the model, the data, the device --------------------------------------------------------------


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
            "seed": SEED,
        },
        "parallelism": {
            "strategy": strategy,
            "activationCheckpointing": a.activation_checkpointing,
            "compile": a.compile,
        },
        "output": {"path": str(out), "checkpointEverySteps": a.checkpoint_every or 1_000_000},
    }


SEED = 1  # the trainer's hyperparameters.seed and bare_fsdp.py's --seed: the same sample order


def count_params(a: argparse.Namespace) -> int:
    """The model's parameter count, from its config on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    c = llama_config(a)
    hf = AutoConfig.for_model(c.pop("model_type"), **c)
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
            capability=list(torch.cuda.get_device_capability(0)),
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


# --- running the parts ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_stamped(
    cmd: list[str], env: dict[str, str], log_path: Path, timeout: float
) -> tuple[int, list[tuple[float, str]]]:
    """Run ``cmd`` in its own process group, its output to ``log_path`` and stamped with its arrival
    time; the whole group is killed at ``timeout`` (exit code 124)."""
    stamped: list[tuple[float, str]] = []
    pipe, merged = subprocess.PIPE, subprocess.STDOUT
    p = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=pipe, stderr=merged, text=True, start_new_session=True
    )

    def read() -> None:
        assert p.stdout is not None
        with log_path.open("w") as logf:
            for line in p.stdout:
                stamped.append((time.monotonic(), line))
                logf.write(line)
                logf.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = 124
    reader.join(timeout=10)
    return rc, stamped


def torchrun(nproc: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    return cmd + ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]


def base_env(a: argparse.Namespace, cuda: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if a.compile_backend:
        env["TAUON_COMPILE_BACKEND"] = a.compile_backend
    elif not cuda:
        env.setdefault("TAUON_COMPILE_BACKEND", "aot_eager")  # inductor on CPU: a C++ build per graph
    return env


def run_tauon(
    a: argparse.Namespace, tmp: Path, data: Path, strategy: str, nproc: int, timeout: float, cuda: bool
) -> dict[str, Any]:
    out = tmp / strategy
    cfg = tmp / f"{strategy}.json"
    cfg.write_text(json.dumps(job(a, out, data, strategy)))
    report = tmp / f"{strategy}-mem"
    env = {
        **base_env(a, cuda),
        "TAUON_METRICS_PORT": "0",
        "TAUON_PROGRESS_INTERVAL": "0",  # one line per step: the step log the stall is measured from
        "TAUON_MEMORY_REPORT": str(report),
        "PYTHONPATH": str(REPO / "trainer_image"),
    }
    env.pop("TAUON_TERMINATION_LOG", None)
    cmd = torchrun(nproc) + ["-m", "tauon_train.train", "--config", str(cfg)]
    log_path = a.results_dir / f"gpu_fsdp-{strategy}.log"
    t0 = time.monotonic()
    rc, stamped = run_stamped(cmd, env, log_path, timeout)
    wall = round(time.monotonic() - t0, 1)
    if rc != 0 or not (out / "metrics.json").exists():
        print(log_path.read_text()[-4000:], file=sys.stderr)
        return {"strategy": strategy, "failed": rc, "wallSeconds": wall}
    m = json.loads((out / "metrics.json").read_text())
    mem = [json.loads(f.read_text()) for f in sorted(tmp.glob(f"{strategy}-mem.rank*.json"))]
    (a.results_dir / f"gpu_fsdp-{strategy}-metrics.json").write_text(json.dumps(m, indent=1) + "\n")
    for heavy in ("checkpoints", "model"):  # ~12 GB of DCP checkpoint, 2 GB of model: free the disk
        shutil.rmtree(out / heavy, ignore_errors=True)
    n_params = count_params(a)
    steps = int(m["steps"])
    # input tokens through the model per step (FLOPs count every position); the trainer's own count is of
    # target tokens (a sample's first token is never a target), kept for a check that samples are full
    label_tokens_per_step = m["tokensPerSecond"] * m["trainSeconds"] / steps
    tokens_per_step = a.batch * a.seq * nproc
    step_s = float(m["stepSecondsMedian"])
    intervals = step_intervals(progress_steps(stamped))
    from_log = stall_from_intervals(intervals, mid_run_saves(steps, a.checkpoint_every), a.warmup)
    stall, source = checkpoint_stall(m, from_log, a.stall_source)
    res: dict[str, Any] = {
        "strategy": m["strategy"],
        "compile": m.get("compile"),
        "compileSeconds": m.get("compileSeconds"),
        "compiledGraphs": m.get("compiledGraphs"),
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
        **throughput(
            n_params,
            tokens_per_step,
            step_s,
            nproc,
            a.layers,
            a.hidden,
            a.seq,
            a.peak_tflops,
            a.matmul_tflops,
        ),
        "checkpointEverySteps": a.checkpoint_every,
        "checkpointSaves": mid_run_saves(steps, a.checkpoint_every),
        "checkpointSeconds": m["checkpointSeconds"],
        "checkpointStallSeconds": stall,
        "checkpointStallSource": source,
        "checkpointStallSecondsMetrics": m.get("checkpointStallSeconds"),
        "checkpointStallSecondsStepLog": from_log,
        "stepIntervals": {str(k): round(v, 4) for k, v in sorted(intervals.items())},
        "trainLoss": m["trainLoss"],
        "params": n_params,
        "peakGpuMemoryBytes": [r.get("peakGpuMemoryBytes") for r in mem],
        "resolved": m.get("resolved"),
        "memory": mem,
    }
    return res


def torchao_path(tmp: Path) -> tuple[str | None, str | None]:
    """(extra PYTHONPATH, error): torchao as this Python sees it; with ``$TAUON_BENCH_PIP_TORCHAO=1``
    pip installs it (without dependencies) into a temp dir when it is missing: from a wheel in the
    repository's ``.whl/`` when there is one (a GPU machine without network), else from the index."""
    probe = [sys.executable, "-c", "import torchao.float8"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return None, None
    if os.environ.get(PIP_TORCHAO_ENV) != "1":
        return None, f"torchao is not installed (set {PIP_TORCHAO_ENV}=1 to pip install it into a temp dir)"
    target = tmp / "torchao"
    wheels = sorted(str(w) for w in (REPO / ".whl").glob("torchao-*.whl"))
    what = ["--no-index", wheels[-1]] if wheels else ["torchao"]
    tries = [[sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), *what]]
    if shutil.which("uv"):
        tries.append(["uv", "pip", "install", "--no-deps", "--target", str(target), *what])
    why = "no installer"
    for cmd in tries:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
            continue
        if p.returncode == 0:
            env = {**os.environ, "PYTHONPATH": str(target)}
            if subprocess.run(probe, capture_output=True, env=env).returncode == 0:
                return str(target), None
            why = "installed torchao does not import with this torch"
        else:
            lines = (p.stderr or p.stdout).strip().splitlines()
            why = lines[-1] if lines else f"exit code {p.returncode}"
    return None, f"torchao install failed: {why}"


def run_bare(
    a: argparse.Namespace,
    tmp: Path,
    data: Path,
    nproc: int,
    timeout: float,
    cuda: bool,
    precision: str,
    float8: bool = False,
    extra_path: str | None = None,
) -> dict[str, Any]:
    name = "bare-float8" if float8 else "bare"
    cfg = tmp / "bare-config.json"
    cfg.write_text(json.dumps(llama_config(a)))
    out = tmp / f"{name}.json"
    env = base_env(a, cuda)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = torchrun(nproc) + [str(BARE), "--data", str(data), "--tokenizer", str(TOKENIZER)]
    cmd += ["--config", str(cfg), "--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps)]
    cmd += ["--warmup", str(a.warmup), "--seed", str(SEED), "--precision", precision, "--out", str(out)]
    if a.compile_backend:
        cmd += ["--compile-backend", a.compile_backend]
    if a.compile == "false":
        cmd.append("--no-compile")
    if float8:
        cmd.append("--float8")
    log_path = a.results_dir / f"gpu_fsdp-{name}.log"
    t0 = time.monotonic()
    rc, _ = run_stamped(cmd, env, log_path, timeout)
    wall = round(time.monotonic() - t0, 1)
    if rc != 0 or not out.exists():
        print(log_path.read_text()[-4000:], file=sys.stderr)
        return {"loop": name, "failed": rc, "wallSeconds": wall}
    r: dict[str, Any] = json.loads(out.read_text())
    r["wallSeconds"] = wall
    step_s, tokens, n_params = float(r["stepSecondsMedian"]), int(r["tokensPerStep"]), int(r["params"])
    r.update(
        throughput(n_params, tokens, step_s, nproc, a.layers, a.hidden, a.seq, a.peak_tflops, a.matmul_tflops)
    )
    return r


class Budget:
    """The total wall time: each part gets what is left (at most its own cap), or is skipped."""

    def __init__(self, seconds: float, minimum: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.minimum = minimum

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, cap: float) -> float | None:
        left = self.left()
        return None if left < self.minimum else min(cap, left)


def skipped(why: str) -> dict[str, str]:
    return {"skipped": why}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of every run")
    ap.add_argument("--warmup", type=int, default=5, help="leading steps the bare loop and the stall skip")
    ap.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument(
        "--compile", choices=("true", "false", "auto"), default="true", help="parallelism.compile"
    )
    ap.add_argument(
        "--compile-backend",
        default="",
        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)",
    )
    ap.add_argument("--checkpoint-every", type=int, default=20, help="DCP checkpoint every N steps (0: none)")
    ap.add_argument(
        "--stall-source",
        choices=STALL_SOURCES,
        default="auto",
        help="checkpointStallSeconds from the step log (auto: when it has the save) or metrics.json",
    )
    ap.add_argument("--strategies", default="fsdp", help="tauon runs; the first is the one the figures use")
    ap.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare FSDP2 loop")
    ap.add_argument("--float8", action="store_true", help="also the bare loop with torchao float8 linears")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 TFLOP/s per GPU")
    ap.add_argument("--nproc", type=int, default=0, help="processes (default: GPUs, or 1 on CPU)")
    ap.add_argument("--timeout", type=float, default=420, help="cap of one run, seconds")
    ap.add_argument("--budget", type=float, default=540, help="total wall time, seconds")
    ap.add_argument("--device-check-off", action="store_true", help="no GPU needed (CPU plumbing mode)")
    ap.add_argument(
        "--results-dir", type=Path, default=None, help="default bench/results (a temp dir on CPU)"
    )
    a = ap.parse_args(argv)
    if a.steps <= a.warmup:
        ap.error(f"--steps {a.steps} must exceed --warmup {a.warmup}")
    budget = Budget(a.budget, minimum=30.0)
    t_start = time.monotonic()
    info = device_info()
    cuda = bool(info["gpus"])
    if not cuda and not a.device_check_off:
        ap.error("no CUDA GPU visible: pass --device-check-off for the CPU plumbing mode")
    if a.results_dir is None:
        a.results_dir = RESULTS if cuda else Path(tempfile.mkdtemp(prefix="tauon-gpu-fsdp-results-"))
    a.results_dir.mkdir(parents=True, exist_ok=True)
    nproc = a.nproc or max(1, info["gpus"])
    a.matmul_tflops = matmul_tflops()
    print(
        json.dumps({"device": info, "matmulTflops": a.matmul_tflops, "results": str(a.results_dir)}),
        flush=True,
    )
    strategies = [s for s in a.strategies.split(",") if s]
    res: dict[str, Any] = {
        "benchmark": "pre-training a random-init Llama (init: scratch): tauon's trainer vs a bare compiled "
        "FSDP2 loop, bf16, seq len",
        "device": info,
        "nproc": nproc,
        "config": llama_config(a),
        "batchPerGpu": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "warmupSteps": a.warmup,
        "compile": a.compile,
        "checkpointEverySteps": a.checkpoint_every,
        "activationCheckpointing": a.activation_checkpointing,
        "peakTflopsDatasheet": a.peak_tflops,
        "matmulTflopsMeasured": a.matmul_tflops,
        "budgetSeconds": a.budget,
        "runs": {},
    }
    out_json = a.results_dir / "gpu_fsdp.json"

    def save() -> None:
        res.update(summarize(res, strategies[0] if strategies else "", cuda, a.batch, a.seq))
        res["wallSeconds"] = round(time.monotonic() - t_start, 1)
        out_json.write_text(json.dumps(res, indent=1) + "\n")

    ok = True
    with tempfile.TemporaryDirectory(prefix="tauon-gpu-fsdp-") as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "docs.jsonl"
        # ~4 characters per token is a safe bound for the tiny-llama BPE: documents longer than --seq
        write_documents(data, a.steps * a.batch * nproc + 8, chars=a.seq * 6, seed=7)
        precision = {"auto": "auto", "bf16": "bf16"}.get(a.precision, "fp32")
        for strategy in strategies:
            cap = budget.timeout(a.timeout)
            r = (
                skipped("wall-time budget spent")
                if cap is None
                else run_tauon(a, tmp, data, strategy, nproc, cap, cuda)
            )
            ok &= "failed" not in r
            res["runs"][strategy] = r
            if strategy == strategies[0] and r.get("precision") in ("bf16", "fp32"):
                precision = r["precision"]  # the bare loop trains in what tauon resolved
            print(
                strategy,
                json.dumps({k: v for k, v in r.items() if k not in ("memory", "stepIntervals")}),
                flush=True,
            )
            save()
        if a.bare:
            cap = budget.timeout(a.timeout)
            r = (
                skipped("wall-time budget spent")
                if cap is None
                else run_bare(a, tmp, data, nproc, cap, cuda, precision)
            )
            ok &= "failed" not in r
            res["bare"] = r
            print("bare", json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
            save()
        if a.float8:
            extra, err = torchao_path(tmp) if cuda else (None, None)
            why = float8_skip_reason(info, err)
            cap = budget.timeout(a.timeout)
            if why is None and cap is None:
                why = "wall-time budget spent"
            if why is not None:
                r = skipped(why)
            else:
                assert cap is not None
                r = run_bare(a, tmp, data, nproc, cap, cuda, "bf16", float8=True, extra_path=extra)
                ok &= "failed" not in r
                bf16 = (res.get("bare") or {}).get("tokensPerSecond")
                if "tokensPerSecond" in r and bf16:
                    r["ratioVsBf16"] = round(r["tokensPerSecond"] / bf16, 4)
            res["float8"] = r
            print("float8", json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
            save()
    save()
    figures = {k: res.get(k) for k in ("peerRatio", "mfu", "checkpointStallSeconds", "pass", "targetsApply")}
    print("figures", json.dumps(figures), flush=True)
    print(f"wrote {out_json}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
