"""Pure step arithmetic and the learning-rate schedule (unit-tested; no torch state)."""

from __future__ import annotations

import math


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def micro_batches_per_epoch(n_train: int, batch: int, world: int) -> int:
    """Micro-batches each rank sees per epoch (DistributedSampler pads to a multiple of world)."""
    return ceil_div(ceil_div(n_train, world), batch)


def steps_per_epoch(n_train: int, batch: int, world: int, accum: int) -> int:
    """Optimizer steps per epoch = ceil(n / (batch x world x accum)); a trailing partial group steps too."""
    return ceil_div(micro_batches_per_epoch(n_train, batch, world), accum)


def total_steps(n_train: int, batch: int, world: int, accum: int, epochs: int, max_steps: int | None) -> int:
    if max_steps:
        return max_steps
    return epochs * steps_per_epoch(n_train, batch, world, accum)


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return math.ceil(total * warmup_ratio)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based, before stepping).

    Linear warmup from 0 over ``warmup`` steps, then linear decay to 0 at ``total``.
    """
    if warmup > 0 and step < warmup:
        return step / warmup
    if total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))


class LinearWarmupDecay:
    """Picklable lambda for torch.optim.lr_scheduler.LambdaLR."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup)
