"""Evaluation on the validation split: before the first step, every ``hyperparameters.evalEverySteps``
optimizer steps (``PeriodicEvaluations``: when, and the history rank 0 reports) and after the last one.

Each rank evaluates a strided shard of the validation set; every rank runs the same number of forward
passes (FSDP gathers parameters in each), a rank out of samples repeats sample 0 and ignores the result.
The sums are all-reduced once: loss and perplexity per target token (causal-lm), loss and accuracy per
sample (sequence-classification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from . import dist, schedule
from .data import Collator, SequenceDataset
from .strategy import Precision


@dataclass
class EvalResult:
    loss: float | None = None
    accuracy: float | None = None
    perplexity: float | None = None
    samples: int = 0

    def describe(self) -> str:
        return f"loss={_fmt(self.loss)} accuracy={_fmt(self.accuracy)} perplexity={_fmt(self.perplexity)}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _forward_kwargs(batch: dict[str, torch.Tensor], causal: bool) -> dict[str, torch.Tensor]:
    if causal:
        return batch
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: SequenceDataset | None,
    collate: Collator,
    batch_size: int,
    d: dist.DistEnv,
    device: torch.device,
    prec: Precision,
) -> EvalResult:
    """The validation metrics of ``model`` over ``ds`` (None or empty: no metrics)."""
    if ds is None or len(ds) == 0:
        return EvalResult()
    was_training = model.training
    model.eval()
    try:
        sums = _sums(model, ds, collate, batch_size, d, device, prec)
    finally:
        if was_training:
            model.train()  # a periodic evaluation runs mid-training: dropout etc. back on
    count = float(sums[2])
    if count == 0:
        return EvalResult()
    loss = float(sums[0]) / count
    if collate.causal_lm:
        return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), samples=len(ds))
    return EvalResult(loss=loss, accuracy=float(sums[1]) / count, samples=len(ds))


def _sums(
    model: nn.Module,
    ds: SequenceDataset,
    collate: Collator,
    batch_size: int,
    d: dist.DistEnv,
    device: torch.device,
    prec: Precision,
) -> torch.Tensor:
    """(loss sum, correct, count) over every rank's shard, all-reduced (a collective: every rank calls it)."""
    causal = collate.causal_lm
    sums = torch.zeros(3, dtype=torch.float64)  # loss_sum, correct, count (samples or tokens)
    shard = list(range(d.rank, len(ds), d.world_size))
    n_batches = schedule.ceil_div(schedule.ceil_div(len(ds), d.world_size), batch_size)
    for k in range(n_batches):
        b = shard[k * batch_size : (k + 1) * batch_size]
        weight = 1.0 if b else 0.0
        batch = {key: v.to(device) for key, v in collate([ds[i] for i in (b or [0])]).items()}
        with prec.autocast(device):
            out = model(**_forward_kwargs(batch, causal))
        if causal:
            ntok = int((batch["labels"][:, 1:] != -100).sum().item())
            if ntok == 0:
                continue
            sums[0] += weight * float(out.loss.float().item()) * ntok
            sums[2] += weight * ntok
        else:
            logits = out.logits.float()
            labels = batch["labels"]
            sums[0] += weight * float(
                torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            )
            sums[1] += weight * float((logits.argmax(-1) == labels).sum().item())
            sums[2] += weight * len(b)
    return dist.all_reduce_sum(d, sums.to(device) if device.type == "cuda" else sums).cpu()


# -- periodic evaluation (hyperparameters.evalEverySteps) -------------------------------------------------

MAX_EVALUATIONS = 100  # points in the reported history (the operator keeps as many in status)
T = TypeVar("T")


def thin(points: list[T], limit: int = MAX_EVALUATIONS) -> list[T]:
    """At most ``limit`` points of an ascending history: while longer, every other point of the oldest
    half is dropped (the first point and the newest half stay), so the curve keeps its shape, recent steps
    dense and old ones sparser. The operator thins status.progress.evaluations with the same rule."""
    if limit < 2:
        raise ValueError(f"limit must be >= 2, got {limit}")
    out = list(points)
    while len(out) > limit:
        half = max(2, len(out) // 2)
        out = out[:half:2] + out[half:]
    return out


def _rounded(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


class PeriodicEvaluations:
    """When to evaluate during training (every ``every`` optimizer steps) and the history rank 0 reports
    as ``evaluations`` in its progress record: ``[{"step", "trainLoss", "evalLoss", "evalAccuracy"}]``,
    ascending by step, at most ``limit`` points (``thin``). With no validation samples nothing is ever
    due (``note`` says why, for one log line). Pure: the caller evaluates (every rank: a collective)."""

    def __init__(self, every: int | None = None, validation_samples: int = 0, limit: int = MAX_EVALUATIONS):
        if every is not None and every < 1:
            raise ValueError(f"hyperparameters.evalEverySteps must be >= 1, got {every}")
        self.every = every if validation_samples > 0 else None
        self.limit = limit
        self.note: str | None = (
            f"hyperparameters.evalEverySteps={every} ignored: the validation split is empty "
            "(no periodic evaluation)"
            if every is not None and validation_samples <= 0
            else None
        )
        self._points: dict[int, dict[str, float | int | None]] = {}

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (steps count from 1)."""
        return self.every is not None and step >= 1 and step % self.every == 0

    def record(self, step: int, train_loss: float | None, ev: EvalResult) -> None:
        """The evaluation after ``step`` (a later one for the same step replaces it)."""
        self._points[step] = {
            "step": step,
            "trainLoss": _rounded(train_loss),
            "evalLoss": _rounded(ev.loss),
            "evalAccuracy": _rounded(ev.accuracy),
        }
        if len(self._points) > self.limit:
            kept = thin(sorted(self._points), self.limit)
            self._points = {k: self._points[k] for k in kept}

    def records(self) -> list[dict[str, float | int | None]]:
        """The history, ascending by step (copies)."""
        return [dict(self._points[k]) for k in sorted(self._points)]
