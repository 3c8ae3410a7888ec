"""Unit tests of the trainer's pure pieces and of its permanent-error path (no training, seconds)."""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from tauon_core.errors import PermanentError, report_permanent, write_termination_log
from tauon_train import checkpoint as ckpt
from tauon_train import output as out_mod
from tauon_train import schedule, strategy
from tauon_train.config import ParallelismConfig, parse_config
from tauon_train.data import Collator, Record, load_records, parse_label, split_indices, split_sizes
from tauon_train.dist import DistEnv, choose_backend
from tauon_train.metrics import (
    LOG_PREFIX,
    ProgressReporter,
    TrainerMetrics,
    progress_record,
    start_metrics_server,
)
from tests.net import free_port as _free_port
from tests.workload.helpers import SENTIMENT, env, job

# --- config ------------------------------------------------------------------------------------


def test_config_parses_operator_shape(tmp_path: Path) -> None:
    raw = job(
        tmp_path / "out",
        method={
            "type": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targetModules": ["query", "value"]},
        },
    )
    cfg = parse_config(raw)
    assert cfg.model.task == "sequence-classification" and cfg.model.num_labels == 2
    assert cfg.model.path.startswith("hf://")
    assert cfg.dataset.path == str(SENTIMENT) and cfg.dataset.label_field == "label"
    assert cfg.method.lora is not None and cfg.method.lora.target_modules == ("query", "value")
    assert cfg.method.lora.r == 4 and cfg.method.lora.alpha == 8 and cfg.method.lora.dropout == 0.1
    hp = cfg.hyperparameters
    assert (hp.epochs, hp.max_steps, hp.batch_size_per_device, hp.learning_rate, hp.max_seq_length) == (
        1,
        None,
        16,
        1e-4,
        64,
    )
    assert cfg.output.path == str(tmp_path / "out")


def test_config_applies_api_defaults(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "model": {"path": "/m", "task": "sequence-classification", "numLabels": 3},
            "dataset": {"path": "/d/data.csv"},
            "output": {"path": str(tmp_path)},
        }
    )
    hp = cfg.hyperparameters
    assert (hp.epochs, hp.max_steps, hp.batch_size_per_device, hp.gradient_accumulation_steps) == (
        3,
        None,
        16,
        1,
    )
    assert (hp.learning_rate, hp.weight_decay, hp.warmup_ratio, hp.max_seq_length, hp.precision, hp.seed) == (
        5e-5,
        0.0,
        0.0,
        128,
        "auto",
        42,
    )
    assert cfg.dataset.format == "csv"  # inferred from the extension when absent
    assert (cfg.dataset.text_field, cfg.dataset.label_field, cfg.dataset.validation_split) == (
        "text",
        "label",
        0.1,
    )
    assert cfg.method.type == "full" and cfg.method.lora is None
    assert cfg.output.checkpoint_every_steps == 200
    lora = parse_config({**job(tmp_path), "method": {"type": "lora"}}).method.lora
    assert lora is not None and (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (8, 16, 0.05, None)


def test_config_local_paths_from_file_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = job(tmp_path)
    raw["dataset"] = {"source": "file://./data/x.jsonl"}
    raw["model"] = {"source": "file:///models/m", "task": "causal-lm"}
    cfg = parse_config(raw)
    assert cfg.dataset.path == str(tmp_path / "data" / "x.jsonl")
    assert cfg.model.path == "/models/m"
    assert cfg.dataset.label_field is None  # causal-lm ignores labels


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"hyperparameters": {"epochs": 0}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"epochs": "three"}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"learningRate": 0}}, "hyperparameters.learningRate"),
        ({"hyperparameters": {"learningRate": 1.5}}, "hyperparameters.learningRate"),
        ({"hyperparameters": {"maxSteps": 0}}, "hyperparameters.maxSteps"),
        ({"hyperparameters": {"maxSeqLength": 4}}, "hyperparameters.maxSeqLength"),
        ({"hyperparameters": {"precision": "fp8"}}, "hyperparameters.precision"),
        ({"hyperparameters": {"warmupRatio": 1.0}}, "hyperparameters.warmupRatio"),
        ({"hyperparameters": {"batchSizePerDevice": True}}, "hyperparameters.batchSizePerDevice"),
        ({"dataset": {"validationSplit": 1.0}}, "dataset.validationSplit"),
        ({"dataset": {"format": "xml"}}, "dataset.format"),
        ({"model": {"task": "translation"}}, "model.task"),
        ({"model": {"numLabels": None}}, "model.numLabels"),
        ({"model": {"numLabels": 1}}, "model.numLabels"),
        ({"model": {"task": "causal-lm", "numLabels": 2}}, "model.numLabels"),
        ({"method": {"type": "full", "lora": {"r": 8}}}, "method.lora"),
        ({"method": {"type": "lora", "lora": {"targetModules": "query"}}}, "method.lora.targetModules"),
        ({"method": {"type": "lora", "lora": {"r": 0}}}, "method.lora.r"),
        ({"output": {"checkpointEverySteps": 0}}, "output.checkpointEverySteps"),
        ({"output": {"path": None, "storage": "pvc://models/x"}}, "output.path"),
        ({"model": "hf://x/y"}, "model"),
    ],
)
def test_config_rejects_with_field_name(tmp_path: Path, patch: dict[str, Any], field: str) -> None:
    with pytest.raises(PermanentError) as ei:
        parse_config(job(tmp_path, **patch))
    assert ei.value.reason == "InvalidConfig"
    assert field in ei.value.message, ei.value.message


