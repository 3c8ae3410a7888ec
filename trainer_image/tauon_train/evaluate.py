"""Evaluation on the validation split, before the first step and after the last one.

Each rank evaluates a strided shard of the validation set; every rank runs the same number of forward
passes (FSDP gathers parameters in each), a rank out of samples repeats sample 0 and ignores the result.
The sums are all-reduced once: loss and perplexity per target token (causal-lm), loss and accuracy per
sample (sequence-classification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    causal = collate.causal_lm
    was_training = model.training
    model.eval()
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
    sums = dist.all_reduce_sum(d, sums.to(device) if device.type == "cuda" else sums).cpu()
    if was_training:
        model.train()
    count = float(sums[2])
    if count == 0:
        return EvalResult()
    loss = float(sums[0]) / count
    if causal:
        return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), samples=len(ds))
    return EvalResult(loss=loss, accuracy=float(sums[1]) / count, samples=len(ds))
