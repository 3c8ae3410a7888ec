"""tauon's fine-tuning trainer.

    torchrun --nnodes N --nproc-per-node P ... -m tauon_train.train --config /etc/tauon/job.json
    python -m tauon_train.train --config job.json          # single process (no torchrun env)

Order of work: check the uid and output path, parse the config, load the tokenizer, model config and
dataset (all before ``init_process_group``, so a permanent error costs no rendezvous and every rank fails
the same way); then rank 0 loads the weights, every rank builds the model on the meta device, shards it
(FSDP2) or replicates it (DDP) and receives rank 0's weights; rank 0 claims the output (owner file,
attempt fence); training resumes from the newest loadable DCP checkpoint; evaluation before and after;
the final Hugging Face model (safetensors) is gathered to rank 0 and swapped in atomically. See
trainer_image/README.md for the files it writes and the exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tauon_core.errors import (
    ATTEMPT_SUPERSEDED,
    EXIT_OK,
    EXIT_RETRYABLE,
    EXIT_SIGTERM,
    PermanentError,
    report_permanent,
    report_retryable,
    write_termination_log,
)

from . import checkpoint as ckpt
from . import data, dist, schedule
from . import output as out_mod
from . import strategy as strategy_mod
from .config import Hyperparameters, JobConfig, load_config
from .metrics import (
    ProgressReporter,
    TrainerMetrics,
    atomic_write_json,
    metrics_port_from_env,
    progress_record,
    start_metrics_server,
)
from .modeling import (
    apply_lora,
    build_hf_config,
    build_on_meta,
    load_full_model,
    load_tokenizer_for,
    resolve_model_dir,
)

MAX_GRAD_NORM = 1.0


class StopRequested(Exception):
    """SIGTERM seen by some rank; all ranks agreed to stop at this step boundary."""


class StopFlag:
    def __init__(self) -> None:
        self.set = False

    def handler(self, signum: int, frame: Any) -> None:
        self.set = True


def start_parent_watchdog(interval_s: float = 1.0) -> None:
    """Under torchrun, exit when the agent dies.

    torchrun starts each worker in its own session, so killing only torchrun (SIGKILL, a crashed agent)
    would leave workers training and writing checkpoints next to the next attempt's. A container kill takes
    everything down anyway; this covers process-backed runs (``tauon run --local``, the dev node).
    """
    parent = os.getppid()
    if parent <= 1:
        return

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print("tauon-trainer: torchrun agent is gone; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_RETRYABLE)

    threading.Thread(target=watch, name="tauon-parent-watchdog", daemon=True).start()


def log(d: dist.DistEnv, msg: str) -> None:
    if d.is_main:
        print(f"tauon-trainer: {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16 (what is actually used)
    dtype: torch.dtype | None  # autocast dtype, None for fp32

    def autocast(self, device: torch.device) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device, d: dist.DistEnv) -> Precision:
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda and torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16)
        return Precision("fp32", None)
    if requested == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            log(d, "warning: bf16 not supported by this GPU; using fp32")
            return Precision("fp32", None)
        return Precision("bf16", torch.bfloat16)
    if requested == "fp16":
        if not cuda:
            log(d, "warning: fp16 needs a GPU; using fp32 on CPU")
            return Precision("fp32", None)
        return Precision("fp16", torch.float16)
    return Precision("fp32", None)


@dataclass
class Prepared:
    cfg: JobConfig
    tokenizer: Any
    hf_config: Any
    model_dir: str
    train_ds: Any
    val_ds: Any  # None when there is no validation split
    max_len: int
    output: str  # the real output directory
    attempt: int  # this pod's gang attempt (fences writers of the output)


@dataclass
class EvalResult:
    loss: float | None = None
    accuracy: float | None = None
    perplexity: float | None = None
    samples: int = 0


@dataclass
class RunTimes:
    start: float
    train_seconds: float = 0.0
    ckpt_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0


@dataclass
class Setup:
    """What training needs once the process group exists."""

    model: Any  # what forward/backward run on (DDP wrapper, FSDP module, or the plain model)
    raw_model: Any  # the module whose state_dict names are the model's
    optimizer: Any
    strategy: str
    estimate: strategy_mod.Estimate
    precision: Precision
    device: torch.device
    backend: str
    trainable: list[torch.nn.Parameter] = field(default_factory=list)  # what clipping sees, built once

    def __post_init__(self) -> None:
        if not self.trainable:
            self.trainable = [p for p in self.raw_model.parameters() if p.requires_grad]


def output_mount(cfg: JobConfig) -> str | None:
    """The volume mounted for the output: ``output.mountPath`` in job.json, else $TAUON_OUTPUT_MOUNT."""
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
    train_ds, val_ds = data.build_datasets(cfg, tokenizer, max_len)
    return Prepared(cfg, tokenizer, hf_config, model_dir, train_ds, val_ds, max_len, output, attempt)


def _config_limit(hf_config: Any, tokenizer: Any) -> int | None:
    limits = []
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(hf_config, attr, None)
        if isinstance(v, int) and v > 0:
            limits.append(v)
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    return min(limits) if limits else None


def batches_of(items: list[list[int]], size: int) -> list[list[list[int]]]:
    """Micro-batches grouped into optimizer steps of ``size`` (gradient accumulation)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _forward_kwargs(batch: dict[str, torch.Tensor], causal: bool, with_labels: bool) -> dict[str, Any]:
    if causal or with_labels:
        return batch
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(
    model: Any,
    ds: Any,
    collate: Any,
    batch_size: int,
    causal: bool,
    d: dist.DistEnv,
    device: torch.device,
    prec: Precision,
) -> EvalResult:
    """Each rank evaluates a strided shard; every rank runs the same number of forward passes (FSDP
    gathers parameters in each), a rank out of samples repeats sample 0 and ignores the result."""
    if ds is None or len(ds) == 0:
        return EvalResult()
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
            out = model(**_forward_kwargs(batch, causal, False))
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


