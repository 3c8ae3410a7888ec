"""``parallelism.compile`` on CPU: torch.compile per transformer block under ddp and fsdp, full and LoRA,
on 2 gloo ranks (a tiny Llama with activation checkpointing, packed position ids and chat-style loss
masking) trains step for step like the eager model and compiles nothing after its first step; a real
single-process run with compile on reports it in metrics.json.

The tests compile with aot_eager (``$TAUON_COMPILE_BACKEND``): dynamo's capture and AOTAutograd's
forward/backward graphs, run eagerly, with activation checkpointing, FSDP2's hooks and DDP around them
(what can break the training); inductor's code generation costs 75-145 s per case on the 2-core dev
machine. ``TAUON_TEST_COMPILE_BACKEND=inductor`` runs the 2-rank cases with the product's backend.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.manifests import TINY_LLAMA
from tests.workload.helpers import env, llama_job, metrics, write_job

STEPS = 3
BACKEND = os.environ.get("TAUON_TEST_COMPILE_BACKEND", "aot_eager")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ROWS = [((20, 17, 9), (30, 11)), ((12, 8), (25,)), ((40, 21), (5, 6))]  # example lengths per step


def _items(rank: int, step: int) -> list[dict[str, torch.Tensor]]:
    """Two packed rows of examples (position ids restart), each step's rows of other lengths (46, 25 and
    61 tokens: one 64-token bucket), the first tokens of each example masked like a chat prompt."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    items = []
    for lengths in ROWS[step]:
        ids = torch.randint(3, 200, (sum(lengths),), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])
        labels = ids.clone()
        labels[pos < 4] = -100  # the "prompt" of every example: no loss
        items.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return items


def _train(strategy_name: str, method: str, compiled: bool, rank: int) -> tuple[list[float], list[int]]:
    """``STEPS`` optimizer steps of the trainer's own model setup; the losses and, after each step, the
    graphs compiled so far."""
    from transformers import AutoConfig

    from tauon_train import data, modeling, prepare, strategy
    from tauon_train.config import LoraConfig, ParallelismConfig
    from tauon_train.dist import DistEnv

    d = DistEnv(rank=rank, world_size=2, local_world_size=2, launched=True)
    hf = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": 256, "pad_token_id": 0})
    lora = LoraConfig(r=4, alpha=8, dropout=0.0) if method == "lora" else None

    def build(device: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
        m = modeling.apply_lora(m, lora, "causal-lm") if lora else m
        data.disable_kv_cache(m)
        return m

    weights = strategy.RankZeroWeights(None, None)
    if rank == 0:
        full = build("cpu")
        sd = full.state_dict()
        weights = strategy.RankZeroWeights(sd, {n: b.clone() for n, b in full.named_buffers() if n not in sd})
    model = build("meta")
    par_cfg = ParallelismConfig(strategy_name, True, "true" if compiled else "false")
    plan = strategy.make_plan(model, par_cfg, strategy.FP32, torch.device("cpu"), d)
    par = strategy.parallelize(model, plan.mesh(), plan, weights)
    assert par.compiled_blocks == (2 if compiled else 0) and par.activation_checkpointing
    opt = prepare.make_optimizer(par.module, 1e-2, 0.0)
    collate = prepare.BucketedCollator(0, "causal-lm", True, 64)
    losses, graphs, before = [], [], strategy.compiled_graphs()
    for step in range(STEPS):
        batch = collate(_items(rank, step))
        assert batch["input_ids"].shape == (2, 64)
        loss = par.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in par.module.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        graphs.append(strategy.compiled_graphs() - before)
    return losses, graphs


VARIANTS = [("ddp", "full"), ("ddp", "lora"), ("fsdp", "full"), ("fsdp", "lora")]


def _worker(rank: int, port: int, results: Any) -> None:
    """Every variant in one process pair (the imports cost more than a variant): eager, then compiled
    from a clean dynamo cache (so its first step has to compile)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TAUON_COMPILE_BACKEND=BACKEND)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    for strategy_name, method in VARIANTS:
        eager, _ = _train(strategy_name, method, False, rank)
        torch._dynamo.reset()
        compiled, graphs = _train(strategy_name, method, True, rank)
        out[f"{strategy_name}-{method}"] = {"eager": eager, "compiled": compiled, "graphs": graphs}
    results[rank] = out
    dist.destroy_process_group()


def test_compiled_steps_match_eager_and_do_not_recompile() -> None:
    """ddp and fsdp, full and LoRA: the compiled steps' losses equal the eager ones within 1e-4; the first
    step builds the blocks' graphs, steps 2 and 3 build none."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_port(), results), nprocs=2, join=True)
    assert sorted(results.keys()) == [0, 1]
    for rank, out in dict(results).items():
        assert list(out) == [f"{s}-{m}" for s, m in VARIANTS]
        for variant, r in out.items():
            where = (rank, variant, r)
            assert r["compiled"] == pytest.approx(r["eager"], abs=1e-4), where
            assert len(set(r["eager"])) == STEPS, where  # the steps train: every loss differs
            assert r["graphs"][0] > 0, where  # the first step compiled ...
            assert r["graphs"][1:] == [r["graphs"][0]] * (STEPS - 1), where  # ... the later ones nothing


def test_compile_on_reports_in_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (single-process) run with compile true: metrics.json and the resolved settings say so, with
    the compile time; the blocks' graphs are built in the first step and the initial evaluation only."""
    from tauon_train.train import main

    for k, v in env(tmp_path, TAUON_COMPILE_BACKEND="aot_eager").items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    cfg = llama_job(out, "ddp", parallelism={"strategy": "ddp", "compile": True})
    cfg["hyperparameters"].update(maxSteps=4, maxSeqLength=48)
    assert main(["--config", str(write_job(tmp_path / "job.json", cfg))]) == 0
    m = metrics(out)
    assert m["compile"] is True and m["resolved"]["compile"] is True, m
    assert m["compileSeconds"] > 0 and m["compiledGraphs"] >= 2, m  # a training and an eval graph
    assert m["steps"] == 4
