"""`tauon run --local sweep.yaml`: a FineTuneSweep whose trials run as local `tauon run --local` processes.

The operator's own planner (tauon.reconcile.finetunesweep.reconcile) drives it. Each pass observes every
trial as the FineTuneJob the cluster would show (the manifest the planner created, with its labels and
annotations, and the status its local run keeps in <DIR>/<trial>/status.json), plans, and executes the plan
locally:
- a create of a trial FineTuneJob starts `tauon run --local <trial manifest> --output <DIR>/<trial>`;
- a delete stops that process (SIGTERM: it stops its ranks) and forgets the trial's manifest (its record
  in status.trials stands, as on a cluster);
- a patch of a trial (the planner's merge patch that sets the prune annotation, tauon.dev/prune) is
  applied to its manifest, so later passes observe the annotation; a prune annotation is also written to
  <DIR>/<trial>/prune, which the trial's run watches (tauon.local.run: it ends Failed/Pruned);
- the status is written to <DIR>/status.json (atomically), exactly as the cluster shows the sweep's.

Every trial writes into <DIR>/<trial>: the template's output.storage is replaced by file://<DIR> before
planning, so the planner's own rule (<output.storage>/<trial>) names the trial's directory.

Layout of <DIR> (--output, default ./runs/<sweep>):
  status.json              the sweep's status
  <trial>/                 each trial's local run (model/, metrics.json, logs/, status.json, prune)
  .sweep/sweep.json        the sweep as last run (a resume must not change its immutable fields)
  .sweep/trials/<trial>.json  each existing trial's FineTuneJob, as created (and annotated) by the planner
  .sweep/logs/<trial>.log  what the trial's `tauon run --local` printed

Interruption (Ctrl-C, SIGTERM) stops every trial and leaves status.json Failed with reason `Interrupted`
(the trials it stopped: Failed, "Interrupted"). Running the same command on the same DIR resumes: the
`Interrupted` conditions are dropped, finished trials are read back from their status.json (not run
again), and trials that were interrupted (or left unfinished) run again, resuming their checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from rich.live import Live
from rich.table import Table

from tauon.api import FineTuneJobStatus, is_true
from tauon.api.finetunesweep import IMMUTABLE_SWEEP_FIELDS, FineTuneSweep, FineTuneSweepStatus
from tauon.api.names import (
    ANN_PRUNE,
    FAILED,
    FINETUNEJOB,
    LABEL_SWEEP,
    LOCAL_STATUS_FILE,
    LOCAL_SWEEP_STATE_DIR,
    RUNNING,
    SUCCEEDED,
    Manifest,
)
from tauon.local.run import (
    EXIT_INTERRUPTED,
    PRUNE_FILE,
    SWEEP_PID_ENV,
    _Interrupt,
    _now,
    _read_json,
    _tail,
    console,
    write_status,
)
from tauon.reconcile.context import Context
from tauon.reconcile.finetunesweep import Observed, reconcile, target_trials
from tauon.reconcile.plan import Plan

INTERRUPTED = "Interrupted"
LOCAL_RUN_FAILED = "LocalRunFailed"
STATE_DIR = LOCAL_SWEEP_STATE_DIR
STOP_GRACE = 60.0  # seconds a trial's `tauon run` has to stop its ranks after SIGTERM
TERMINAL = ("Succeeded", "Failed")

TrialState = Literal["finished", "interrupted", "unfinished"]


class SweepMismatch(ValueError):
    """DIR holds another sweep, or this sweep with other immutable fields."""


class TrialProcess(Protocol):
    """A trial's `tauon run --local` (subprocess.Popen satisfies it; tests use fakes)."""

    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


# (trial manifest file, trial output dir, log file) -> the started process
Launcher = Callable[[Path, Path, Path], TrialProcess]


