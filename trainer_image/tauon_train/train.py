"""tauon's fine-tuning trainer.

    torchrun --nnodes N --nproc-per-node P ... -m tauon_train.train --config /etc/tauon/job.json
    python -m tauon_train.train --config job.json          # single process (no torchrun env)

``main`` is the process (signals, exit codes, the termination message); ``Trainer`` is one run and owns
its loop: ``create`` (prepare.py: config, tokenizer, datasets before any rendezvous; the model laid out
by ``strategy.parallelize``; the output claimed; ``Checkpointer.resume``), ``run`` (initial evaluation,
epochs of ``step``, checkpoints every ``checkpointEverySteps`` and at the end or on SIGTERM) and
``finish`` (final evaluation, the final model, metrics.json; final.py). The loop knows nothing of the
strategy: ``Parallelized.gradient_sync`` and its precision are all it asks for. Module roles:

    train.py       main and the run object (Trainer)
    prepare.py     everything before the loop (Prepared, Setup, setup_model, claim_output, plan_total)
    strategy.py    the auto estimate, the plan, parallelize (ddp / fsdp), precision
    checkpoint.py  Checkpointer (save, resume, validate, fallback, fence) and the on-disk layout
    data.py        datasets, collation and the sample order
    evaluate.py    validation metrics
    final.py       final model, metrics.json, termination message
    runtime.py     SIGTERM flag, watchdog, allocator tuning, debugging files

See trainer_image/README.md for the files it writes and the exit codes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

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
from . import data, dist, final, runtime, schedule, strategy
from . import output as out_mod
from .config import Hyperparameters, JobConfig, load_config
from .dist import log
from .evaluate import EvalResult, PeriodicEvaluations, evaluate
from .metrics import (
    ProgressReporter,
    TrainerMetrics,
    compile_extra_seconds,
    metrics_port_from_env,
    progress_record,
    start_metrics_server,
)
from .prepare import (
    Prepared,
    Setup,
    claim_output,
    describe,
    make_collator,
    prepare,
    setup_model,
    start_state,
)
from .runtime import StopFlag, StopRequested, tune_malloc

MAX_GRAD_NORM = 1.0


@dataclass
class Trainer:
    """One training run on this rank: what it trains, where it stands, and the loop over it."""

    prep: Prepared
    setup: Setup
    d: dist.DistEnv
    checkpointer: ckpt.Checkpointer
    state: ckpt.TrainState
    scheduler: torch.optim.lr_scheduler.LambdaLR
    collate: data.Collator
    scaler: torch.amp.GradScaler | None  # fp16 only
    reporter: ProgressReporter
    metrics: TrainerMetrics | None  # local rank 0 only
    stop: StopFlag
    total: int  # optimizer steps of the whole run
    resumed_from: int  # the step this process started at (0: a fresh run)
    times: final.RunTimes
    last_saved: int  # the step of the newest checkpoint this process knows of (-1: none)
    last_loss: float | None = None  # the global loss of the latest step
    compiled_steps: list[int] = field(default_factory=list)  # indices of step_seconds that compiled graphs
    initial_eval_seconds: float | None = None  # compile on: the initial evaluation compiles its graphs
    evals: PeriodicEvaluations = field(default_factory=PeriodicEvaluations)  # hyperparameters.evalEverySteps
    ckpt_own_seconds: float = 0.0  # the saves' own blocking part (not waiting for the previous one)
    ckpt_final_wait_seconds: float = 0.0  # the run's end waiting for the last save to commit

    @property
    def cfg(self) -> JobConfig:
        return self.prep.cfg

    @property
    def hp(self) -> Hyperparameters:
        return self.prep.cfg.hyperparameters

    @classmethod
    def create(
        cls, cfg: JobConfig, d: dist.DistEnv, stop: StopFlag, metrics: TrainerMetrics | None, t0: float
    ) -> Trainer:
        """Set up the run: prepare (permanent errors surface here, before any rendezvous), the model, the
        output, the resumed state and the schedule."""
        hp = cfg.hyperparameters
        runtime.quiet_libraries()
        runtime.seed_everything(hp.seed)
        prep = prepare(cfg, d)
        rss_before = strategy.rss_bytes()
        s = setup_model(prep, d)
        runtime.memory_report(d, loadRssBefore=rss_before, loadPeakRss=strategy.peak_rss_bytes())
        claim_output(prep, d)
        log(d, describe(prep, s, d))
        checkpointer = ckpt.Checkpointer(
            prep.output,
            prep.attempt,
            d,
            s.module,
            s.optimizer,
            s.device,
            cfg.method.type == "lora",
            background=ckpt.async_enabled(),
        )
        state = checkpointer.resume() or ckpt.TrainState()
        resumed_from = state.step
        total = start_state(state, len(prep.train_ds), cfg, d, s.strategy)
        sched = torch.optim.lr_scheduler.LambdaLR(
            s.optimizer,
            schedule.LinearWarmupDecay(total, schedule.warmup_steps(total, hp.warmup_ratio)),
            last_epoch=state.step - 1,
        )
        return cls(
            prep=prep,
            setup=s,
            d=d,
            checkpointer=checkpointer,
            state=state,
            scheduler=sched,
            collate=make_collator(prep, s.parallel.compiled_blocks > 0),
            scaler=torch.amp.GradScaler("cuda") if s.precision.name == "fp16" else None,
            reporter=ProgressReporter(
                prep.output if d.is_main else None, metrics, runtime.progress_interval()
            ),
            metrics=metrics,
            stop=stop,
            total=total,
            resumed_from=resumed_from,
            times=final.RunTimes(process_start=t0),
            last_saved=resumed_from or -1,
            evals=PeriodicEvaluations(
                hp.eval_every_steps, len(prep.val_ds) if prep.val_ds is not None else 0
            ),
        )

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to ``total`` steps, then finish; the exit code."""
        st = self.state
        if st.step == 0 and "initialEvalLoss" not in st.extra:  # a resumed run carries it
            t_eval = time.monotonic()
            ev0 = self.evaluate()
            self.initial_eval_seconds = time.monotonic() - t_eval
            st.extra.update(
                initialEvalLoss=ev0.loss,
                initialEvalAccuracy=ev0.accuracy,
                initialEvalPerplexity=ev0.perplexity,
            )
            log(self.d, f"initial eval: {ev0.describe()}")
        if self.evals.note:
            log(self.d, self.evals.note)
        self.times.start = time.monotonic()
        self.report(force=True)
        self.setup.model.train()
        while st.step < self.total:
            self.train_epoch()
        if self.last_saved != st.step and st.step > 0:
            self.save()  # resumed at (or past) the end: make sure the final step is checkpointed
        self.times.loop_seconds = time.monotonic() - self.times.start
        return self.finish()

    def train_epoch(self) -> None:
        """This rank's share of the rest of the epoch in progress, one optimizer step per group of
        micro-batches; returns at the epoch's end (or the run's)."""
        st, hp, d = self.state, self.hp, self.d
        n, B = len(self.prep.train_ds), hp.batch_size_per_device
        start = st.sample_pos
        order = data.epoch_order(n, hp.seed, st.epoch)
        mbs = data.rank_slice(order, start, d.world_size, d.rank, B)
        done_mb = 0
        for group in data.batches_of(mbs, hp.gradient_accumulation_steps):
            if st.step >= self.total:
                return
            t_step, graphs = time.monotonic(), strategy.compiled_graphs()
            loss, n_samples, n_tokens = self.step(group)
            runtime.trace_samples(d, st.step + 1, st.epoch, group)
            if st.step == self.resumed_from:  # the first step of this process: optimizer state exists now
                self._report_memory()
            done_mb += len(group)
            st.step += 1
            st.sample_pos = data.position_after(start, done_mb, n, d.world_size, B)
            self.scheduler.step()
            stopping = self._account(loss, n_samples, n_tokens, t_step)
            if strategy.compiled_graphs() > graphs:
                self.compiled_steps.append(len(self.times.step_seconds) - 1)
            if st.sample_pos >= n:
                st.epoch, st.sample_pos = st.epoch + 1, 0
            evaluated = not stopping and st.step < self.total and self.evals.due(st.step)
            if evaluated:  # every rank: a collective; evaluate() puts the model back in train mode
                self.evals.record(st.step, self.last_loss, self.evaluate())
            self.report(force=st.step == self.total or stopping or evaluated)
            if st.step % self.cfg.output.checkpoint_every_steps == 0 or st.step == self.total or stopping:
                self.save(wait=stopping)
            if stopping:
                log(d, f"SIGTERM: stopped at step {st.step}; checkpoint saved")
                raise StopRequested()
            if st.sample_pos == 0:
                return  # epoch finished: next epoch's order
        if st.step < self.total and st.sample_pos != 0:  # nothing left in this epoch (ragged tail)
            st.epoch, st.sample_pos = st.epoch + 1, 0

    def step(self, group: list[list[int]]) -> tuple[float, int, int]:
        """One optimizer step over ``group`` (this rank's micro-batches); gradients sync on the last one.
        Returns this rank's (loss, samples, tokens).

        Lean: the token count comes from the batch while it is still on the host, the micro-batch losses are
        summed on the device (float64, the same additions as on the host) and read back once per step."""
        s, scaler = self.setup, self.scaler
        causal = self.collate.causal_lm
        loss_acc: torch.Tensor | None = None
        n_samples = n_tokens = 0
        for k, mb in enumerate(group):
            cpu_batch = self.collate([self.prep.train_ds[i] for i in mb])
            n_tokens += int(
                (cpu_batch["labels"] != -100).sum() if causal else cpu_batch["attention_mask"].sum()
            )
            batch = {key: v.to(s.device, non_blocking=True) for key, v in cpu_batch.items()}
            with s.parallel.gradient_sync(k == len(group) - 1):
                with s.precision.autocast(s.device):
                    out = s.model(**batch)
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

    def _account(self, loss: float, n_samples: int, n_tokens: int, t_step: float) -> bool:
        """One small all-reduce per step (global loss, samples, tokens and the stop flag) into the state,
        the times and the metrics; True when some rank got SIGTERM."""
        st, times, device = self.state, self.times, self.setup.device
        stats = torch.tensor([loss, n_samples, n_tokens, 1.0 if self.stop.set else 0.0], dtype=torch.float64)
        stats = dist.all_reduce_sum(self.d, stats.to(device) if device.type == "cuda" else stats).cpu()
        self.last_loss = float(stats[0]) / self.d.world_size
        st.train_loss_sum += self.last_loss
        st.train_loss_count += 1
        st.samples_seen += int(stats[1])
        st.tokens_seen += int(stats[2])
        times.samples += int(stats[1])
        times.tokens += int(stats[2])
        times.step_seconds.append(time.monotonic() - t_step)
        times.train_seconds += times.step_seconds[-1]
        if self.metrics:
            self.metrics.samples.inc(int(stats[1]))
            if self.metrics.gpu_mem is not None:
                self.metrics.gpu_mem.set(torch.cuda.memory_allocated(device))
        return float(stats[3]) > 0

    def _report_memory(self) -> None:
        s = self.setup
        runtime.memory_report(
            self.d,
            stateBytes=strategy.local_state_bytes(s.module, s.optimizer),
            peakGpuMemoryBytes=torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else None,
        )

    def report(self, force: bool = False) -> None:
        """Progress (throttled unless ``force``): progress.json and the log line, /progress and metrics."""
        st, times = self.state, self.times
        elapsed = max(times.train_seconds, 1e-9)
        sps = times.samples / elapsed if times.samples else None
        tps = times.tokens / elapsed if times.tokens else None
        done = st.step - self.resumed_from
        eta = (self.total - st.step) * (elapsed / done) if done > 0 else None
        epochs_started = st.epoch + (1 if st.sample_pos else 0)
        evals = self.evals.records() if self.evals.enabled else None
        rec = progress_record(st.step, self.total, epochs_started, self.last_loss, sps, tps, eta, evals)
        rec["resolved"] = self.resolved()
        self.reporter.update(rec, force=force)

    def resolved(self) -> dict[str, object]:
        """final.resolved and whether the blocks are compiled (``compile``: ``auto`` resolved)."""
        return {**final.resolved(self.prep, self.setup), "compile": self.setup.parallel.compiled_blocks > 0}

    def compile_metrics(self, final_eval_seconds: float) -> dict[str, float | int | bool]:
        """``compile`` (resolved), and when on: ``compileSeconds`` (the extra time of the training steps
        that built graphs, plus the initial evaluation's over the final one's), ``compiledGraphs``."""
        if not self.setup.parallel.compiled_blocks:
            return {"compile": False}
        steps = compile_extra_seconds(self.times.step_seconds, self.compiled_steps)
        ev = max(0.0, (self.initial_eval_seconds or 0.0) - final_eval_seconds)
        log(self.d, f"compile: {steps:.1f}s in {len(self.compiled_steps)} steps, {ev:.1f}s in evaluation")
        return {
            "compile": True,
            "compileSeconds": round(steps + ev, 3),
            "compiledGraphs": strategy.compiled_graphs(),
        }

    def evaluate(self) -> EvalResult:
        s = self.setup
        batch = max(self.hp.batch_size_per_device, 32)
        return evaluate(s.model, self.prep.val_ds, self.collate, batch, self.d, s.device, s.precision)

    def save(self, wait: bool = False) -> None:
        """Checkpoint the current step. With background saves (the default) this blocks only for the
        previous save (whose failure it raises) and the copy of the state to host memory; ``wait``
        (SIGTERM) blocks until this one is committed too. ``times.ckpt_seconds`` counts the time the
        loop was blocked."""
        t0 = time.monotonic()
        self.checkpointer.wait()
        t1 = time.monotonic()
        self.checkpointer.save(self.state)
        self.ckpt_own_seconds += time.monotonic() - t1
        self.last_saved = self.state.step
        if self.metrics:
            self.metrics.checkpoints.inc()
        if wait:
            self.checkpointer.wait()
        self.times.ckpt_seconds += time.monotonic() - t0

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint in flight is committed (its failure raised). The run's end waits for
        it anyway (the final model follows the last checkpoint), so it is counted apart from the stalls
        of the training loop (``checkpointFinalWaitSeconds``)."""
        t = time.monotonic()
        self.checkpointer.wait()
        self.ckpt_final_wait_seconds += time.monotonic() - t

    def checkpoint_metrics(self) -> dict[str, float | bool]:
        """metrics.json: ``checkpointStallSeconds`` (the time the training loop was blocked by checkpoints:
        the copy to host memory and waiting for the previous save; all of it when synchronous),
        ``checkpointFinalWaitSeconds`` (the end of the run waiting for the last save to commit),
        ``checkpointSeconds`` (the saves' whole time: their blocking part plus the background write,
        agreement and commit) and ``checkpointAsync``."""
        return {
            "checkpointStallSeconds": round(self.times.ckpt_seconds, 3),
            "checkpointFinalWaitSeconds": round(self.ckpt_final_wait_seconds, 3),
            "checkpointSeconds": round(self.ckpt_own_seconds + self.checkpointer.background_seconds, 3),
            "checkpointAsync": self.checkpointer.background,
        }

    def finish(self) -> int:
        """Final evaluation; rank 0 writes the final model (if this attempt still owns the output),
        metrics.json and the termination message."""
        d, s = self.d, self.setup
        t_eval = time.monotonic()
        ev = self.evaluate()
        compile_m = self.compile_metrics(time.monotonic() - t_eval)
        log(d, f"final eval: {ev.describe()}")
        if self.evals.enabled:  # the curve ends with the final evaluation
            self.evals.record(self.state.step, self.last_loss, ev)
            self.report(force=True)
        self.wait_for_checkpoint()  # the final model and metrics only after the last checkpoint committed
        self.checkpointer.check_fence()  # the fence guards the final model too
        full = final.gather_full_state(
            s.module, d, torch.bfloat16 if s.precision.name == "bf16" else torch.float32
        )
        if d.is_main:
            assert full is not None
            final.save_final_model(self.prep, full, self.cfg.method.type == "lora")
            del full
            m = final.final_metrics(
                self.prep, s, self.state, ev, self.times, self.resumed_from, self.total, d
            )
            m.update(compile_m)
            m.update(self.checkpoint_metrics())
            m["resolved"] = self.resolved()
            final.write_results(self.prep.output, m, self.resolved())
            log(d, f"done: {m}")
        dist.barrier(d, s.device)
        return EXIT_OK


# --- the process ------------------------------------------------------------------------------------


def run(config_path: str, d: dist.DistEnv, stop: StopFlag, t0: float) -> int:
    cfg = load_config(config_path)
    # metrics: local rank 0 of every node serves them (from the start, so /progress answers while the
    # model loads); global rank 0 writes progress.json
    metrics = TrainerMetrics(d.node_rank, torch.cuda.is_available()) if d.is_local_main else None
    server = start_metrics_server(metrics, metrics_port_from_env()) if metrics else None
    try:
        trainer = Trainer.create(cfg, d, stop, metrics, t0)
        try:
            return trainer.run()
        finally:  # however the run ends, a checkpoint still written in the background is waited for
            trainer.checkpointer.close()
    finally:
        if server:
            server.close()


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = argparse.ArgumentParser(prog="tauon_train.train", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", default=os.environ.get("TAUON_CONFIG", "/etc/tauon/job.json"))
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    stop = StopFlag()
    d = dist.DistEnv.from_env()
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        runtime.start_parent_watchdog()
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
