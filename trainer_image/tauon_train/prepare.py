"""Everything before the training loop, in the order the run does it.

1. ``prepare`` (every rank, before any process group): the uid and output path checks, the tokenizer, the
   model config and the datasets. A permanent error thus costs no rendezvous and every rank fails the
   same way.
2. ``setup_model``: device, backend and precision; the process group; global rank 0 loads the full
   weights on CPU; every rank builds the model on the meta device, and ``strategy.parallelize`` shards it
   (fsdp) or replicates it (ddp) and fills it with rank 0's weights. A node thus holds one full copy of
   the weights at most (rank 0's), never one per process. Then the AdamW optimizer.
3. ``claim_output``: rank 0 takes the output (owner file, attempt fence) and cleans what a crash left.
4. ``start_state``: where this process starts from the resumed (or a fresh) state, and ``plan_total``,
   the optimizer steps of the run at this world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tauon_core.errors import ATTEMPT_SUPERSEDED, PermanentError

from . import checkpoint as ckpt
from . import data, dist, schedule
from . import output as out_mod
from .checkpoint import TrainState
from .config import Hyperparameters, JobConfig
from .dist import log
from .modeling import (
    apply_lora,
    build_hf_config,
    build_on_meta,
    load_full_model,
    load_tokenizer_for,
    resolve_model_dir,
)
from .strategy import (
    Estimate,
    Parallelized,
    Plan,
    Precision,
    RankZeroWeights,
    make_plan,
    parallelize,
    resolve_precision,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


@dataclass
class Prepared:
    """What the run reads before any process group exists."""

    cfg: JobConfig
    tokenizer: PreTrainedTokenizerBase
    hf_config: PretrainedConfig
    model_dir: str
    train_ds: data.SequenceDataset
    val_ds: data.SequenceDataset | None  # None when there is no validation split
    max_len: int
    output: str  # the real output directory
    attempt: int  # this pod's gang attempt (fences writers of the output)


@dataclass
class Setup:
    """What training needs once the process group exists."""

    parallel: Parallelized
    optimizer: torch.optim.Optimizer
    plan: Plan
    device: torch.device
    backend: str
    trainable: list[nn.Parameter] = field(default_factory=list)  # what clipping sees, built once

    def __post_init__(self) -> None:
        if not self.trainable:
            self.trainable = [p for p in self.module.parameters() if p.requires_grad]

    @property
    def model(self) -> nn.Module:
        """What forward and backward run on (DDP wrapper, FSDP module, or the plain model)."""
        return self.parallel.model

    @property
    def module(self) -> nn.Module:
        """The module whose state_dict names are the model's."""
        return self.parallel.module

    @property
    def strategy(self) -> str:
        return self.parallel.strategy

    @property
    def precision(self) -> Precision:
        return self.parallel.precision

    @property
    def estimate(self) -> Estimate:
        return self.plan.estimate


def output_mount(cfg: JobConfig) -> str | None:
    """The volume mounted for the output: ``output.mountPath`` in job.json, else $TAUON_OUTPUT_MOUNT; None
    for an ``s3://`` output (no volume: containment is the prefix itself)."""
    if cfg.output.path.startswith("s3://"):
        return None
    out = cfg.raw.get("output") if isinstance(cfg.raw, dict) else None
    mp = out.get("mountPath") if isinstance(out, dict) else None
    if isinstance(mp, str) and mp.strip():
        return mp
    env = os.environ.get("TAUON_OUTPUT_MOUNT", "").strip()
    return env or None


def prepare(cfg: JobConfig, d: dist.DistEnv) -> Prepared:
    """Everything that can fail permanently, done on every rank before any process group exists."""
    out_mod.check_uid(cfg.uid)
    output = out_mod.check_output_path(cfg.output.path, output_mount(cfg))
    attempt = out_mod.current_attempt(cfg.attempt)
    model_dir = resolve_model_dir(cfg.model.path) if cfg.model.path else ""
    tokenizer = load_tokenizer_for(cfg, model_dir)
    hf_config = build_hf_config(cfg, model_dir, tokenizer)
    limit = _config_limit(hf_config, tokenizer)
    max_len = cfg.hyperparameters.max_seq_length
    if limit is not None and max_len > limit:
        log(d, f"warning: maxSeqLength {max_len} > model limit {limit}; using {limit}")
        max_len = limit
    cache: str | None = cfg.dataset.cache_storage or data.default_cache_root(cfg, output)
    if not cfg.dataset.cache_storage:
        # The default cache lies in the output, which claim_output takes only later: another job's output
        # (or results without an owner file) is left untouched (the datasets are then built in memory and
        # claim_output refuses the output); a stale attempt of this job stops here, before writing.
        owner = out_mod.read_owner(output)
        if owner is not None and cfg.uid and owner.get("uid") != cfg.uid:
            cache = None
        elif owner is None and cfg.uid and out_mod.has_results(output):
            cache = None
        else:
            out_mod.check_fence(output, attempt)
    train_ds, val_ds = data.build_datasets(
        cfg,
        tokenizer,
        max_len,
        cache=cache,
        use_cache=cache is not None,
        rank=d.rank,
        world=d.world_size,
        attempt=attempt,
    )
    if train_ds.report is not None:
        log(d, train_ds.report.describe())
    return Prepared(cfg, tokenizer, hf_config, model_dir, train_ds, val_ds, max_len, output, attempt)