def launch_trial(manifest: Path, output: Path, log: Path) -> TrialProcess:
    """`tauon run --local <manifest> --quiet --output <output>` with its console output in `log`, in a
    session of its own: a Ctrl-C at the terminal reaches only the sweep, which stops every trial itself (a
    trial must not end Interrupted while the sweep still plans with it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tauon.cli", "run", str(manifest), "--local", "--quiet"]
    argv += ["--output", str(output)]
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", SWEEP_PID_ENV: str(os.getpid())},
            start_new_session=True,
        )


# -- pure helpers ------------------------------------------------------------------------------------------


def trial_state(status: Manifest | None) -> TrialState:
    """What a trial's local status.json says of it: finished (Succeeded, or Failed for a reason of its
    own), interrupted (its run was stopped by Ctrl-C/SIGTERM), or unfinished (no status yet, Pending,
    Running: a run that did not end cleanly)."""
    if not status:
        return "unfinished"
    phase = status.get("phase")
    if phase == "Succeeded":
        return "finished"
    if phase == "Failed":
        failed = next(
            (
                c
                for c in status.get("conditions") or []
                if c.get("type") == FAILED and c.get("status") == "True"
            ),
            None,
        )
        return "interrupted" if failed is not None and failed.get("reason") == INTERRUPTED else "finished"
    return "unfinished"


def observed_trial(manifest: Manifest, status: Manifest | None) -> Manifest:
    """A trial as the API server would show its FineTuneJob: the created manifest and its status."""
    return {**manifest, "status": status or {}}


def ended_status(code: int, log_tail: str, now: datetime) -> Manifest:
    """The status of a trial whose `tauon run` ended without a final one (it crashed or could not start):
    Failed, reason LocalRunFailed, with the end of what it printed."""
    tail = " | ".join(log_tail.strip().splitlines()[-3:])
    message = f"tauon run --local exited with code {code}" + (f": {tail}" if tail else "")
    st = FineTuneJobStatus.model_validate(
        {
            "phase": "Failed",
            "completionTime": now,
            "conditions": [
                {
                    "type": FAILED,
                    "status": "True",
                    "reason": LOCAL_RUN_FAILED,
                    "message": message[:1024],
                    "lastTransitionTime": now,
                }
            ],
        }
    )
    return st.dump()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: `patch` applied to a copy of `target` (None removes a key)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def trial_patches(plan: Plan) -> list[tuple[str, Manifest]]:
    """(trial name, merge patch) of every FineTuneJob the plan patches (the prune annotation)."""
    patches: list[tuple[str, str, Manifest]] = list(getattr(plan, "patches", []))
    return [(name, body) for kind, name, body in patches if kind == FINETUNEJOB]


def prune_message_of(manifest: Manifest) -> str | None:
    """The prune annotation of a trial's manifest (the rule's message), None when it has none."""
    value = ((manifest.get("metadata") or {}).get("annotations") or {}).get(ANN_PRUNE)
    return value if isinstance(value, str) else None


def resume_status(data: Manifest | None) -> FineTuneSweepStatus:
    """The sweep's status from an earlier run's status.json, without what only its interruption set (the
    Interrupted conditions); unreadable or absent: a new sweep's status."""
    try:
        st = FineTuneSweepStatus.model_validate(data or {})
    except ValueError:
        return FineTuneSweepStatus()
    st.conditions = [c for c in st.conditions if c.reason != INTERRUPTED]
    st.phase = "Pending"
    for ctype, phase in ((RUNNING, "Running"), (FAILED, "Failed"), (SUCCEEDED, "Succeeded")):
        if is_true(st.conditions, ctype):
            st.phase = phase  # type: ignore[assignment]
    return st


def interrupted_status(sweep: FineTuneSweep, now: datetime) -> FineTuneSweepStatus:
    """The sweep's status after Ctrl-C stopped its trials: Failed (reason Interrupted, a local run's own,
    as a local FineTuneJob's), the trials it stopped Failed with the message their runs wrote."""
    ctx = Context(sweep, now, sweep.status.model_copy(deep=True))
    stopped = [t for t in ctx.st.trials if t.phase not in ("Succeeded", "Failed", "Pruned")]
    for t in stopped:
        t.phase, t.message = "Failed", f"{INTERRUPTED}: tauon run --local was interrupted"
    msg = (
        f"tauon run --local was interrupted: {len(stopped)} running trial(s) stopped; run it again to resume"
    )
    ctx.cond(RUNNING, False, INTERRUPTED, "")
    ctx.cond(FAILED, True, INTERRUPTED, msg)
    ctx.st.finished_trials = sum(1 for t in ctx.st.trials if t.phase in ("Succeeded", "Failed", "Pruned"))
    ctx.st.phase = "Failed"
    return ctx.st


