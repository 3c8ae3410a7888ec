"""A bare FSDP2 pre-training loop: the baseline bench/gpu_fsdp.py compares tauon's trainer against.

    torchrun --nproc-per-node N bench/bare_fsdp.py --data D --tokenizer T --config C.json \\
        --seq 2048 --batch 8 --steps 30 --warmup 5 --out result.json [--no-compile] [--float8]

The few lines of PyTorch a user would write for the same work as tauon's trainer in bench/gpu_fsdp.py:
the same Llama (``AutoModelForCausalLM.from_config`` of the same config, the tokenizer's vocabulary,
seeded random init), the same tokens (each line of the jsonl ``--data`` is one sample: its first
``--seq`` tokens; epoch order ``torch.randperm`` seeded with seed + epoch, global batches of world x
batch consecutive samples, rank r taking the r-th slice: the trainer's ``epoch_order``/``rank_slice``),
``fully_shard`` per transformer block then the root (defaults otherwise), bf16 parameters with fp32
gradient reduction (``MixedPrecisionPolicy``; ``--precision auto`` is bf16 on CUDA, fp32 on CPU like the
trainer), each block ``torch.compile``d before sharding (``--compile-backend``, default inductor on CUDA
and aot_eager on CPU; ``--no-compile`` runs eagerly), AdamW (fused on CUDA), gradients clipped to
``--clip`` (the trainer clips to 1.0). ``--float8`` converts the blocks' linear layers with torchao
(``convert_to_float8_training``, tensorwise scaling; the lm_head stays bf16) before compiling.

``--steps`` is the total number of optimizer steps (the trainer's maxSteps: the same samples); the first
``--warmup`` of them (compilation, allocator warm-up) are not timed. Each step ends with a device
synchronize; tokens/s = world x batch x seq / median timed step. No evaluation, checkpoints, metrics,
schedule or per-step all-reduce of statistics. Rank 0 writes ``--out`` (JSON) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist


def load_samples(path: Path, tokenizer: Any, seq: int) -> torch.Tensor:
    """Every line's first ``seq`` tokens (as the trainer's truncation), one row per line."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    ids = tokenizer(texts, truncation=True, max_length=seq)["input_ids"]
    short = [i + 1 for i, x in enumerate(ids) if len(x) < seq]
    if short:
        raise SystemExit(
            f"{path}: line {short[0]} has fewer than --seq {seq} tokens ({len(short)} such lines)"
        )
    return torch.tensor(ids, dtype=torch.long)


def batch_indices(n: int, step: int, world: int, rank: int, batch: int, seed: int) -> list[int]:
    """This rank's samples of global step ``step``: the trainer's sample order (epochs of a seeded
    randperm, full global batches of world x batch consecutive samples, rank r takes the r-th slice)."""
    per_epoch = n // (world * batch)
    if per_epoch == 0:
        raise SystemExit(f"{n} samples cannot fill one global batch of {world} x {batch}")
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g)
    start = k * world * batch + rank * batch
    return [int(i) for i in order[start : start + batch]]


def float8_filter(module: torch.nn.Module, fqn: str) -> bool:
    """Linear layers inside the blocks whose dimensions float8 matmuls take (multiples of 16)."""
    return (
        isinstance(module, torch.nn.Linear)
        and "lm_head" not in fqn
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def init_process_group() -> tuple[int, int, torch.device]:
    """(rank, world, this rank's device): GPU LOCAL_RANK over NCCL, else the CPU over gloo; a plain
    ``python bench/bare_fsdp.py`` is a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        tdist.init_process_group("gloo")
    return tdist.get_rank(), tdist.get_world_size(), device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="jsonl with a text field, one sample per line")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--config", type=Path, required=True, help="JSON of the model config (model_type, ...)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=5, help="leading steps not timed")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-backend", default="", help="default: inductor on CUDA, aot_eager on CPU")
    ap.add_argument("--float8", action="store_true", help="torchao float8 training on the blocks' linears")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.steps <= a.warmup:
        raise SystemExit(f"--steps {a.steps} must exceed --warmup {a.warmup} (nothing would be timed)")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    rank, world, device = init_process_group()
    cuda = device.type == "cuda"
    bf16 = a.precision == "bf16" or (a.precision == "auto" and cuda)
    backend = a.compile_backend or ("inductor" if cuda else "aot_eager")

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    samples = load_samples(a.data, tok, a.seq)
    raw = json.loads(a.config.read_text())
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    cfg.vocab_size = len(tok)
    torch.manual_seed(a.seed)  # every rank builds the same weights
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if a.float8:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=float8_filter)
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw: dict[str, Any] = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for block in model.model.layers:
        if a.compile:
            block.compile(backend=backend)
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=cuda)

    times: list[float] = []
    losses: list[float] = []
    t_run = time.perf_counter()
    for step in range(a.steps):
        t = time.perf_counter()
        x = samples[batch_indices(len(samples), step, world, rank, a.batch, a.seed)].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(round(float(loss.detach()), 4))
    run_s = time.perf_counter() - t_run

    timed = sorted(times[a.warmup :])
    median = timed[len(timed) // 2]
    tokens_per_step = world * a.batch * a.seq
    res = {
        "loop": "bare FSDP2",
        "worldSize": world,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": "bf16" if bf16 else "fp32",
        "compile": a.compile,
        "compileBackend": backend if a.compile else None,
        "float8": a.float8,
        "fusedAdamW": cuda,
        "params": n_params,
        "steps": a.steps,
        "warmupSteps": a.warmup,
        "timedSteps": len(timed),
        "tokensPerStep": tokens_per_step,
        "firstStepSeconds": round(times[0], 3),
        "stepSecondsMedian": round(median, 5),
        "stepSecondsP90": round(timed[min(len(timed) - 1, int(0.9 * len(timed)))], 5),
        "tokensPerSecond": round(tokens_per_step / median, 1),
        "runSeconds": round(run_s, 2),
        "losses": losses,
        "peakGpuMemoryBytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    if rank == 0:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print("BARE_FSDP_RESULT " + json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