def _config_limit(hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    limits = []
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(hf_config, attr, None)
        if isinstance(v, int) and v > 0:
            limits.append(v)
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    return min(limits) if limits else None


BUCKET = 64  # with compile on, batches are padded to a multiple of this many tokens (up to max_len)


def bucket_length(width: int, max_len: int, multiple: int = BUCKET) -> int:
    """The padded length of a batch ``width`` tokens wide: the next multiple of ``multiple``, at most
    ``max_len`` (never shorter than ``width``)."""
    return max(width, min(max_len, -(-width // multiple) * multiple))


class BucketedCollator(data.Collator):
    """``data.Collator``, then padded on the right to ``bucket_length`` (compiled blocks see a few fixed
    lengths, not one per batch): input_ids with the pad id, labels -100, attention_mask 0; packed
    position_ids continue each row's padding segment (or start one at 0), as the collator pads."""

    def __init__(self, pad_id: int | None, task: str, packed: bool, max_len: int) -> None:
        super().__init__(pad_id, task, packed)
        self.max_len = max_len

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        width = batch["input_ids"].shape[1]
        target = bucket_length(width, self.max_len)
        if target == width:
            return batch
        if "attention_mask" not in batch and "position_ids" not in batch:  # unpadded causal batch
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        fill = {"input_ids": self.pad, "labels": data.IGNORE, "attention_mask": 0}
        out = {
            k: torch.nn.functional.pad(v, (0, target - width), value=fill[k])
            if k in fill and v.dim() == 2
            else v
            for k, v in batch.items()
        }
        if "position_ids" in batch:
            lengths = torch.tensor([len(it["input_ids"]) for it in items])
            cols = torch.arange(width, target)
            tail = cols[None, :] - lengths[:, None]
            out["position_ids"] = torch.cat([batch["position_ids"], tail], dim=1)
        return out


def make_collator(prep: Prepared, compiled: bool) -> data.Collator:
    """The batches of training and evaluation: padded to the longest item, or to ``bucket_length``
    when the blocks are compiled."""
    cfg = prep.cfg
    pad, task, packed = prep.tokenizer.pad_token_id, cfg.model.task, cfg.dataset.packing
    if compiled:
        return BucketedCollator(pad, task, packed, prep.max_len)
    return data.Collator(pad, task, packed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "initial_lr": lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "initial_lr": lr})
    return torch.optim.AdamW(groups, lr=lr, fused=fused_adamw(decay + no_decay))


def fused_adamw(params: list[nn.Parameter]) -> bool:
    """The fused AdamW kernel (one launch per parameter group instead of several per tensor) when every
    parameter is on a CUDA device; the default (foreach) elsewhere, where no fused CPU kernel is faster."""
    return bool(params) and all(p.device.type == "cuda" for p in params)


def setup_model(prep: Prepared, d: dist.DistEnv) -> Setup:
    """The process group, the model laid out by its strategy with rank 0's weights, and the optimizer."""
    cfg, hp = prep.cfg, prep.cfg.hyperparameters
    device = dist.choose_device(d)
    backend = dist.choose_backend()
    prec = resolve_precision(hp.precision, device, d)
    dist.init(d, backend, device)

    weights = _rank0_weights(prep, d)
    base = build_on_meta(cfg, prep.hf_config)
    lora = cfg.method.lora
    model: nn.Module = apply_lora(base, lora, cfg.model.task) if lora is not None else base
    if cfg.dataset.packing:
        data.disable_kv_cache(model)
    plan = make_plan(model, cfg.parallelism, prec, device, d)
    log(d, plan.describe())
    par = parallelize(model, plan.mesh(), plan, weights)
    if par.compiled_blocks:
        log(d, f"compile: {par.compiled_blocks} blocks under torch.compile; batches padded to {BUCKET}s")
    elif plan.compile:
        log(d, "warning: compile: no transformer blocks found in this model; it runs eagerly")
    if par.activation_checkpointing:
        log(d, "activation checkpointing: on (each block's activations are recomputed in backward)")
    elif par.activation_checkpointing is False:
        log(d, "warning: this model does not support activation checkpointing; ignored")
    optimizer = make_optimizer(par.module, hp.learning_rate, hp.weight_decay)
    return Setup(par, optimizer, plan, device, backend)


def _rank0_weights(prep: Prepared, d: dist.DistEnv) -> RankZeroWeights:
    """On global rank 0: the full state dict (CPU) and the non-persistent buffers; a permanent error there
    is raised on every rank."""
    cfg = prep.cfg
    weights, error = RankZeroWeights(None, None), None
    if d.is_main:
        try:
            base = load_full_model(
                cfg, prep.model_dir, prep.hf_config, prep.tokenizer, cfg.hyperparameters.seed
            )
            lora = cfg.method.lora
            full: nn.Module = apply_lora(base, lora, cfg.model.task) if lora is not None else base
            sd = full.state_dict()
            buffers = {n: b.detach().clone() for n, b in full.named_buffers() if n not in sd}
            weights = RankZeroWeights(sd, buffers)
        except PermanentError as e:
            error = (e.reason, e.message)
    error = dist.broadcast_object(d, error)
    if error is not None:
        raise PermanentError(error[0], error[1])
    return weights


def claim_output(prep: Prepared, d: dist.DistEnv) -> None:
    """Rank 0 takes the output (owner file, attempt), cleans what a crash left; every rank learns the
    outcome, so all fail the same way (an unreachable store included: retryable, ``StorageUnreachable``)."""
    from tauon_core.errors import RetryableError

    cfg = prep.cfg
    result: tuple[str, str, str] | None = None
    if d.is_main:
        try:
            out_mod.claim(prep.output, cfg.uid, f"{cfg.namespace}/{cfg.name}", prep.attempt)
            for what in out_mod.clean_stale(prep.output):
                log(d, f"output: {what}")
            removed = ckpt.remove_stale(ckpt.checkpoints_dir(prep.output))
            if removed:
                log(d, f"removed incomplete checkpoints: {', '.join(sorted(removed))}")
        except PermanentError as e:
            result = ("permanent", e.reason, e.message)
        except RetryableError as e:
            result = ("retryable", e.reason, e.message)
        except out_mod.Superseded as e:
            result = ("superseded", ATTEMPT_SUPERSEDED, str(e))
    result = dist.broadcast_object(d, result)
    if result is None:
        return
    if result[0] == "permanent":
        raise PermanentError(result[1], result[2])
    if result[0] == "retryable":
        raise RetryableError(result[1], result[2])
    raise out_mod.Superseded(result[2])


def plan_total(state: TrainState, n: int, hp: Hyperparameters, world: int) -> int:
    """Optimizer steps of the whole run at this world size (the steps done so far count as they were)."""
    if hp.max_steps:
        return int(hp.max_steps)
    B, A = hp.batch_size_per_device, hp.gradient_accumulation_steps
    per_epoch = schedule.ceil_div(data.num_batches(n, world, B), A)
    this = (
        schedule.ceil_div(data.num_batches(n - state.sample_pos, world, B), A)
        if state.epoch < hp.epochs
        else 0
    )
    later = max(0, hp.epochs - state.epoch - 1) * per_epoch
    return state.step + this + later


def start_state(state: TrainState, n: int, cfg: JobConfig, d: dist.DistEnv, strategy: str) -> int:
    """Make the resumed (or fresh) ``state`` this process's: an epoch the checkpoint finished rolls over,
    the plan is recomputed for this world size and the next checkpoints record who wrote them. Returns
    the total optimizer steps."""
    if state.sample_pos >= n:  # saved at the very end of an epoch
        state.epoch, state.sample_pos = state.epoch + 1, 0
    total = plan_total(state, n, cfg.hyperparameters, d.world_size)
    state.total_steps, state.world_size, state.strategy, state.owner_uid = (
        total,
        d.world_size,
        strategy,
        cfg.uid,
    )
    return total


def describe(prep: Prepared, s: Setup, d: dist.DistEnv) -> str:
    """The run in one log line."""
    cfg = prep.cfg
    return (
        f"world_size={d.world_size} backend={s.backend if d.distributed else 'none'} device={s.device} "
        f"precision={s.precision.name} strategy={s.strategy} train={len(prep.train_ds)} "
        f"eval={len(prep.val_ds) if prep.val_ds is not None else 0} max_len={prep.max_len} "
        f"method={cfg.method.type} task={cfg.model.task} init={cfg.model.init}"
    )