def check_resumable(stored: Manifest | None, sweep: FineTuneSweep, where: Path) -> None:
    """A DIR that holds another sweep, or this one with other parameters, objective or algorithm (fields a
    cluster refuses to change), cannot be resumed."""
    if stored is None:
        return
    name = (stored.get("metadata") or {}).get("name")
    if name != sweep.metadata.name:
        raise SweepMismatch(
            f"{where} holds FineTuneSweep {name!r}, not {sweep.metadata.name!r}: use another --output"
        )
    mine = sweep.model_dump(by_alias=True, mode="json")["spec"]
    theirs = stored.get("spec") or {}
    for key in IMMUTABLE_SWEEP_FIELDS:
        if json.dumps(theirs.get(key), sort_keys=True) != json.dumps(mine.get(key), sort_keys=True):
            raise SweepMismatch(
                f"{where} holds this sweep with another spec.{key} (immutable): use another --output, "
                "or remove it to start over"
            )


def intermediate(status: Manifest | None, metric: str) -> float | None:
    """A running trial's latest value of the objective metric: its last periodic evaluation (evalLoss,
    evalAccuracy), or its latest training loss (trainLoss)."""
    progress = (status or {}).get("progress") or {}
    if metric == "trainLoss":
        value = progress.get("loss")
        return float(value) if isinstance(value, int | float) else None
    key = {"evalLoss": "evalLoss", "evalAccuracy": "evalAccuracy"}.get(metric, metric)
    for ev in reversed(progress.get("evaluations") or []):
        value = ev.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_rows(st: FineTuneSweepStatus, statuses: dict[str, Manifest | None], metric: str) -> list[list[str]]:
    """The live table's rows: trial, parameters, phase, step (of total), objective (or the latest
    intermediate value, in parentheses)."""
    rows = []
    for t in st.trials:
        status = statuses.get(t.name) or {}
        progress = status.get("progress") or {}
        total = progress.get("totalSteps") or 0
        step = t.step if t.step is not None else progress.get("step") or 0
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.parameters.items()))
        if t.objective is not None:
            objective = _fmt(t.objective)
        else:
            value = intermediate(status, metric)
            objective = f"({_fmt(value)})" if value is not None else "-"
        rows.append([t.name, params, t.phase, f"{step}/{total}" if total else str(step), objective])
    return rows


# -- the executor --------------------------------------------------------------------------------------------


@dataclass
class _Trial:
    manifest: Manifest
    proc: TrialProcess | None = None


