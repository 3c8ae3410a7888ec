"""bench/gpu_fsdp.py's figures (issue 23): peerRatio, MFU, the checkpoint stall from a recorded step log
and metrics.json, the targets and their pass, the float8 skip reasons (pure: nothing is started); and a
smoke run of bench/bare_fsdp.py with two gloo ranks on a tiny Llama for 3 steps (opt-in:
``TAUON_BENCH_SMOKE=1``; about a minute on a busy 2-core machine)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "gpu_fsdp.py"
BARE = REPO / "bench" / "bare_fsdp.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_fsdp", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu_fsdp"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_bare_fsdp", BARE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the setting as recorded by an H200 run: Llama-3.2-1B shape with the tiny-llama vocabulary
PARAMS = 976_648_192
TOKENS = 8 * 2048


def test_throughput_mfu_is_6n_over_the_datasheet_peak(bench: ModuleType) -> None:
    r = bench.throughput(PARAMS, TOKENS, 0.2945, 1, 16, 2048, 2048, 989.0, 789.3)
    assert r["tokensPerSecond"] == pytest.approx(TOKENS / 0.2945, abs=0.1)
    assert r["mfu"] == pytest.approx(6 * PARAMS * TOKENS / 0.2945 / 989e12, abs=1e-4)
    assert r["mfu"] == 0.3296  # the figure bench/results/gpu_fsdp.json recorded for this step time
    attn = (6 * PARAMS + 12 * 16 * 2048 * 2048) * TOKENS / 0.2945 / 989e12
    assert r["mfuWithAttention"] == pytest.approx(attn, abs=1e-4)
    assert r["fractionOfMeasuredMatmul"] == pytest.approx(6 * PARAMS * TOKENS / 0.2945 / 789.3e12, abs=1e-4)


def test_throughput_is_per_gpu_with_more_ranks(bench: ModuleType) -> None:
    one = bench.throughput(PARAMS, TOKENS, 0.3, 1, 16, 2048, 2048, 989.0)
    eight = bench.throughput(PARAMS, 8 * TOKENS, 0.3, 8, 16, 2048, 2048, 989.0)
    assert eight["tokensPerSecond"] == pytest.approx(8 * one["tokensPerSecond"], abs=1)
    assert eight["mfu"] == one["mfu"] and "fractionOfMeasuredMatmul" not in one


def test_throughput_refuses_a_zero_step_time(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match="step_seconds"):
        bench.throughput(PARAMS, TOKENS, 0.0, 1, 16, 2048, 2048, 989.0)


def test_peer_ratio(bench: ModuleType) -> None:
    assert bench.peer_ratio(97.0, 100.0) == 0.97
    assert bench.peer_ratio(None, 100.0) is None and bench.peer_ratio(90.0, None) is None


def _log(times: dict[int, float]) -> list[tuple[float, str]]:
    """Rank 0's output with one progress line per step at the given times, plus noise."""
    lines: list[tuple[float, str]] = [(0.0, "tauon-trainer: compile: 16 blocks under torch.compile\n")]
    for step, t in times.items():
        rec = {"step": step, "totalSteps": 30, "loss": 5.0}
        lines.append((t, "[rank0]: tauon-progress " + json.dumps(rec) + "\n"))
        lines.append((t + 0.001, "tauon-progress {not json\n"))
    return lines


def _times(steps: int, step_s: float, extra: dict[int, float], first: float = 40.0) -> dict[int, float]:
    """Arrival times of steps 0..steps: step 1 compiles (``first`` s), ``extra[k]`` adds to step k."""
    out, t = {0: 100.0}, 100.0
    for k in range(1, steps + 1):
        t += (first if k == 1 else step_s) + extra.get(k, 0.0)
        out[k] = t
    return out


def test_step_log_stall_of_one_mid_run_save(bench: ModuleType) -> None:
    # save at step 20: 2.0 s blocked before step 21, then two steps slowed by 0.5 s and 0.25 s
    times = _times(30, 0.3, {21: 2.0, 22: 0.5, 23: 0.25, 26: 5.0})  # 26: outside the window
    steps = bench.progress_steps(_log(times))
    assert sorted(steps) == list(range(31)) and steps[20] == times[20]
    intervals = bench.step_intervals(steps)
    assert intervals[1] == pytest.approx(40.0) and 0 not in intervals
    saves = bench.mid_run_saves(30, 20)
    assert saves == [20]
    assert bench.stall_from_intervals(intervals, saves, warmup=5) == pytest.approx(2.75, abs=1e-3)