def make_optimizer(model: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "initial_lr": lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "initial_lr": lr})
    return torch.optim.AdamW(groups, lr=lr)


# --- model setup: meta skeleton, strategy, weights from rank 0 ----------------------------------


def _bf16(prec: Precision) -> bool:
    return prec.name == "bf16"


def setup_model(prep: Prepared, d: dist.DistEnv) -> Setup:
    """Global rank 0 loads the full weights on CPU; every rank builds the model on the meta device,
    shards it (fsdp) or not (ddp), materializes its part and receives rank 0's weights by broadcast.
    A node thus holds one full copy of the weights at most (rank 0's), never one per process."""
    cfg, hp = prep.cfg, prep.cfg.hyperparameters
    device = dist.choose_device(d)
    backend = dist.choose_backend()
    prec = resolve_precision(hp.precision, device, d)
    dist.init(d, backend, device)

    full_sd, buffers, load_error = _rank0_weights(prep, d)
    load_error = dist.broadcast_object(d, load_error)
    if load_error is not None:
        raise PermanentError(load_error[0], load_error[1])

    model = build_on_meta(cfg, prep.hf_config)
    if cfg.method.type == "lora":
        assert cfg.method.lora is not None
        model = apply_lora(model, cfg.method.lora, cfg.model.task)
    if cfg.dataset.packing:
        data.disable_kv_cache(model)
    params, trainable = strategy_mod.count_params(model)
    est = strategy_mod.estimate(
        params,
        trainable,
        _bf16(prec),
        d.world_size,
        strategy_mod.device_memory_bytes(device, d.local_world_size),
    )
    strategy, why = strategy_mod.resolve(cfg.parallelism.strategy, est, d.distributed, d.world_size)
    if strategy == "fsdp" and prec.name == "fp16":
        prec = (
            Precision("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else Precision("fp32", None)
        )
        log(d, f"warning: fp16 is not supported with fsdp; using {prec.name}")
    log(
        d,
        f"strategy={strategy} ({why}); params={params} trainable={trainable} "
        f"replicated={strategy_mod.gib(est.replicated_bytes)} sharded={strategy_mod.gib(est.sharded_bytes)}",
    )
    if cfg.parallelism.activation_checkpointing:
        if strategy_mod.enable_activation_checkpointing(model):
            log(d, "activation checkpointing: on (each block's activations are recomputed in backward)")
        else:
            log(d, "warning: this model does not support activation checkpointing; ignored")

    if strategy == "fsdp":
        strategy_mod.shard_fsdp(model, strategy_mod.device_mesh(device, d.world_size), _bf16(prec))
    model.to_empty(device=device)
    _load_from_rank0(model, full_sd, d)
    full_sd = None
    _copy_buffers(model, dist.broadcast_object(d, buffers))
    model.train()
    raw_model = model
    if strategy == "ddp" and d.distributed:
        model = strategy_mod.wrap_ddp(model, device)
    optimizer = make_optimizer(raw_model, hp.learning_rate, hp.weight_decay)
    if strategy == "fsdp":
        prec = Precision(prec.name, None)  # FSDP's mixed-precision policy casts; no autocast
    return Setup(model, raw_model, optimizer, strategy, est, prec, device, backend)


def _rank0_weights(
    prep: Prepared, d: dist.DistEnv
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None, tuple[str, str] | None]:
    """On global rank 0: the full state dict (CPU), the non-persistent buffers, or a permanent error."""
    if not d.is_main:
        return None, None, None
    cfg = prep.cfg
    try:
        full = load_full_model(cfg, prep.model_dir, prep.hf_config, prep.tokenizer, cfg.hyperparameters.seed)
        if cfg.method.type == "lora":
            assert cfg.method.lora is not None
            full = apply_lora(full, cfg.method.lora, cfg.model.task)
    except PermanentError as e:
        return None, None, (e.reason, e.message)
    sd = full.state_dict()
    buffers = {n: b.detach().clone() for n, b in full.named_buffers() if n not in sd}
    return sd, buffers, None


def _load_from_rank0(model: Any, full_sd: dict[str, torch.Tensor] | None, d: dist.DistEnv) -> None:
    if not d.distributed:
        assert full_sd is not None
        model.load_state_dict(full_sd, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sd: dict[str, Any] = full_sd if d.is_main and full_sd is not None else {}
    set_model_state_dict(
        model,
        sd,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )


def _copy_buffers(model: Any, buffers: dict[str, torch.Tensor] | None) -> None:
    """Non-persistent buffers (e.g. rotary frequencies) are not in state dicts: copy rank 0's."""
    for name, value in (buffers or {}).items():
        model.get_buffer(name).copy_(value)


# --- checkpoints ------------------------------------------------------------------------------


def _sd_options(lora: bool, full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=lora, strict=not lora, full_state_dict=full)


def app_state(s: Setup, lora: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(s.raw_model, s.optimizer, options=_sd_options(lora))
    return {"model": msd, "optim": osd}


def save_checkpoint(
    s: Setup, state: ckpt.TrainState, output: str, attempt: int, d: dist.DistEnv, lora: bool
) -> None:
    """Every rank writes its shards into rank 0's temp dir; rank 0 commits after a barrier."""
    ckdir = ckpt.checkpoints_dir(output)
    fence_ok = dist.broadcast_object(d, _fence_status(output, attempt) if d.is_main else None)
    if fence_ok is not None:
        raise out_mod.Superseded(fence_ok)
    tmp = dist.broadcast_object(d, ckpt.new_tmp_dir(ckdir, state.step) if d.is_main else None)
    ckpt.write_shards(tmp, app_state(s, lora), d.rank, ckpt.capture_rng(s.device))
    dist.barrier(d, s.device)
    if d.is_main:
        ckpt.commit(tmp, ckdir, state)
    dist.barrier(d, s.device)


def _fence_status(output: str, attempt: int) -> str | None:
    try:
        out_mod.check_fence(output, attempt)
    except out_mod.Superseded as e:
        return str(e)
    return None


def resume(s: Setup, output: str, cfg: JobConfig, d: dist.DistEnv, lora: bool) -> ckpt.TrainState | None:
    """Load the newest complete checkpoint that validates; log each one skipped."""
    candidates: list[tuple[str, ckpt.TrainState]] | None = None
    if d.is_main:
        candidates = []
        for step, path in reversed(ckpt.list_complete(ckpt.checkpoints_dir(output))):
            problem = ckpt.validate(path)
            if problem is None:
                candidates.append((path, ckpt.read_state(path)))
                break
            log(
                d,
                f"warning: checkpoint {path} (step {step}) is not loadable ({problem}); trying an older one",
            )
    candidates = dist.broadcast_object(d, candidates)
    if not candidates:
        return None
    path, state = candidates[0]
    from torch.distributed.checkpoint.state_dict import set_state_dict

    st = app_state(s, lora)
    try:
        ckpt.load_shards(path, st)  # DCP gathers errors: every rank raises together
    except Exception as e:
        moved = ckpt.quarantine(path) if d.is_main else ""
        dist.barrier(d, s.device)
        raise RuntimeError(
            f"checkpoint {path} failed to load ({type(e).__name__}: {e}); moved aside to {moved or 'a .corrupt- dir'}"
            "; the restart resumes from the previous checkpoint"
        ) from e
    set_state_dict(
        s.raw_model,
        s.optimizer,
        model_state_dict=st["model"],
        optim_state_dict=st["optim"],
        options=_sd_options(lora),
    )
    rng = ckpt.load_rng(path, d.rank) if state.world_size == d.world_size else None
    if rng is not None:
        ckpt.restore_rng(rng, s.device)
    log(
        d,
        f"resuming from {path} (step {state.step}, epoch {state.epoch}, sample {state.sample_pos}; "
        f"written by {state.world_size} rank(s) under {state.strategy})",
    )
    return state


# --- the final model --------------------------------------------------------------------------


def gather_full_state(model: Any, d: dist.DistEnv, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Rank 0 gets the whole state dict on CPU in ``dtype``, one tensor at a time (so host memory holds at
    most one full copy in ``dtype``); the other ranks only take part in the gathers."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] | None = {} if d.is_main else None
    for name, value in model.state_dict().items():
        t = value.full_tensor() if isinstance(value, DTensor) else value
        if out is not None:
            t = t.detach()
            out[name] = t.to("cpu", dtype) if t.is_floating_point() else t.to("cpu")
        del t
    return out


def save_final_model(prep: Prepared, full: dict[str, torch.Tensor], lora: bool) -> None:
    """Rank 0: ``<output>/model`` (Hugging Face, safetensors, 5 GB shards) and for LoRA ``<output>/adapter``,
    each written to a temp dir, fsynced and swapped in atomically. LoRA adapters are merged into ``model``."""
    cfg, output = prep.cfg, prep.output
    model = build_on_meta(cfg, prep.hf_config)
    if lora:
        assert cfg.method.lora is not None
        model = apply_lora(model, cfg.method.lora, cfg.model.task)
    model.load_state_dict(full, strict=False, assign=True)
    os.makedirs(output, exist_ok=True)
    if lora:
        tmp_adapter = os.path.join(output, f".tmp-adapter-{secrets.token_hex(4)}")
        model.save_pretrained(tmp_adapter)
        prep.tokenizer.save_pretrained(tmp_adapter)
        out_mod.swap_in(tmp_adapter, os.path.join(output, out_mod.ADAPTER_DIR))
        model = model.merge_and_unload()
    tmp_model = os.path.join(output, f".tmp-model-{secrets.token_hex(4)}")
    model.save_pretrained(tmp_model, max_shard_size="5GB")
    prep.tokenizer.save_pretrained(tmp_model)
    out_mod.swap_in(tmp_model, os.path.join(output, out_mod.MODEL_DIR))


# --- the run ----------------------------------------------------------------------------------


def run(config_path: str, d: dist.DistEnv, stop: StopFlag, t0: float) -> int:
    cfg = load_config(config_path)
    # metrics: local rank 0 of every node serves them (from the start, so /progress answers while the
    # model loads); global rank 0 writes progress.json
    metrics = TrainerMetrics(d.node_rank, torch.cuda.is_available()) if d.is_local_main else None
    server = start_metrics_server(metrics, metrics_port_from_env()) if metrics else None
    try:
        return _run(cfg, d, stop, t0, metrics)
    finally:
        if server:
            server.close()


def _progress_interval() -> float:
    raw = os.environ.get("TAUON_PROGRESS_INTERVAL", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else 2.0
    except ValueError:
        return 2.0


def _claim_output(prep: Prepared, d: dist.DistEnv, device: torch.device) -> None:
    """Rank 0 takes the output (owner file, attempt), cleans what a crash left; every rank learns the
    outcome, so all fail the same way."""
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
        except out_mod.Superseded as e:
            result = ("superseded", ATTEMPT_SUPERSEDED, str(e))
    result = dist.broadcast_object(d, result)
    if result is None:
        return
    if result[0] == "permanent":
        raise PermanentError(result[1], result[2])
    raise out_mod.Superseded(result[2])


def plan_total(state: ckpt.TrainState, n: int, hp: Hyperparameters, world: int) -> int:
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


def _run(cfg: JobConfig, d: dist.DistEnv, stop: StopFlag, t0: float, metrics: TrainerMetrics | None) -> int:
    hp = cfg.hyperparameters
    lora = cfg.method.type == "lora"
    _quiet_libraries(d)
    seed_everything(hp.seed)
    prep = prepare(cfg, d)  # permanent errors surface here, before any rendezvous
    rss_before = strategy_mod.rss_bytes()
    s = setup_model(prep, d)
    _memory_report(d, loadRssBefore=rss_before, loadPeakRss=strategy_mod.peak_rss_bytes())
    _claim_output(prep, d, s.device)
    log(
        d,
        f"world_size={d.world_size} backend={s.backend if d.distributed else 'none'} device={s.device} "
        f"precision={s.precision.name} strategy={s.strategy} train={len(prep.train_ds)} "
        f"eval={len(prep.val_ds) if prep.val_ds is not None else 0} max_len={prep.max_len} "
        f"method={cfg.method.type} task={cfg.model.task} init={cfg.model.init}",
    )
    state = resume(s, prep.output, cfg, d, lora)
    resumed_from = state.step if state else 0
    if state is None:
        state = ckpt.TrainState()
    n = len(prep.train_ds)
    if state.sample_pos >= n:  # saved at the very end of an epoch
        state.epoch, state.sample_pos = state.epoch + 1, 0
    total = plan_total(state, n, hp, d.world_size)
    state.total_steps, state.world_size, state.strategy, state.owner_uid = (
        total,
        d.world_size,
        s.strategy,
        cfg.uid,
    )
    warmup = schedule.warmup_steps(total, hp.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        s.optimizer, schedule.LinearWarmupDecay(total, warmup), last_epoch=state.step - 1
    )
    reporter = ProgressReporter(prep.output if d.is_main else None, metrics, _progress_interval())
    return _train_and_finish(prep, s, sched, state, d, stop, reporter, metrics, t0, resumed_from, total, lora)


def _resolved(s: Setup) -> dict[str, Any]:
    """What the operator maps to status.resolved (reconcile/finetunejob.py take_resolved): the strategy,
    the replicated state per rank the ``auto`` estimate computed (``estimateBytes`` ->
    estimate.stateBytesPerRank) and the device memory it compared against (``deviceMemoryBytes``; absent
    when unknown)."""
    r: dict[str, Any] = {"strategy": s.strategy, "estimateBytes": s.estimate.replicated_bytes}
    if s.estimate.device_bytes > 0:
        r["deviceMemoryBytes"] = s.estimate.device_bytes
    return r


def _train_and_finish(
    prep: Prepared,
    s: Setup,
    sched: Any,
    state: ckpt.TrainState,
    d: dist.DistEnv,
    stop: StopFlag,
    reporter: ProgressReporter,
    metrics: TrainerMetrics | None,
    t0: float,
    resumed_from: int,
    total: int,
    lora: bool,
) -> int:
    cfg = prep.cfg
    hp = cfg.hyperparameters
    causal = cfg.model.task == "causal-lm"
    device, prec, model = s.device, s.precision, s.model
    B, A, W = hp.batch_size_per_device, hp.gradient_accumulation_steps, d.world_size
    n = len(prep.train_ds)
    collate = data.Collator(prep.tokenizer.pad_token_id, cfg.model.task, cfg.dataset.packing)
    eval_bs = max(B, 32)
    scaler = torch.amp.GradScaler("cuda") if prec.name == "fp16" else None

    # initial evaluation (fresh runs only; a resumed run carries it in the checkpoint)
    if state.step == 0 and "initialEvalLoss" not in state.extra:
        ev0 = evaluate(model, prep.val_ds, collate, eval_bs, causal, d, device, prec)
        state.extra.update(
            initialEvalLoss=ev0.loss, initialEvalAccuracy=ev0.accuracy, initialEvalPerplexity=ev0.perplexity
        )
        log(
            d,
            f"initial eval: loss={_fmt(ev0.loss)} accuracy={_fmt(ev0.accuracy)} perplexity={_fmt(ev0.perplexity)}",
        )

    times = RunTimes(start=time.monotonic())
    last_loss: float | None = None
    last_saved = resumed_from if resumed_from else -1

    def report(force: bool = False) -> None:
        elapsed = max(times.train_seconds, 1e-9)
        sps = times.samples / elapsed if times.samples else None
        tps = times.tokens / elapsed if times.tokens else None
        done = state.step - resumed_from
        eta = (total - state.step) * (elapsed / done) if done > 0 else None
        epochs_started = state.epoch + (1 if state.sample_pos else 0)
        rec = progress_record(state.step, total, epochs_started, last_loss, sps, tps, eta)
        rec["resolved"] = _resolved(s)
        reporter.update(rec, force=force)

    def save() -> None:
        nonlocal last_saved
        t = time.monotonic()
        save_checkpoint(s, state, prep.output, prep.attempt, d, lora)
        last_saved = state.step
        if metrics:
            metrics.checkpoints.inc()
        times.ckpt_seconds += time.monotonic() - t

    report(force=True)
    model.train()
    while state.step < total:
        order = data.epoch_order(n, hp.seed, state.epoch)
        start = state.sample_pos
        mbs = data.rank_slice(order, start, W, d.rank, B)
        done_mb = 0
        for group in batches_of(mbs, A):
            if state.step >= total:
                break
            t_step = time.monotonic()
            loss_acc, n_samples, n_tokens = _train_step(s, prep, collate, group, scaler, causal)
            _trace(d, state.step + 1, state.epoch, group)
            if state.step == resumed_from:  # the first step of this process: optimizer state exists now
                _memory_report(
                    d,
                    stateBytes=strategy_mod.local_state_bytes(s.raw_model, s.optimizer),
                    peakGpuMemoryBytes=torch.cuda.max_memory_allocated(device)
                    if device.type == "cuda"
                    else None,
                )
            done_mb += len(group)
            state.step += 1
            state.sample_pos = data.position_after(start, done_mb, n, W, B)
            sched.step()
            # one small all-reduce per step: global loss, samples, tokens, and the stop flag
            stats = torch.tensor(
                [loss_acc, n_samples, n_tokens, 1.0 if stop.set else 0.0], dtype=torch.float64
            )
            stats = dist.all_reduce_sum(d, stats.to(device) if device.type == "cuda" else stats).cpu()
            last_loss = float(stats[0]) / W
            state.train_loss_sum += last_loss
            state.train_loss_count += 1
            state.samples_seen += int(stats[1])
            state.tokens_seen += int(stats[2])
            times.samples += int(stats[1])
            times.tokens += int(stats[2])
            times.step_seconds.append(time.monotonic() - t_step)
            times.train_seconds += times.step_seconds[-1]
            if metrics:
                metrics.samples.inc(int(stats[1]))
                if metrics.gpu_mem is not None:
                    metrics.gpu_mem.set(torch.cuda.memory_allocated(device))
            if state.sample_pos >= n:
                state.epoch, state.sample_pos = state.epoch + 1, 0
            stopping = float(stats[3]) > 0
            report(force=state.step == total or stopping)
            if state.step % cfg.output.checkpoint_every_steps == 0 or state.step == total or stopping:
                save()
            if stopping:
                log(d, f"SIGTERM: stopped at step {state.step}; checkpoint saved")
                raise StopRequested()
            if state.sample_pos == 0:
                break  # epoch finished: next epoch's order
        else:
            if state.step < total and state.sample_pos != 0:  # nothing left in this epoch (ragged tail)
                state.epoch, state.sample_pos = state.epoch + 1, 0
    if last_saved != state.step and state.step > 0:
        save()  # resumed at (or past) the end: make sure the final step is checkpointed
    loop_seconds = time.monotonic() - times.start

    ev = evaluate(model, prep.val_ds, collate, eval_bs, causal, d, device, prec)
    log(d, f"final eval: loss={_fmt(ev.loss)} accuracy={_fmt(ev.accuracy)} perplexity={_fmt(ev.perplexity)}")
    fence = dist.broadcast_object(d, _fence_status(prep.output, prep.attempt) if d.is_main else None)
    if fence is not None:
        raise out_mod.Superseded(fence)
    out_dtype = torch.bfloat16 if prec.name == "bf16" else torch.float32
    full = gather_full_state(s.raw_model, d, out_dtype)
    if d.is_main:
        assert full is not None
        save_final_model(prep, full, lora)
        full = None
        m = _final_metrics(prep, s, state, ev, times, t0, loop_seconds, resumed_from, total, d)
        atomic_write_json(os.path.join(prep.output, "metrics.json"), m)
        # The operator reads final metrics from rank 0's termination message (works on any cluster,
        # no access to the output volume needed). Kubernetes keeps at most 4096 bytes of it.
        write_termination_log(
            {
                "metrics": {k: v for k, v in m.items() if k in TERMINATION_METRICS and v is not None},
                "resolved": _resolved(s),
            }
        )
        log(d, f"done: {m}")
    dist.barrier(d, device)
    return EXIT_OK


def _memory_report(d: dist.DistEnv, **values: Any) -> None:
    """``$TAUON_MEMORY_REPORT=PATH``: merge ``values`` into ``PATH.rank<R>.json`` (bench/memory.py)."""
    path = os.environ.get("TAUON_MEMORY_REPORT", "")
    if not path:
        return
    f = f"{path}.rank{d.rank}.json"
    old = json.loads(open(f, encoding="utf-8").read()) if os.path.exists(f) else {}
    atomic_write_json(f, {**old, **values})


def _trace(d: dist.DistEnv, step: int, epoch: int, group: list[list[int]]) -> None:
    """``$TAUON_TRACE_SAMPLES``: append the training-set indices of each step to ``<path>.rank<R>``
    (one JSON line per step; a debugging aid, used by the tests to prove exactly-once resumes)."""
    path = os.environ.get("TAUON_TRACE_SAMPLES", "")
    if not path:
        return
    with open(f"{path}.rank{d.rank}", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, "indices": [i for mb in group for i in mb]}) + "\n")


def _train_step(
    s: Setup, prep: Prepared, collate: Any, group: list[list[int]], scaler: Any, causal: bool
) -> tuple[float, int, int]:
    """One optimizer step over ``group`` (this rank's micro-batches); gradients sync on the last one.

    Lean: the token count comes from the batch while it is still on the host, the micro-batch losses are
    summed on the device (float64, the same additions as on the host) and read back once per step."""
    model, device, prec = s.model, s.device, s.precision
    loss_acc: torch.Tensor | None = None
    n_samples = n_tokens = 0
    for k, mb in enumerate(group):
        cpu_batch = collate([prep.train_ds[i] for i in mb])
        if causal:
            n_tokens += int((cpu_batch["labels"] != -100).sum())
        else:
            n_tokens += int(cpu_batch["attention_mask"].sum())
        batch = {key: v.to(device, non_blocking=True) for key, v in cpu_batch.items()}
        sync = k == len(group) - 1
        ctx: Any = contextlib.nullcontext()
        if s.strategy == "fsdp":
            model.set_requires_gradient_sync(sync)
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
            ctx = model.no_sync()
        with ctx:
            with prec.autocast(device):
                out = model(**batch)
            loss = out.loss.float() / len(group)
            (scaler.scale(loss) if scaler else loss).backward()
        part = loss.detach().double()
        loss_acc = part if loss_acc is None else loss_acc + part
        n_samples += len(mb)
    if scaler:
        scaler.unscale_(s.optimizer)
    torch.nn.utils.clip_grad_norm_(s.trainable, MAX_GRAD_NORM)
    if scaler:
        scaler.step(s.optimizer)
        scaler.update()
    else:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return (float(loss_acc.item()) if loss_acc is not None else 0.0), n_samples, n_tokens


def _final_metrics(
    prep: Prepared,
    s: Setup,
    state: ckpt.TrainState,
    ev: EvalResult,
    times: RunTimes,
    t0: float,
    loop_seconds: float,
    resumed_from: int,
    total: int,
    d: dist.DistEnv,
) -> dict[str, Any]:
    cfg = prep.cfg
    causal = cfg.model.task == "causal-lm"
    train_s = times.train_seconds
    n = len(prep.train_ds)
    B, A = cfg.hyperparameters.batch_size_per_device, cfg.hyperparameters.gradient_accumulation_steps
    spe = schedule.ceil_div(data.num_batches(n, d.world_size, B), A)
    device = s.device
    m: dict[str, Any] = {
        "trainLoss": _r(state.train_loss_sum / state.train_loss_count if state.train_loss_count else None),
        "evalLoss": _r(ev.loss),
        "initialEvalLoss": _r(state.extra.get("initialEvalLoss")),
        "samplesPerSecond": _r(times.samples / train_s if train_s > 0 else None, 3),
        "tokensPerSecond": _r(times.tokens / train_s if train_s > 0 else None, 1),
        "steps": state.step,
        "totalSteps": total,
        "epochs": round(state.step / spe, 4) if spe else 0,
        "trainSamples": n,
        "evalSamples": len(prep.val_ds) if prep.val_ds is not None else 0,
        "worldSize": d.world_size,
        "backend": s.backend if d.distributed else "none",
        "device": device.type if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})",
        "precision": s.precision.name,
        "strategy": s.strategy,
        "estimateBytes": s.estimate.replicated_bytes,
        "resolved": _resolved(s),
        "method": cfg.method.type,
        "task": cfg.model.task,
        "init": cfg.model.init,
        "runtimeSeconds": round(time.monotonic() - t0, 2),
        "trainSeconds": round(train_s, 3),
        "loopSeconds": round(loop_seconds, 3),
        "stepSecondsMedian": _r(_quantile(times.step_seconds, 0.5), 4),
        "stepSecondsP90": _r(_quantile(times.step_seconds, 0.9), 4),
        "checkpointSeconds": round(times.ckpt_seconds, 3),
        "resumedFromStep": resumed_from,
    }
    if causal:
        m["evalPerplexity"] = _r(ev.perplexity)
        m["initialEvalPerplexity"] = _r(state.extra.get("initialEvalPerplexity"))
    else:
        m["evalAccuracy"] = _r(ev.accuracy)
        m["initialEvalAccuracy"] = _r(state.extra.get("initialEvalAccuracy"))
    return m


TERMINATION_METRICS = (
    "trainLoss",
    "evalLoss",
    "evalAccuracy",
    "evalPerplexity",
    "initialEvalAccuracy",
    "initialEvalLoss",
    "samplesPerSecond",
    "tokensPerSecond",
    "steps",
    "epochs",
    "worldSize",
    "backend",
    "precision",
    "device",
    "runtimeSeconds",
    "resumedFromStep",
    "strategy",
)


def _r(x: float | None, nd: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _quiet_libraries(d: dist.DistEnv) -> None:
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc() -> bool:
    """Keep the host allocator from returning and re-faulting the training step's large buffers.

    glibc serves blocks above its mmap threshold with fresh mmaps and gives freed heap back to the
    kernel, so every step's activations, gradients and (under fsdp) collective buffers come back as
    new zeroed pages. Serving up to 32 MiB from the heap and never trimming it made the CPU steps of
    bench/memory 10 % (ddp) and 18 % (fsdp) faster; the heap stays at its peak, which a training
    process reaches every step anyway. Off with ``TAUON_MALLOC_TUNE=0`` or when glibc's own
    ``MALLOC_*`` variables are set; a no-op outside glibc."""
    if os.environ.get("TAUON_MALLOC_TUNE", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = argparse.ArgumentParser(prog="tauon_train.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get("TAUON_CONFIG", "/etc/tauon/job.json"))
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    stop = StopFlag()
    d = dist.DistEnv.from_env()
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        start_parent_watchdog()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, stop.handler)
    except ValueError:  # not the main thread (embedded use)
        previous = None
    try:
        return int(run(args.config, d, stop, t0))
    except PermanentError as e:
        return report_permanent(e)
    except out_mod.Superseded as e:
        print(f"tauon-trainer: {e}; stopping without writing", file=sys.stderr, flush=True)
        write_termination_log({"retryable": True, "reason": ATTEMPT_SUPERSEDED, "message": str(e)})
        return EXIT_RETRYABLE
    except StopRequested:
        write_termination_log(
            {
                "retryable": True,
                "reason": "Terminated",
                "message": "stopped by SIGTERM at a step boundary; resumes from the checkpoint",
            }
        )
        return EXIT_SIGTERM
    except Exception as e:
        traceback.print_exc()
        sys.stderr.flush()
        return report_retryable(e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        dist.shutdown()


if __name__ == "__main__":
    code = main()
    # Everything the run produces is written and fsynced by now. Skip the interpreter's teardown: C++
    # destructors of torch's process-group and pool threads at exit can abort a rank that finished
    # ("terminate called without an active exception", SIGABRT), and torchrun would then report a
    # successful run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