class SweepRun:
    """One local sweep in DIR: observe the trials, plan with the operator's planner, execute the plan."""

    def __init__(self, sweep: FineTuneSweep, output: Path, launch: Launcher = launch_trial):
        self.output = output.resolve()
        self.sweep = sweep.model_copy(deep=True)
        self.sweep.spec.template.spec.output.storage = f"file://{self.output}"  # trials: <DIR>/<trial>
        meta = self.sweep.metadata
        meta.generation = meta.generation or 1
        meta.creation_timestamp = meta.creation_timestamp or _now().replace(microsecond=0)
        self.sweep.status = FineTuneSweepStatus()
        self.launch = launch
        self.state = self.output / STATE_DIR
        self.path = self.output / LOCAL_STATUS_FILE
        self.trials: dict[str, _Trial] = {}
        self.events: list[str] = []

    @property
    def status(self) -> FineTuneSweepStatus:
        return self.sweep.status

    # -- files
    def trial_output(self, name: str) -> Path:
        return self.output / name

    def _manifest_path(self, name: str) -> Path:
        return self.state / "trials" / f"{name}.json"

    def _log_path(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def trial_status(self, name: str) -> Manifest | None:
        return _read_json(self.trial_output(name) / LOCAL_STATUS_FILE)

    def _save_manifest(self, name: str) -> None:
        path = self._manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_status(path, self.trials[name].manifest)  # atomic, like every status file

    # -- lifecycle
    def resume(self) -> None:
        """Pick up what an earlier run of this sweep left in DIR (nothing, for a new DIR): its status (less
        the interruption), its trials; unfinished and interrupted trials start again."""
        check_resumable(_read_json(self.state / "sweep.json"), self.sweep, self.output)
        self.state.mkdir(parents=True, exist_ok=True)
        write_status(
            self.state / "sweep.json", self.sweep.model_dump(by_alias=True, mode="json", exclude={"status"})
        )
        self.sweep.status = resume_status(_read_json(self.path))
        name = self.sweep.metadata.name
        for path in sorted((self.state / "trials").glob("*.json")):
            manifest = _read_json(path)
            labels = ((manifest or {}).get("metadata") or {}).get("labels") or {}
            if manifest is None or labels.get(LABEL_SWEEP) != name:
                continue
            self.trials[manifest["metadata"]["name"]] = _Trial(manifest)
        if self.finished:
            return
        for tname in sorted(self.trials):
            if trial_state(self.trial_status(tname)) != "finished":
                self._start(tname)

    @property
    def finished(self) -> bool:
        return any(is_true(self.status.conditions, c) for c in (SUCCEEDED, FAILED))

    def running(self) -> list[str]:
        return [n for n, t in sorted(self.trials.items()) if t.proc is not None and t.proc.poll() is None]

    def step(self, now: datetime | None = None) -> FineTuneSweepStatus:
        """One pass: observe, plan, execute; status.json is rewritten when the status changed."""
        now = now or _now()
        observed = Observed(trials=[self._observe(n, now) for n in sorted(self.trials)])
        plan = reconcile(self.sweep, observed, now)
        self.execute(plan)
        if plan.status is not None:
            self._set(FineTuneSweepStatus.model_validate(plan.status))
        elif not self.path.exists():
            self._set(self.status)
        return self.status

    def interrupt(self, now: datetime | None = None) -> None:
        """Ctrl-C: every trial stopped, the status Failed/Interrupted (resumable)."""
        self.stop_all()
        self._set(interrupted_status(self.sweep, now or _now()))

    def stop_all(self) -> None:
        """SIGTERM every running trial at once, then wait for each (SIGKILL after STOP_GRACE)."""
        procs = [t.proc for t in self.trials.values() if t.proc is not None and t.proc.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    # -- internals
    def _observe(self, name: str, now: datetime) -> Manifest:
        trial = self.trials[name]
        code = trial.proc.poll() if trial.proc is not None else None  # first: an ended run wrote its last
        status = self.trial_status(name)
        if code is not None:
            trial.proc = None
            if trial_state(status) == "unfinished":  # ended without a final status: it failed
                status = ended_status(code, _tail(self._log_path(name), 5), now)
                write_status(self.trial_output(name) / LOCAL_STATUS_FILE, status)
        return observed_trial(trial.manifest, status)

    def _start(self, name: str) -> None:
        out = self.trial_output(name)
        (out / LOCAL_STATUS_FILE).unlink(missing_ok=True)  # an earlier (interrupted) run's is not this one's
        self.trials[name].proc = self.launch(self._manifest_path(name), out, self._log_path(name))

    def execute(self, plan: Plan) -> None:
        """The plan, as apply_plan does it on a cluster: creates, patches, deletes (events are printed)."""
        for body in plan.creates:
            if body.get("kind") != FINETUNEJOB:
                continue
            name = body["metadata"]["name"]
            self.trials[name] = _Trial(body)
            self._save_manifest(name)
            (self.trial_output(name) / PRUNE_FILE).unlink(missing_ok=True)
            self._start(name)
        for name, patch in trial_patches(plan):
            trial = self.trials.get(name)
            if trial is None:
                continue  # gone (a 404 on a cluster)
            trial.manifest = merge_patch(trial.manifest, patch)
            self._save_manifest(name)
            message = prune_message_of(trial.manifest)
            if message is not None:  # the local form of the annotation, which the trial's run watches
                out = self.trial_output(name)
                out.mkdir(parents=True, exist_ok=True)
                (out / PRUNE_FILE).write_text(message + "\n")
        gone = [name for kind, name in plan.deletes if kind == FINETUNEJOB and name in self.trials]
        procs = [self.trials[n].proc for n in gone]
        for p in procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for name, p in zip(gone, procs, strict=True):
            if p is not None:
                try:
                    p.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
            del self.trials[name]
            self._manifest_path(name).unlink(missing_ok=True)
        for ev in plan.events:
            self.events.append(f"{ev.reason}: {ev.message}")

    def _set(self, st: FineTuneSweepStatus) -> None:
        self.sweep.status = st
        write_status(self.path, st.dump())


# -- the console -------------------------------------------------------------------------------------------


def _table(run: SweepRun) -> Table:
    st = run.status
    spec = run.sweep.spec
    table = Table(
        title=f"{run.sweep.metadata.name}: {st.phase}, {st.finished_trials}/{target_trials(spec)} trials "
        f"finished ({spec.objective.goal} {spec.objective.metric})",
        title_justify="left",
    )
    for col in ("trial", "parameters", "phase", "step", spec.objective.metric):
        table.add_column(col, justify="right" if col == "step" else "left")
    statuses = {t.name: run.trial_status(t.name) for t in st.trials}
    for row in trial_rows(st, statuses, spec.objective.metric):
        table.add_row(*row)
    return table


class _Display:
    """The live table of trials (rich), with the sweep's events printed above it; nothing when quiet."""

    def __init__(self, run: SweepRun, quiet: bool):
        self.run = run
        self.live = None if quiet else Live(_table(run), console=console, refresh_per_second=2)

    def __enter__(self) -> _Display:
        if self.live is not None:
            self.live.__enter__()
        return self

    def update(self) -> None:
        events, self.run.events = self.run.events, []
        if self.live is None:
            return
        for line in events:
            self.live.console.print(f"[dim]{line}[/]")
        self.live.update(_table(self.run))

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            if not console.is_terminal:
                console.line()  # the last table ends its line (a terminal's Live does it itself)


def _report(run: SweepRun, quiet: bool) -> int:
    st = run.status
    failed = next((c for c in st.conditions if c.type == FAILED and c.status == "True"), None)
    if st.phase == "Succeeded":
        best = st.best
        if not quiet and best is not None:
            console.print(
                f"[green]best trial {best.trial}[/] ({run.sweep.spec.objective.metric} {_fmt(best.objective)}, "
                f"{json.dumps(best.parameters, sort_keys=True)}): model {best.model}"
            )
        return 0
    if failed is not None and failed.reason == INTERRUPTED:
        console.print("[yellow]interrupted: every trial stopped; run the same command again to resume[/]")
        return EXIT_INTERRUPTED
    if failed is not None:
        console.print(
            f"[red]FineTuneSweep {run.sweep.metadata.name} Failed: {failed.reason}[/]: {failed.message}"
        )
    return 1


def run_sweep(
    sweep: FineTuneSweep,
    output: Path,
    quiet: bool = False,
    launch: Launcher = launch_trial,
    poll: float = 1.0,
) -> int:
    """Run (or resume) a sweep locally; returns the exit status (0 when it Succeeded, 130 interrupted)."""
    run = SweepRun(sweep, output, launch)
    run.resume()
    if not quiet:
        console.print(
            f"[bold]tauon[/] sweep [cyan]{sweep.metadata.name}[/]: {sweep.spec.max_trials} trials, "
            f"{sweep.spec.parallel_trials} at a time; trials in {run.output}, their logs in {run.state / 'logs'}"
        )
    try:
        with _Interrupt() as interrupt, _Display(run, quiet) as display:
            while not interrupt.set:
                st = run.step()
                display.update()
                if st.phase in TERMINAL and not run.running():
                    break
                time.sleep(poll)
            if interrupt.set:
                run.interrupt()
                display.update()
    finally:
        run.stop_all()
    return _report(run, quiet)