def test_step_log_stall_averages_over_saves_and_never_goes_negative(bench: ModuleType) -> None:
    times = _times(30, 0.3, {11: 1.0, 21: 3.0})
    intervals = bench.step_intervals(bench.progress_steps(_log(times)))
    assert bench.mid_run_saves(30, 10) == [10, 20]
    assert bench.stall_from_intervals(intervals, [10, 20], warmup=5) == pytest.approx(2.0, abs=1e-3)
    faster = bench.step_intervals(bench.progress_steps(_log(_times(30, 0.3, {21: -0.2}))))
    assert bench.stall_from_intervals(faster, [20], warmup=5) == 0.0


def test_step_log_stall_is_none_without_the_steps_it_needs(bench: ModuleType) -> None:
    times = _times(30, 0.3, {})
    intervals = bench.step_intervals({k: t for k, t in times.items() if k not in (21, 22, 23)})
    assert bench.stall_from_intervals(intervals, [20], warmup=5) is None
    assert bench.stall_from_intervals(bench.step_intervals(times), [], warmup=5) is None
    assert bench.mid_run_saves(30, 0) == [] and bench.mid_run_saves(30, 30) == []


def test_checkpoint_stall_source(bench: ModuleType) -> None:
    recorded = {"checkpointStallSeconds": 1.23456, "checkpointSeconds": 14.0}
    assert bench.checkpoint_stall(recorded, 0.8) == (0.8, "step log")  # one mid-run save
    assert bench.checkpoint_stall(recorded, None) == (1.235, "metrics.json")
    assert bench.checkpoint_stall(recorded, 0.8, "metrics") == (1.235, "metrics.json")
    assert bench.checkpoint_stall({"checkpointSeconds": 14.0}, 0.8) == (0.8, "step log")
    assert bench.checkpoint_stall(recorded, 0.8, "steplog") == (0.8, "step log")
    assert bench.checkpoint_stall({}, 0.8, "metrics") == (None, None)
    assert bench.checkpoint_stall({}, None) == (None, None)
    with pytest.raises(ValueError, match="stall source 'disk'"):
        bench.checkpoint_stall(recorded, 0.8, "disk")


def test_targets_and_pass_from_recorded_runs(bench: ModuleType) -> None:
    res = {
        "runs": {
            "fsdp": {"tokensPerSecond": 55633.3, "mfu": 0.4612, "checkpointStallSeconds": 3.5},
            "ddp": {"tokensPerSecond": 1.0, "mfu": 0.9},
        },
        "bare": {"tokensPerSecond": 60000.0},
    }
    s = bench.summarize(res, "fsdp", True, 8, 2048)
    assert s["peerRatio"] == pytest.approx(0.9272, abs=1e-4)
    assert s["mfu"] == 0.4612 and s["checkpointStallSeconds"] == 3.5
    assert s["targets"] == {
        "peerRatio": {">=": 0.97},
        "mfu": {">=": 0.45},
        "checkpointStallSeconds": {"<=": 3.0},
    }
    assert s["pass"] == {"peerRatio": False, "mfu": True, "checkpointStallSeconds": False}
    assert s["targetsApply"] is True
    assert bench.summarize(res, "fsdp", True, 2, 128)["targetsApply"] is False
    assert bench.check_targets({"peerRatio": 0.97, "mfu": 0.45, "checkpointStallSeconds": 3.0}) == {
        "peerRatio": True,
        "mfu": True,
        "checkpointStallSeconds": True,
    }


def test_summary_without_a_bare_run_or_a_failed_tauon_run(bench: ModuleType) -> None:
    s = bench.summarize(
        {"runs": {"fsdp": {"failed": 1}}, "bare": {"skipped": "budget"}}, "fsdp", False, 2, 128
    )
    assert s["peerRatio"] is None and s["mfu"] is None
    assert s["pass"] == {"peerRatio": None, "mfu": None, "checkpointStallSeconds": None}


def test_float8_skip_reasons(bench: ModuleType) -> None:
    assert "needs a CUDA GPU" in bench.float8_skip_reason({"gpus": 0}, None)
    a100 = bench.float8_skip_reason({"gpus": 8, "capability": [8, 0]}, None)
    assert a100 == "float8 matmuls need compute capability >= 8.9 (this GPU: 8.0)"
    h200 = {"gpus": 1, "capability": [9, 0]}
    assert bench.float8_skip_reason(h200, None) is None
    assert bench.float8_skip_reason(h200, "torchao is not installed") == "torchao is not installed"


