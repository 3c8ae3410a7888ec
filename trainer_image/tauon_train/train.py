"""tauon's fine-tuning trainer.

    torchrun --nnodes N --nproc-per-node P ... -m tauon_train.train --config /etc/tauon/job.json
    python -m tauon_train.train --config job.json          # single process (no torchrun env)

Order of work: parse the config, load and validate the dataset, resolve and load the model (all before
``init_process_group``, so a permanent error costs no rendezvous and every rank fails the same way),
then DDP training with resume from the newest complete checkpoint, evaluation before and after, and the
final Hugging Face model. See trainer_image/README.md for the files it writes and the exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tauon_core.errors import (
    EMPTY_DATASET,
    EXIT_OK,
    EXIT_RETRYABLE,
    EXIT_SIGTERM,
    PermanentError,
    report_permanent,
    report_retryable,
    write_termination_log,
)

from . import checkpoint as ckpt
from . import dist, schedule
from .config import JobConfig, load_config
from .data import Collator, TokenizedDataset, drop_short, load_records, split_indices, tokenize
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
    load_model,
    load_tokenizer,
    max_positions,
    resolve_model_dir,
    trainable_state_dict,
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
    model: Any
    train_ds: TokenizedDataset
    val_ds: TokenizedDataset
    max_len: int
    model_dir: str


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
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(cfg: JobConfig, d: dist.DistEnv) -> Prepared:
    """Everything that can fail permanently, done before any process group exists."""
    causal = cfg.model.task == "causal-lm"
    records = load_records(cfg.dataset, cfg.model.num_labels)
    train_idx, val_idx = split_indices(
        len(records), cfg.dataset.validation_split, cfg.hyperparameters.seed, cfg.dataset.path
    )
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(cfg, model_dir, tokenizer)
    limit = max_positions(model, tokenizer)
    max_len = cfg.hyperparameters.max_seq_length
    if limit is not None and max_len > limit:
        log(d, f"warning: maxSeqLength {max_len} > model limit {limit}; using {limit}")
        max_len = limit
    train_ds = tokenize(tokenizer, [records[i] for i in train_idx], max_len, with_labels=not causal)
    val_ds = tokenize(tokenizer, [records[i] for i in val_idx], max_len, with_labels=not causal)
    if causal:
        train_ds, val_ds = drop_short(train_ds), drop_short(val_ds)
        if len(train_ds) == 0:
            raise PermanentError(EMPTY_DATASET, f"{cfg.dataset.path}: no training text has 2 or more tokens")
    if cfg.method.type == "lora":
        assert cfg.method.lora is not None
        model = apply_lora(model, cfg.method.lora, cfg.model.task)
    return Prepared(cfg, tokenizer, model, train_ds, val_ds, max_len, model_dir)


def batches_of(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@torch.no_grad()
def evaluate(
    model: Any,
    ds: TokenizedDataset,
    collate: Collator,
    batch_size: int,
    causal: bool,
    d: dist.DistEnv,
    device: torch.device,
    prec: Precision,
) -> EvalResult:
    """Each rank evaluates a strided shard (no padding duplicates); sums are all-reduced."""
    if len(ds) == 0:
        return EvalResult()
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss_sum, correct, count (samples or tokens)
    shard = list(range(d.rank, len(ds), d.world_size))
    for b in batches_of(shard, batch_size):
        batch = {k: v.to(device) for k, v in collate([ds[i] for i in b]).items()}
        with prec.autocast(device):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"] if causal else None,
            )
        if causal:
            ntok = int((batch["labels"][:, 1:] != -100).sum().item())
            if ntok == 0:
                continue
            sums[0] += float(out.loss.float().item()) * ntok
            sums[2] += ntok
        else:
            logits = out.logits.float()
            sums[0] += float(
                torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            )
            sums[1] += float((logits.argmax(-1) == batch["labels"]).sum().item())
            sums[2] += len(b)
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
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


def save_final_model(output: str, model: Any, tokenizer: Any, lora: bool) -> None:
    """``<output>/model`` (merged, plain HF) and, for LoRA, ``<output>/adapter``; each via temp dir + rename."""

    def swap_in(tmp: str, final: str) -> None:
        if os.path.exists(final):
            old = os.path.join(output, f".old-{os.path.basename(final)}-{secrets.token_hex(4)}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)

    os.makedirs(output, exist_ok=True)
    if lora:
        tmp_adapter = os.path.join(output, f".tmp-adapter-{secrets.token_hex(4)}")
        model.save_pretrained(tmp_adapter)
        tokenizer.save_pretrained(tmp_adapter)
        swap_in(tmp_adapter, os.path.join(output, "adapter"))
        model = model.merge_and_unload()
    tmp_model = os.path.join(output, f".tmp-model-{secrets.token_hex(4)}")
    model.save_pretrained(tmp_model)
    tokenizer.save_pretrained(tmp_model)
    swap_in(tmp_model, os.path.join(output, "model"))


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


def _run(cfg: JobConfig, d: dist.DistEnv, stop: StopFlag, t0: float, metrics: TrainerMetrics | None) -> int:
    hp = cfg.hyperparameters
    causal = cfg.model.task == "causal-lm"
    lora = cfg.method.type == "lora"
    _quiet_libraries(d)
    seed_everything(hp.seed)

    prep = prepare(cfg, d)  # permanent errors surface here, before any rendezvous
    model = prep.model

    device = dist.choose_device(d)
    backend = dist.choose_backend()
    prec = resolve_precision(hp.precision, device, d)
    dist.init(d, backend, device)
    log(
        d,
        f"world_size={d.world_size} backend={backend if d.distributed else 'none'} device={device} "
        f"precision={prec.name} train={len(prep.train_ds)} eval={len(prep.val_ds)} max_len={prep.max_len} "
        f"method={cfg.method.type} task={cfg.model.task}",
    )

    output = cfg.output.path
    ckdir = ckpt.checkpoints_dir(output)
    if d.is_main:
        os.makedirs(ckdir, exist_ok=True)
        ckpt.remove_stale(ckdir)
        found = ckpt.latest_complete(ckdir)
        resume_path = found[1] if found else None
    else:
        resume_path = None
    resume_path = dist.broadcast_object(d, resume_path)

    B, A, W = hp.batch_size_per_device, hp.gradient_accumulation_steps, d.world_size
    mb_per_epoch = schedule.micro_batches_per_epoch(len(prep.train_ds), B, W)
    total = schedule.total_steps(len(prep.train_ds), B, W, A, hp.epochs, hp.max_steps)
    warmup = schedule.warmup_steps(total, hp.warmup_ratio)
    state = ckpt.TrainState(total_steps=total, world_size=W)

    loaded = None
    if resume_path:
        loaded = ckpt.load_checkpoint(resume_path, map_location="cpu")
        missing, unexpected = model.load_state_dict(loaded.model_state, strict=False)
        if unexpected:
            raise RuntimeError(
                f"checkpoint {resume_path} does not match the model: unexpected keys {unexpected[:5]}"
            )
        state = loaded.state
        if state.world_size != W and state.batches_in_epoch:
            # position within the epoch in samples, re-expressed for the new world size
            consumed = state.batches_in_epoch * B * state.world_size
            state.batches_in_epoch = min(mb_per_epoch, (consumed // (B * W)) // A * A)
            log(d, f"warning: world size changed {state.world_size} -> {W}; epoch position approximated")
        state.total_steps, state.world_size = total, W
        log(
            d,
            f"resuming from {resume_path} (step {state.step}, epoch {state.epoch}, "
            f"batch {state.batches_in_epoch} of the epoch)",
        )
    resumed_from = state.step if loaded else 0

    model.to(device)
    model.train()
    raw_model = model
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            ddp_kwargs["device_ids"] = [device.index]
        model = DDP(model, **ddp_kwargs)
    optimizer = make_optimizer(raw_model, hp.learning_rate, hp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.LinearWarmupDecay(total, warmup))
    scaler = torch.amp.GradScaler("cuda") if prec.name == "fp16" else None
    if loaded:
        optimizer.load_state_dict(loaded.optimizer_state)
        sched.load_state_dict(loaded.scheduler_state)
        sched.lr_lambdas[0] = schedule.LinearWarmupDecay(total, warmup)
        rngs = loaded.rng_states
        ckpt.restore_rng(rngs[d.rank] if len(rngs) == W else rngs[0], device)
        loaded = None  # free the CPU copies

    reporter = ProgressReporter(output if d.is_main else None, metrics, _progress_interval())
    return _train_and_finish(
        cfg,
        prep,
        model,
        raw_model,
        optimizer,
        sched,
        scaler,
        state,
        d,
        device,
        prec,
        backend,
        stop,
        reporter,
        metrics,
        t0,
        resumed_from,
        mb_per_epoch,
        total,
        causal,
        lora,
    )


def _train_and_finish(
    cfg: JobConfig,
    prep: Prepared,
    model: Any,
    raw_model: Any,
    optimizer: Any,
    sched: Any,
    scaler: Any,
    state: ckpt.TrainState,
    d: dist.DistEnv,
    device: torch.device,
    prec: Precision,
    backend: str,
    stop: StopFlag,
    reporter: ProgressReporter,
    metrics: TrainerMetrics | None,
    t0: float,
    resumed_from: int,
    mb_per_epoch: int,
    total: int,
    causal: bool,
    lora: bool,
) -> int:
    hp = cfg.hyperparameters
    output = cfg.output.path
    B, A, W = hp.batch_size_per_device, hp.gradient_accumulation_steps, d.world_size
    collate = Collator(prep.tokenizer.pad_token_id, causal)
    eval_bs = max(B, 32)
    spe = math.ceil(mb_per_epoch / A)

    # initial evaluation (fresh runs only; a resumed run carries it in the checkpoint)
    if state.step == 0 and "initialEvalLoss" not in state.extra:
        ev0 = evaluate(raw_model, prep.val_ds, collate, eval_bs, causal, d, device, prec)
        state.extra["initialEvalLoss"] = ev0.loss
        state.extra["initialEvalAccuracy"] = ev0.accuracy
        state.extra["initialEvalPerplexity"] = ev0.perplexity
        log(
            d,
            f"initial eval: loss={_fmt(ev0.loss)} accuracy={_fmt(ev0.accuracy)} perplexity={_fmt(ev0.perplexity)}",
        )

    sampler = torch.utils.data.distributed.DistributedSampler(
        prep.train_ds, num_replicas=W, rank=d.rank, shuffle=True, seed=hp.seed, drop_last=False
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
        epochs_started = state.epoch + (1 if state.batches_in_epoch else 0)
        rec = progress_record(state.step, total, epochs_started, last_loss, sps, tps, eta)
        reporter.update(rec, force=force)

    def save() -> None:
        nonlocal last_saved
        t = time.monotonic()
        rng_all = dist.all_gather_object(d, ckpt.capture_rng(device))
        if d.is_main:
            ckpt.save_checkpoint(
                output, state, ckpt_state(raw_model), optimizer.state_dict(), sched.state_dict(), rng_all
            )
        dist.barrier(d, device)
        last_saved = state.step
        if metrics:
            metrics.checkpoints.inc()
        times.ckpt_seconds += time.monotonic() - t

    report(force=True)
    model.train()
    while state.step < total:
        sampler.set_epoch(state.epoch)
        groups = batches_of(batches_of(list(sampler), B), A)
        start_group = state.batches_in_epoch // A
        for group in groups[start_group:]:
            if state.step >= total:
                break
            t_step = time.monotonic()
            loss_acc = torch.zeros((), dtype=torch.float64)
            n_samples = n_tokens = 0
            for k, mb in enumerate(group):
                cpu_batch = collate([prep.train_ds[i] for i in mb])
                n_tokens += int(cpu_batch["attention_mask"].sum())
                batch = {key: v.to(device, non_blocking=True) for key, v in cpu_batch.items()}
                sync = k == len(group) - 1
                ctx = model.no_sync() if (d.distributed and not sync) else contextlib.nullcontext()
                with ctx:
                    with prec.autocast(device):
                        out = model(**batch)
                    loss = out.loss.float() / len(group)
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_acc += loss.detach().double().cpu()
                n_samples += len(mb)
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in raw_model.parameters() if p.requires_grad], MAX_GRAD_NORM
            )
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batches_in_epoch += len(group)

            # one small all-reduce per step: global loss, samples, tokens, and the stop flag
            stats = torch.tensor(
                [float(loss_acc), n_samples, n_tokens, 1.0 if stop.set else 0.0], dtype=torch.float64
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
            if state.batches_in_epoch >= mb_per_epoch:
                state.epoch += 1
                state.batches_in_epoch = 0
            stopping = float(stats[3]) > 0
            report(force=state.step == total or stopping)
            if state.step % cfg.output.checkpoint_every_steps == 0 or state.step == total or stopping:
                save()
            if stopping:
                log(d, f"SIGTERM: stopped at step {state.step}; checkpoint saved")
                raise StopRequested()
            if state.batches_in_epoch == 0:
                break  # epoch finished: next epoch's order
        else:
            # nothing left in this epoch (a resume at its very end): go on with the next one
            if state.step < total:
                state.epoch += 1
                state.batches_in_epoch = 0
    if last_saved != state.step and state.step > 0:
        save()  # resumed at (or past) the end: make sure the final step is checkpointed
    loop_seconds = time.monotonic() - times.start

    ev = evaluate(raw_model, prep.val_ds, collate, eval_bs, causal, d, device, prec)
    log(d, f"final eval: loss={_fmt(ev.loss)} accuracy={_fmt(ev.accuracy)} perplexity={_fmt(ev.perplexity)}")
    if d.is_main:
        save_final_model(output, raw_model, prep.tokenizer, lora)
        train_s = times.train_seconds
        m = {
            "trainLoss": _r(
                state.train_loss_sum / state.train_loss_count if state.train_loss_count else None
            ),
            "evalLoss": _r(ev.loss),
            "initialEvalLoss": _r(state.extra.get("initialEvalLoss")),
            "samplesPerSecond": _r(times.samples / train_s if train_s > 0 else None, 3),
            "tokensPerSecond": _r(times.tokens / train_s if train_s > 0 else None, 1),
            "steps": state.step,
            "totalSteps": total,
            "epochs": round(state.step / spe, 4) if spe else 0,
            "trainSamples": len(prep.train_ds),
            "evalSamples": len(prep.val_ds),
            "worldSize": W,
            "backend": backend if d.distributed else "none",
            "device": device.type if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})",
            "precision": prec.name,
            "method": cfg.method.type,
            "task": cfg.model.task,
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
        atomic_write_json(os.path.join(output, "metrics.json"), m)
        # The operator reads final metrics from rank 0's termination message (works on any cluster,
        # no access to the output volume needed). Kubernetes keeps at most 4096 bytes of it.
        write_termination_log(
            {"metrics": {k: v for k, v in m.items() if k in TERMINATION_METRICS and v is not None}}
        )
        log(d, f"done: {m}")
    dist.barrier(d, device)
    return EXIT_OK


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
)


def ckpt_state(raw_model: Any) -> dict[str, torch.Tensor]:
    return trainable_state_dict(raw_model)


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


def main(argv: list[str] | None = None) -> int:
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
        return run(args.config, d, stop, t0)
    except PermanentError as e:
        return report_permanent(e)
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
    sys.exit(main())
