"""The trainer's periodic evaluation (hyperparameters.evalEverySteps): when it is due, the history it
reports (thinned to 100 points), the config field, the progress record and the termination message's
new keys and size cap. Pure pieces plus one real evaluate() on a tiny model (train mode restored)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from tauon_core.errors import PermanentError
from tauon_train.config import parse_config
from tauon_train.data import Collator
from tauon_train.dist import DistEnv
from tauon_train.evaluate import MAX_EVALUATIONS, EvalResult, PeriodicEvaluations, evaluate, thin
from tauon_train.final import TERMINATION_METRICS, termination_payload
from tauon_train.metrics import log_record, progress_record
from tauon_train.strategy import FP32
from tests.workload.helpers import job

# --- due() -------------------------------------------------------------------------------------------


def test_due_every_n_steps() -> None:
    pe = PeriodicEvaluations(every=5, validation_samples=10)
    assert pe.enabled and pe.note is None
    assert [s for s in range(0, 23) if pe.due(s)] == [5, 10, 15, 20]


def test_every_one_is_due_at_every_step_but_not_before_the_first() -> None:
    pe = PeriodicEvaluations(every=1, validation_samples=1)
    assert not pe.due(0)
    assert all(pe.due(s) for s in range(1, 50))


def test_unset_is_never_due() -> None:
    pe = PeriodicEvaluations(every=None, validation_samples=100)
    assert not pe.enabled and pe.note is None
    assert not any(pe.due(s) for s in range(0, 1000))


def test_no_validation_samples_is_never_due_and_says_why_once() -> None:
    pe = PeriodicEvaluations(every=3, validation_samples=0)
    assert not pe.enabled
    assert not any(pe.due(s) for s in range(0, 100))
    assert pe.note is not None and "evalEverySteps=3" in pe.note and "validation split is empty" in pe.note
    assert pe.records() == []


def test_every_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="evalEverySteps must be >= 1"):
        PeriodicEvaluations(every=0, validation_samples=5)


# --- record() / records() ------------------------------------------------------------------------------


def test_records_are_ascending_rounded_and_null_when_not_finite() -> None:
    pe = PeriodicEvaluations(every=2, validation_samples=4)
    pe.record(4, 0.5, EvalResult(loss=0.25, accuracy=0.75))
    pe.record(2, 0.123456789, EvalResult(loss=float("nan"), accuracy=None))
    recs = pe.records()
    assert [r["step"] for r in recs] == [2, 4]
    assert recs[0] == {"step": 2, "trainLoss": 0.123457, "evalLoss": None, "evalAccuracy": None}
    assert recs[1] == {"step": 4, "trainLoss": 0.5, "evalLoss": 0.25, "evalAccuracy": 0.75}
    json.dumps(recs, allow_nan=False)  # what /progress sends must be strict JSON
    recs[0]["step"] = 99  # copies: the caller cannot change the history
    assert pe.records()[0]["step"] == 2


def test_a_later_evaluation_of_the_same_step_wins() -> None:
    pe = PeriodicEvaluations(every=1, validation_samples=4)
    pe.record(1, 1.0, EvalResult(loss=2.0))
    pe.record(1, 1.0, EvalResult(loss=1.5))
    assert pe.records() == [{"step": 1, "trainLoss": 1.0, "evalLoss": 1.5, "evalAccuracy": None}]


def test_history_stays_bounded_and_keeps_first_and_newest() -> None:
    pe = PeriodicEvaluations(every=1, validation_samples=4)
    for step in range(1, 1001):
        pe.record(step, 1.0 / step, EvalResult(loss=2.0 / step))
        assert len(pe.records()) <= MAX_EVALUATIONS
    steps = [r["step"] for r in pe.records()]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert steps[0] == 1 and steps[-1] == 1000
    # recent points are dense, old ones sparse: the newest 20 steps are all there
    assert steps[-20:] == list(range(981, 1001))
    assert len(steps) > MAX_EVALUATIONS // 2  # thinning removes only what it must (roughly)


# --- thin() ------------------------------------------------------------------------------------------


def test_thin_leaves_short_histories_alone() -> None:
    xs = list(range(100))
    assert thin(xs) == xs
    assert thin([]) == []


def test_thin_drops_every_other_of_the_oldest_half() -> None:
    xs = list(range(101))
    out = thin(xs)
    assert out == list(range(0, 50, 2)) + list(range(50, 101))
    assert len(out) == 76


def test_thin_any_length_to_the_limit() -> None:
    for n in (3, 10, 101, 150, 200, 201, 999):
        for limit in (2, 3, 7, 100):
            out = thin(list(range(n)), limit)
            assert len(out) <= limit
            assert out == sorted(out) and out[0] == 0
            if n > limit:
                assert out[-1] == n - 1  # the newest point always stays
            else:
                assert out == list(range(n))


def test_thin_needs_a_limit_of_two() -> None:
    with pytest.raises(ValueError, match="limit must be >= 2"):
        thin([1, 2, 3], 1)


# --- config ------------------------------------------------------------------------------------------


def _hp(tmp_path: Path, **hp: Any) -> dict[str, Any]:
    raw = job(tmp_path / "out")
    raw["hyperparameters"] = {**raw.get("hyperparameters", {}), **hp}
    return raw


def test_config_eval_every_steps(tmp_path: Path) -> None:
    assert parse_config(job(tmp_path / "out")).hyperparameters.eval_every_steps is None
    assert parse_config(_hp(tmp_path, evalEverySteps=None)).hyperparameters.eval_every_steps is None
    assert parse_config(_hp(tmp_path, evalEverySteps=25)).hyperparameters.eval_every_steps == 25
    assert parse_config(_hp(tmp_path, evalEverySteps=25.0)).hyperparameters.eval_every_steps == 25


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "must be >= 1"),
        (-3, "must be >= 1"),
        (2**31, "must be <= "),
        (2.5, "must be an integer"),
        ("10", "must be an integer"),
        (True, "must be an integer"),
    ],
)
def test_config_eval_every_steps_errors_name_the_field(tmp_path: Path, value: Any, words: str) -> None:
    with pytest.raises(PermanentError) as e:
        parse_config(_hp(tmp_path, evalEverySteps=value))
    assert e.value.reason == "InvalidConfig"
    assert "hyperparameters.evalEverySteps" in e.value.message and words in e.value.message


# --- the progress record and the log line --------------------------------------------------------------


def test_progress_record_carries_evaluations_only_when_given() -> None:
    assert "evaluations" not in progress_record(3, 10, 1, 0.5, None, None, None)
    evals: list[dict[str, float | int | None]] = [
        {"step": 2, "trainLoss": 0.6, "evalLoss": 0.7, "evalAccuracy": None}
    ]
    rec = progress_record(3, 10, 1, 0.5, None, None, None, evaluations=evals)
    assert rec["evaluations"] == evals
    evals[0]["step"] = 5
    assert rec["evaluations"][0]["step"] == 2  # the record holds its own copy
    assert progress_record(3, 10, 1, 0.5, None, None, None, evaluations=[])["evaluations"] == []


def test_log_line_keeps_only_the_newest_evaluation() -> None:
    evals: list[dict[str, float | int | None]] = [
        {"step": s, "trainLoss": 1.0, "evalLoss": 1.0, "evalAccuracy": None} for s in (2, 4, 6)
    ]
    rec = progress_record(6, 10, 1, 0.5, None, None, None, evaluations=evals)
    line = log_record(rec)
    assert "evaluations" not in line and line["lastEvaluation"]["step"] == 6
    assert line["step"] == 6 and rec["evaluations"] == evals  # the record itself is untouched
    none_yet = log_record(progress_record(1, 10, 1, 0.5, None, None, None, evaluations=[]))
    assert "evaluations" not in none_yet and "lastEvaluation" not in none_yet
    plain = progress_record(1, 10, 1, 0.5, None, None, None)
    assert log_record(plain) == plain


# --- evaluate() mid-training -----------------------------------------------------------------------------


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.modes.append(self.training)
        x = self.drop(self.emb(input_ids)) * attention_mask.unsqueeze(-1)
        return SimpleNamespace(logits=self.head(x.mean(1)))


def test_periodic_evaluation_runs_in_eval_mode_and_restores_train_mode() -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    model.train()
    ds: Any = [{"input_ids": torch.tensor([1 + i % 5, 2, 3]), "label": i % 2} for i in range(7)]
    collate = Collator(0, "sequence-classification")
    ev = evaluate(model, ds, collate, 3, DistEnv(), torch.device("cpu"), FP32)
    assert model.training, "training must continue in train mode after a periodic evaluation"
    assert model.modes and not any(model.modes), "evaluation must run in eval mode (no dropout)"
    assert ev.samples == 7 and ev.loss is not None and math.isfinite(ev.loss)
    assert ev.accuracy is not None and 0.0 <= ev.accuracy <= 1.0
    again = evaluate(model, ds, collate, 3, DistEnv(), torch.device("cpu"), FP32)
    assert again.loss == ev.loss  # eval mode: deterministic (dropout off)
    model.eval()
    evaluate(model, ds, collate, 3, DistEnv(), torch.device("cpu"), FP32)
    assert not model.training  # an evaluation outside training leaves eval mode alone


def test_train_mode_restored_when_evaluation_fails() -> None:
    model = TinyClassifier()
    model.train()
    ds: Any = [{"input_ids": torch.tensor([99]), "label": 0}]  # out of the embedding's range
    with pytest.raises(IndexError):
        evaluate(model, ds, Collator(0, "sequence-classification"), 1, DistEnv(), torch.device("cpu"), FP32)
    assert model.training


# --- the termination message -------------------------------------------------------------------------------


def test_termination_carries_compile_and_checkpoint_stall_seconds() -> None:
    assert {"compileSeconds", "checkpointStallSeconds"} <= set(TERMINATION_METRICS)
    m: dict[str, Any] = {
        "trainLoss": 0.5,
        "evalLoss": None,
        "compileSeconds": 12.5,
        "checkpointStallSeconds": 0.75,
        "trainSeconds": 99.0,  # metrics.json only
    }
    payload = termination_payload(m, {"strategy": "ddp", "compile": True})
    assert payload["metrics"] == {"trainLoss": 0.5, "compileSeconds": 12.5, "checkpointStallSeconds": 0.75}
    assert payload["resolved"] == {"strategy": "ddp", "compile": True}
    without = termination_payload({"trainLoss": 0.5}, {})
    assert without["metrics"] == {"trainLoss": 0.5}


def test_termination_message_fits_its_cap_dropping_the_least_important_first() -> None:
    m: dict[str, Any] = {k: 1.0 for k in TERMINATION_METRICS}
    m["device"] = "cuda (" + "x" * 4000 + ")"
    resolved: dict[str, object] = {
        "strategy": "fsdp",
        "dataset": {"shards": 3, "cacheKey": "ab" * 64},
        "compile": False,
    }
    full = termination_payload(m, resolved, limit=100_000)
    assert set(full["metrics"]) == set(TERMINATION_METRICS)  # type: ignore[arg-type]
    payload = termination_payload(m, resolved)
    size = len(json.dumps(payload, ensure_ascii=False).encode())
    assert size <= 4096
    kept = payload["metrics"]
    assert isinstance(kept, dict) and "trainLoss" in kept and "evalLoss" in kept and "device" not in kept
    assert payload["resolved"] == resolved
    # a tiny cap: metrics go first, then resolved.dataset, then resolved
    small = termination_payload({"trainLoss": 1.0}, resolved, limit=80)
    assert small["metrics"] == {} and small["resolved"] == {"strategy": "fsdp", "compile": False}
    tiny = termination_payload({"trainLoss": 1.0}, resolved, limit=10)
    assert tiny == {"metrics": {}, "resolved": {}}