def test_torchao_missing_without_permission_to_install(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed here")
    monkeypatch.delenv(bench.PIP_TORCHAO_ENV, raising=False)
    extra, why = bench.torchao_path(tmp_path)
    assert extra is None and why is not None and bench.PIP_TORCHAO_ENV in why
    assert not (tmp_path / "torchao").exists()


def test_job_turns_compile_on_and_checkpoints_mid_run(bench: ModuleType, tmp_path: Path) -> None:
    # the CPU plumbing mode: --device-check-off --layers 2 --hidden 64 --seq 128 --batch 2
    a = SimpleNamespace(steps=30, batch=2, seq=128, hidden=64, intermediate=0, layers=2, heads=32, kv_heads=8)
    a.precision, a.activation_checkpointing, a.compile, a.checkpoint_every = "auto", False, "true", 20
    j = bench.job(a, tmp_path / "out", tmp_path / "d.jsonl", "fsdp")
    assert j["parallelism"] == {"strategy": "fsdp", "activationCheckpointing": False, "compile": "true"}
    assert j["output"]["checkpointEverySteps"] == 20 and j["hyperparameters"]["seed"] == bench.SEED
    assert j["model"]["config"]["intermediate_size"] == 256
    assert bench.mid_run_saves(a.steps, a.checkpoint_every) == [20]


def test_bare_batches_follow_the_trainers_sample_order(bare: ModuleType) -> None:
    sys.path.insert(0, str(REPO / "trainer_image"))
    from tauon_train import data

    n, world, batch, seed = 23, 2, 3, 1
    per_epoch = n // (world * batch)
    for epoch in range(2):
        order = data.epoch_order(n, seed, epoch)
        for rank in range(world):
            want = data.rank_slice(order, 0, world, rank, batch)[:per_epoch]
            got = [
                bare.batch_indices(n, epoch * per_epoch + k, world, rank, batch, seed)
                for k in range(per_epoch)
            ]
            assert got == want
    with pytest.raises(SystemExit, match="cannot fill one global batch"):
        bare.batch_indices(5, 0, 2, 0, 3, seed)


def test_bare_float8_filter_keeps_the_head_in_bf16(bare: ModuleType) -> None:
    import torch

    assert bare.float8_filter(torch.nn.Linear(64, 256), "model.layers.0.mlp.up_proj")
    assert not bare.float8_filter(torch.nn.Linear(64, 256), "lm_head")
    assert not bare.float8_filter(torch.nn.Linear(64, 250), "model.layers.0.mlp.up_proj")
    assert not bare.float8_filter(torch.nn.LayerNorm(64), "model.norm")


@pytest.mark.skipif(os.environ.get("TAUON_BENCH_SMOKE") != "1", reason="opt-in: TAUON_BENCH_SMOKE=1")
def test_bare_fsdp_smoke_two_gloo_ranks(bench: ModuleType, tmp_path: Path) -> None:
    data_path, cfg = tmp_path / "docs.jsonl", tmp_path / "config.json"
    bench.write_documents(data_path, 16, chars=128 * 6, seed=7)
    a = SimpleNamespace(hidden=64, intermediate=0, layers=2, heads=4, kv_heads=2, seq=128)
    cfg.write_text(json.dumps(bench.llama_config(a)))
    out = tmp_path / "bare.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(bench.free_port()), str(BARE)]
    cmd += ["--data", str(data_path), "--tokenizer", str(bench.TOKENIZER), "--config", str(cfg)]
    cmd += ["--seq", "128", "--batch", "2", "--steps", "3", "--warmup", "1", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["worldSize"] == 2 and r["steps"] == 3 and r["timedSteps"] == 2
    assert r["compile"] is True and r["compileBackend"] == "aot_eager" and r["precision"] == "fp32"
    assert r["tokensPerStep"] == 2 * 2 * 128 and r["tokensPerSecond"] > 0
    assert r["params"] == bench.count_params(a)  # the model tauon's trainer builds from this config
    from transformers import AutoTokenizer

    chance = math.log(len(AutoTokenizer.from_pretrained(str(bench.TOKENIZER))))  # random init: ~ln(vocab)
    assert len(r["losses"]) == 3 and all(0.8 * chance < x < 1.2 * chance for x in r["losses"])