# --- step math and LR schedule -----------------------------------------------------------------


def test_steps_per_epoch_matches_sampler_arithmetic() -> None:
    for n in range(1, 80):
        for world in (1, 2, 3, 4):
            for batch in (1, 3, 8):
                for accum in (1, 2, 5):
                    per_rank = math.ceil(n / world)  # DistributedSampler pads to a multiple of world
                    micro = math.ceil(per_rank / batch)
                    assert schedule.micro_batches_per_epoch(n, batch, world) == micro
                    assert schedule.steps_per_epoch(n, batch, world, accum) == math.ceil(micro / accum)
                    assert schedule.steps_per_epoch(n, batch, world, accum) == math.ceil(
                        n / (batch * world * accum)
                    )


def test_total_steps() -> None:
    assert schedule.total_steps(468, 16, 2, 1, 2, None) == 30
    assert schedule.total_steps(468, 16, 2, 1, 3, None) == 45
    assert schedule.total_steps(468, 16, 2, 4, 3, None) == 3 * 4
    assert schedule.total_steps(468, 16, 2, 1, 3, 7) == 7  # maxSteps overrides epochs
    assert schedule.total_steps(10, 16, 4, 1, 5, None) == 5


def test_lr_schedule_warmup_then_linear_decay() -> None:
    total, warm = 10, schedule.warmup_steps(10, 0.2)
    assert warm == 2 and schedule.warmup_steps(10, 0.0) == 0 and schedule.warmup_steps(7, 0.1) == 1
    f = [schedule.lr_factor(s, total, warm) for s in range(total + 1)]
    assert f[:3] == [0.0, 0.5, 1.0]
    assert f[-1] == 0.0 and all(a > b for a, b in zip(f[2:], f[3:], strict=False))
    assert math.isclose(f[6], 0.5)
    assert [schedule.lr_factor(s, 4, 0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # through torch's LambdaLR the optimizer sees the same factors, step by step
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.LinearWarmupDecay(total, warm))
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [round(x / 1e-3, 6) for x in seen] == [round(x, 6) for x in f[:total]]


# --- data --------------------------------------------------------------------------------------


def _ds(tmp_path: Path, name: str, content: str, **over: Any) -> Any:
    p = tmp_path / name
    p.write_text(content)
    cfg = parse_config(
        job(tmp_path / "out", dataset={"path": str(p), "format": name.rsplit(".", 1)[1], **over})
    )
    return cfg


def test_load_jsonl_and_csv(tmp_path: Path) -> None:
    cfg = _ds(tmp_path, "a.jsonl", '{"text": "good", "label": 1}\n\n{"text": "bad", "label": "0", "x": 5}\n')
    recs = load_records(cfg.dataset, 2)
    assert recs == [Record("good", 1, 1), Record("bad", 0, 3)]
    cfg = _ds(
        tmp_path, "b.csv", 'review,stars\n"fine, really",2\nmeh,0\n', textField="review", labelField="stars"
    )
    recs = load_records(cfg.dataset, 3)
    assert [(r.text, r.label, r.line) for r in recs] == [("fine, really", 2, 2), ("meh", 0, 3)]


def test_shipped_dataset_is_balanced_and_unique() -> None:
    rows = [json.loads(x) for x in SENTIMENT.read_text().splitlines()]
    assert len(rows) >= 440
    assert sum(r["label"] for r in rows) * 2 == len(rows)
    assert len({r["text"] for r in rows}) == len(rows)


@pytest.mark.parametrize(
    ("name", "content", "reason", "needle"),
    [
        ("a.jsonl", '{"text": "x", "label": 1}\n{"label": 0}\n', "MissingColumn", ":2: field 'text' missing"),
        ("a.jsonl", '{"text": "x"}\n', "MissingColumn", ":1: field 'label' missing"),
        ("a.jsonl", '{"text": "x", "label": 1}\nnot json\n', "InvalidDataset", ":2: invalid JSON"),
        ("a.jsonl", '{"text": 5, "label": 1}\n', "InvalidDataset", ":1: field 'text' must be a string"),
        ("a.jsonl", '{"text": "x", "label": 2}\n', "InvalidLabel", "outside 0..1"),
        ("a.jsonl", '{"text": "x", "label": -1}\n', "InvalidLabel", "outside 0..1"),
        (
            "a.jsonl",
            '{"text": "x", "label": "pos"}\n',
            "InvalidLabel",
            ":1: field 'label' must be an integer",
        ),
        ("a.jsonl", '{"text": "x", "label": 0.5}\n', "InvalidLabel", "must be an integer"),
        ("a.jsonl", '{"text": "x", "label": true}\n', "InvalidLabel", "must be an integer"),
        ("a.jsonl", "", "EmptyDataset", "no rows"),
        ("a.jsonl", "\n  \n", "EmptyDataset", "no rows"),
        ("a.csv", "body,label\nx,1\n", "MissingColumn", "column 'text' not in the csv header"),
        ("a.csv", "text,label\nx,y\n", "InvalidLabel", ":2: field 'label' must be an integer"),
    ],
)
def test_bad_datasets(tmp_path: Path, name: str, content: str, reason: str, needle: str) -> None:
    cfg = _ds(tmp_path, name, content)
    with pytest.raises(PermanentError) as ei:
        load_records(cfg.dataset, 2)
    assert ei.value.reason == reason
    assert needle in ei.value.message and str(tmp_path / name) in ei.value.message, ei.value.message


def test_missing_dataset_file(tmp_path: Path) -> None:
    cfg = parse_config(job(tmp_path, dataset={"path": str(tmp_path / "none.jsonl")}))
    with pytest.raises(PermanentError) as ei:
        load_records(cfg.dataset, 2)
    assert ei.value.reason == "DatasetNotFound" and "none.jsonl" in ei.value.message


def test_parse_label_accepts_int_strings() -> None:
    assert parse_label(" 1 ", 2, "f:1", "label") == 1
    assert parse_label(2.0, 3, "f:1", "label") == 2


def test_split_is_seeded_disjoint_and_complete() -> None:
    tr, va = split_indices(100, 0.1, seed=42)
    assert len(va) == 10 and len(tr) == 90 and sorted(tr + va) == list(range(100))
    assert (tr, va) == split_indices(100, 0.1, seed=42)  # every rank computes the same split
    assert va != split_indices(100, 0.1, seed=7)[1]
    assert split_sizes(5, 0.1) == (4, 1)  # a non-zero split keeps one validation row
    assert split_sizes(5, 0.0) == (5, 0)
    assert split_sizes(1, 0.5) == (1, 0)


def test_collator_pads_and_masks_causal_labels() -> None:
    items = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    b = Collator(pad_token_id=0, causal_lm=True)(items)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    b = Collator(pad_token_id=0, causal_lm=False)(
        [{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}]
    )
    assert b["labels"].tolist() == [1, 0] and b["input_ids"].tolist() == [[1, 2], [3, 0]]


# --- checkpoints -------------------------------------------------------------------------------


def _save(out: Path, step: int) -> str:
    """A real (single-process) DCP checkpoint through the trainer's write/commit protocol."""
    st = ckpt.TrainState(step=step, epoch=1, sample_pos=16, total_steps=10, world_size=2, extra={"a": 1})
    ckdir = ckpt.checkpoints_dir(str(out))
    tmp = ckpt.new_tmp_dir(ckdir, step)
    ckpt.write_shards(tmp, {"model": {"w": torch.full((2,), float(step))}}, 0, ckpt.capture_rng())
    return str(ckpt.commit(tmp, ckdir, st))


def test_checkpoint_selection_ignores_incomplete_and_temporary(tmp_path: Path) -> None:
    ckdir = Path(ckpt.checkpoints_dir(str(tmp_path)))
    _save(tmp_path, 3)
    _save(tmp_path, 6)
    (ckdir / "step-9").mkdir()  # crashed mid-write without the marker (not our protocol, but be safe)
    (ckdir / "step-9" / "model.pt").write_bytes(b"partial")
    (ckdir / ".tmp-step-12-abcd").mkdir()
    (ckdir / "step-x").mkdir()
    assert ckpt.latest_complete(str(ckdir)) == (6, str(ckdir / "step-6"))
    assert [s for s, _ in ckpt.list_complete(str(ckdir))] == [3, 6]
    ckpt.remove_stale(str(ckdir))
    assert sorted(os.listdir(ckdir)) == ["step-3", "step-6", "step-x"]
    path = str(ckdir / "step-6")
    assert ckpt.validate(path) is None
    st = ckpt.read_state(path)
    assert st.step == 6 and st.sample_pos == 16 and st.world_size == 2 and st.extra == {"a": 1}
    loaded = {"model": {"w": torch.zeros(2)}}
    ckpt.load_shards(path, loaded)
    assert loaded["model"]["w"].tolist() == [6.0, 6.0]
    assert ckpt.load_rng(path, 0) is not None and ckpt.load_rng(path, 1) is None


def test_checkpoint_keeps_newest_two_and_resaves_atomically(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        _save(tmp_path, s)
    ckdir = Path(ckpt.checkpoints_dir(str(tmp_path)))
    assert sorted(os.listdir(ckdir)) == ["step-6", "step-8"]
    _save(tmp_path, 8)  # same step again (e.g. after a resume): replaced, still complete
    assert sorted(os.listdir(ckdir)) == ["step-6", "step-8"]
    assert (ckdir / "step-8" / "complete").is_file()


def test_quarantined_checkpoint_is_skipped_then_removed(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    bad = _save(tmp_path, 4)
    ckdir = ckpt.checkpoints_dir(str(tmp_path))
    moved = ckpt.quarantine(bad)
    assert os.path.basename(moved).startswith(".corrupt-step-4-")
    assert ckpt.latest_complete(ckdir) == (2, os.path.join(ckdir, "step-2"))
    assert ckpt.remove_stale(ckdir) == [os.path.basename(moved)]
    assert sorted(os.listdir(ckdir)) == ["step-2"]


def test_validate_finds_truncated_and_missing_shards(tmp_path: Path) -> None:
    path = Path(_save(tmp_path, 4))
    shard = next((path / "dcp").glob("*.distcp"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1)
    assert "truncated" in (ckpt.validate(str(path)) or "")
    shard.unlink()
    assert "missing" in (ckpt.validate(str(path)) or "")
    (path / "dcp" / ".metadata").write_bytes(b"garbage")
    assert "metadata" in (ckpt.validate(str(path)) or "")


def test_rng_round_trip() -> None:
    import random

    import numpy as np

    st = ckpt.capture_rng()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng(st)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def _tiny_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def _checkpointer(
    out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, attempt: int = 0
) -> ckpt.Checkpointer:
    return ckpt.Checkpointer(str(out), attempt, DistEnv(), model, opt, torch.device("cpu"), lora=False)


def test_checkpointer_resumes_the_newest_loadable_checkpoint(tmp_path: Path) -> None:
    model, opt = _tiny_model()
    c = _checkpointer(tmp_path, model, opt)
    assert c.resume() is None  # nothing saved yet
    _one_step(model, opt)
    c.save(ckpt.TrainState(step=1, epoch=0, sample_pos=8, world_size=1))
    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    _one_step(model, opt)
    c.save(ckpt.TrainState(step=2, epoch=0, sample_pos=16, world_size=1))
    after_two = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt = _tiny_model()
    state = _checkpointer(tmp_path, fresh, fresh_opt).resume()
    assert state is not None and (state.step, state.sample_pos) == (2, 16)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, after_two[k])
    assert fresh_opt.state  # the AdamW moments came back too

    shard = next((tmp_path / "checkpoints" / "step-2" / "dcp").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    fresh, fresh_opt = _tiny_model()
    state = _checkpointer(tmp_path, fresh, fresh_opt).resume()  # falls back before touching a tensor
    assert state is not None and state.step == 1
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, after_one[k])


def test_checkpointer_writes_nothing_once_a_newer_attempt_owns_the_output(tmp_path: Path) -> None:
    out_mod.claim(str(tmp_path), "uid", "ns/job", 3)
    model, opt = _tiny_model()
    with pytest.raises(out_mod.Superseded):
        _checkpointer(tmp_path, model, opt, attempt=2).save(ckpt.TrainState(step=1))
    assert not (tmp_path / "checkpoints").exists()
    _checkpointer(tmp_path, model, opt, attempt=3).save(ckpt.TrainState(step=1))
    assert ckpt.latest_complete(ckpt.checkpoints_dir(str(tmp_path))) is not None


def test_parallelize_a_single_process_model_with_rank0_weights() -> None:
    d = DistEnv()
    source = torch.nn.Linear(3, 2)
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    plan = strategy.make_plan(
        model, ParallelismConfig(strategy="fsdp"), strategy.FP32, torch.device("cpu"), d
    )
    assert plan.strategy == "ddp" and "single process" in plan.why and plan.mesh() is None
    assert plan.estimate.params == plan.estimate.trainable == 8
    weights = strategy.RankZeroWeights(dict(source.state_dict()), {})
    par = strategy.parallelize(model, plan.mesh(), plan, weights)
    assert par.model is model and par.module is model and model.training
    assert weights.state_dict is None  # the full copy is dropped once loaded
    torch.testing.assert_close(model.weight, source.weight)
    assert par.precision == strategy.FP32 and par.activation_checkpointing is None
    with par.gradient_sync(False):  # no process group: nothing to defer
        model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None


# --- metrics, progress, errors, dist -----------------------------------------------------------


def test_metrics_server_serves_metrics_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    m = TrainerMetrics(node_rank=1, with_gpu=False)
    port = _free_port()
    server = start_metrics_server(m, port)
    assert server is not None
    try:
        rec = progress_record(5, 20, 1, 0.5, 10.0, 100.0, 15)
        m.set_progress(rec)
        m.samples.inc(32)
        m.checkpoints.inc()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5) as r:
            assert json.loads(r.read()) == rec
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'tauon_trainer_step{node_rank="1"} 5.0' in text
        assert 'tauon_trainer_total_steps{node_rank="1"} 20.0' in text
        assert 'tauon_trainer_samples_total{node_rank="1"} 32.0' in text
        assert 'tauon_trainer_checkpoints_total{node_rank="1"} 1.0' in text
        assert "tauon_trainer_gpu_memory_allocated_bytes" not in text
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        # a second server on the busy port: warning, no exception
        assert start_metrics_server(TrainerMetrics(0, False), port) is None
        assert "metrics port" in capsys.readouterr().err
        assert start_metrics_server(m, 0) is None  # 0 disables
    finally:
        server.close()


def test_progress_record_and_reporter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = progress_record(3, 12, 1, 0.25, 8.0, 90.0, 9.4)
    assert rec["percent"] == 25.0 and rec["etaSeconds"] == 9 and rec["updatedAt"].endswith("Z")
    rep = ProgressReporter(str(tmp_path), None, interval_s=3600)
    rep.update(rec, force=True)
    rep.update(progress_record(4, 12, 1, 0.2, 8.0, 90.0, 7), force=False)  # throttled
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 3
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(LOG_PREFIX) and json.loads(out[0][len(LOG_PREFIX) :]) == rec
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_permanent_error_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "term"
    monkeypatch.setenv("TAUON_TERMINATION_LOG", str(log))
    assert report_permanent(PermanentError("InvalidLabel", "f.jsonl:3: field 'label'\n= 9")) == 2
    assert capsys.readouterr().err == "tauon-trainer: error: InvalidLabel: f.jsonl:3: field 'label' = 9\n"
    assert json.loads(log.read_text()) == {
        "retryable": False,
        "reason": "InvalidLabel",
        "message": "f.jsonl:3: field 'label' = 9",
    }
    monkeypatch.setenv("TAUON_TERMINATION_LOG", str(tmp_path / "no" / "such" / "dir"))
    assert write_termination_log({"x": 1}) is False  # unwritable: ignored


def test_dist_env() -> None:
    assert DistEnv.from_env({"WORLD_SIZE": "4", "NODE_RANK": "1"}) == DistEnv(node_rank=1)  # not torchrun
    d = DistEnv.from_env(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    )
    assert (d.rank, d.local_rank, d.world_size, d.node_rank, d.distributed, d.is_main) == (
        3,
        1,
        4,
        1,
        True,
        False,
    )
    assert choose_backend({"TAUON_DIST_BACKEND": "gloo"}, cuda=True) == "gloo"
    assert choose_backend({}, cuda=True) == "nccl" and choose_backend({}, cuda=False) == "gloo"


# --- permanent errors through the entry point (in process; no model is loaded) ------------------


def _bad_cases(tmp: Path) -> list[tuple[str, dict[str, Any] | str | None, str, str]]:
    (tmp / "ok.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    (tmp / "nolabel.jsonl").write_text('{"text": "good"}\n')
    (tmp / "notext.csv").write_text("body,label\nhello,1\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "range.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n')
    (tmp / "word.jsonl").write_text('{"text": "a", "label": "positive"}\n')
    ok = str(tmp / "ok.jsonl")
    return [
        (
            "DatasetNotFound",
            {"dataset": {"path": str(tmp / "missing.jsonl")}},
            "DatasetNotFound",
            "missing.jsonl",
        ),
        (
            "MissingColumn-label",
            {"dataset": {"path": str(tmp / "nolabel.jsonl")}},
            "MissingColumn",
            "nolabel.jsonl:1: field 'label' missing",
        ),
        (
            "MissingColumn-text",
            {"dataset": {"path": str(tmp / "notext.csv"), "format": "csv"}},
            "MissingColumn",
            "column 'text' not in the csv header",
        ),
        (
            "EmptyDataset",
            {"dataset": {"path": str(tmp / "empty.jsonl")}},
            "EmptyDataset",
            "empty.jsonl: no rows",
        ),
        (
            "InvalidLabel-range",
            {"dataset": {"path": str(tmp / "range.jsonl")}},
            "InvalidLabel",
            "range.jsonl:2: field 'label' = 5 is outside 0..1",
        ),
        (
            "InvalidLabel-word",
            {"dataset": {"path": str(tmp / "word.jsonl")}},
            "InvalidLabel",
            "word.jsonl:1: field 'label' must be an integer",
        ),
        (
            "ModelNotFound-dir",
            {"dataset": {"path": ok}, "model": {"path": str(tmp / "no-model")}},
            "ModelNotFound",
            "no-model not found",
        ),
        (
            "ModelNotFound-hf",
            {"dataset": {"path": ok}, "model": {"path": "hf://tauon-test/no-such-model"}},
            "ModelNotFound",
            "hf://tauon-test/no-such-model",
        ),
        (
            "InvalidConfig-epochs",
            {"dataset": {"path": ok}, "hyperparameters": {"epochs": 0}},
            "InvalidConfig",
            "hyperparameters.epochs must be >= 1",
        ),
        ("InvalidConfig-json", "{not json", "InvalidConfig", "invalid JSON"),
        ("InvalidConfig-missing", None, "InvalidConfig", "not found"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases(Path("/tmp"))])
def test_bad_input_exits_2_with_one_line_and_termination_message(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tauon_train.train import main

    for k, v in env(tmp_path).items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    _, patch, reason, needle = next(c for c in _bad_cases(tmp_path) if c[0] == case)
    cfg_path = tmp_path / "job.json"
    if isinstance(patch, dict):
        cfg_path.write_text(json.dumps(job(tmp_path / "out", **patch)))
    elif isinstance(patch, str):
        cfg_path.write_text(patch)
    assert main(["--config", str(cfg_path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"tauon-trainer: error: {reason}: ") and needle in err[0], err[0]
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["retryable"] is False and term["reason"] == reason and needle in term["message"]
    assert not (tmp_path / "out" / "checkpoints").exists()  # failed before any training work
