"""`tauon run FILE --local`: the operator's own rendered pods, run as local processes.

FineTuneJob: every rank of the gang as a process (rank 0's address is 127.0.0.1, free ports), a live
progress bar from rank 0's progress.json, per-rank logs under <output>/logs/, a summary table at the end.
Ctrl-C stops all ranks; a failed rank stops the gang and reports its rank, exit code and last log lines.
InferenceService: the predictor as the operator renders it (render_deployment), prepared like a training
rank (tauon.local.process), on 127.0.0.1 and a free port; prints the URL and serves until Ctrl-C.

Status: the object's status as the cluster would show it, kept current in a JSON file (<output>/status.json
for a FineTuneJob, <runs>/<name>-server.status.json for an InferenceService; atomic replace). It is not a
second status shape: the operator's own planners (tauon.reconcile) run on the local processes observed as
the pods (ranks) or the predictor Deployment (server) the kubelet would report. A local run never restarts
a gang or a server, so it plans with backoffLimit 0 (a failed rank fails the job) and serves one predictor
replica (no canary, no autoscaling); what only a local run can hit gets its own Failed reason:
`Interrupted` (Ctrl-C/SIGTERM), `Unsupported` (a pod a process cannot run), `ServerExited`.

Identity: a manifest has no uid, but the trainer's output ownership (`.tauon-owner.json`) needs one. A
local FineTuneJob is identified by its namespace and name (`local_uid`, a name-based UUID): running the
same job again resumes its checkpoints, as a restarted gang does; another job pointed at the same output
fails `OutputInUse`, as a re-created job on a cluster does. A uid the manifest carries is kept.

Pruning (a FineTuneSweep's early stopping, run locally by tauon.local.sweep): the file <output>/prune,
holding the rule's message, is the local form of the `tauon.dev/prune` annotation. A run that finds it
(before it starts, or while its ranks run) sets the annotation on the job it plans with, stops every rank
and ends Failed with reason `Pruned` ("pruned by its FineTuneSweep: <message>"); exit status 3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tauon.api import (
    Condition,
    FineTuneJob,
    FineTuneJobStatus,
    InferenceService,
    InferenceServiceStatus,
    find_condition,
    is_true,
)
from tauon.api.names import (
    ANN_PRUNE,
    FAILED,
    LOCAL_STATUS_FILE,
    PREDICTOR_READY,
    READY,
    REASON_PRUNED,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Manifest,
    local_service_status_file,
)
from tauon.local import process as lp
from tauon.reconcile import finetunejob as ftj
from tauon.reconcile import inferenceservice as isv
from tauon.reconcile.context import Context
from tauon.render.common import InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.finetunejob import (
    CONTAINER,
    config_map_name,
    render_config_map,
    render_pod,
    render_service,
)
from tauon.render.inferenceservice import (
    PORT_NAME,
    ModelLocation,
    Models,
    predictor_name,
    render,
    render_deployment,
)

console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line in logs
STATUS_FILE = LOCAL_STATUS_FILE
TERMINAL = (SUCCEEDED, FAILED)
# terminationMessagePolicy FallbackToLogsOnError: with an empty termination log, the kubelet takes the
# last 80 lines (at most 2048 bytes) of a failed container's log as its termination message
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
PRUNE_FILE = "prune"  # <output>/prune: the local form of the tauon.dev/prune annotation (module docstring)
EXIT_PRUNED = 3  # the exit status of a pruned run (1: failed, 130: interrupted)
EXIT_INTERRUPTED = 130
PRUNED_PREFIX = "pruned by its FineTuneSweep: "


def prune_message(output: Path) -> str | None:
    """The message of <output>/prune when the run has been pruned, else None."""
    try:
        text = (output / PRUNE_FILE).read_text(errors="replace").strip()
    except OSError:  # absent (or unreadable: not a prune the sweep could have written)
        return None
    return text or "pruned"


def _now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")  # second precision, as the kubelet reports times


def write_status(path: Path, status: Manifest) -> None:
    """Write status.json atomically (temp file + os.replace): a reader sees the old or the new status,
    never part of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(status, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class RankRun:
    rank: int
    pod: Manifest  # as the operator renders it
    prep: lp.Prepared
    proc: subprocess.Popen[bytes]
    log: Path
    started: datetime
    finished: datetime | None = None  # when its exit was first seen
    stopped: bool = False  # stopped by tauon run because the job ended (as the operator stops survivors)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _termination_message(r: RankRun, exit_code: int) -> str:
    msg = lp.termination_message(r.prep)
    if msg or exit_code == 0:
        return msg
    tail = _tail(r.log, FALLBACK_LINES).encode()[-FALLBACK_BYTES:]
    return tail.decode(errors="ignore")


def observed_pod(r: RankRun, now: datetime) -> Manifest:
    """The rank as the API server would show its pod: the rendered pod with the status a kubelet reports
    for the process (Running and Ready, or terminated with its exit code and termination message)."""
    code = r.proc.poll()
    if code is not None and r.finished is None:
        r.finished = now
    started = _rfc3339(r.started)
    meta = {**r.pod["metadata"], "creationTimestamp": started}
    spec = {**r.pod["spec"], "nodeName": "localhost"}
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": started}
    if code is None:
        ready = {"type": "Ready", "status": "True", "lastTransitionTime": started}
        state: Manifest = {"running": {"startedAt": started}}
        status: Manifest = {"phase": "Running", "conditions": [scheduled, ready]}
    else:
        exit_code = lp.exit_code(code)
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "message": _termination_message(r, exit_code),
                "startedAt": started,
                "finishedAt": _rfc3339(r.finished or now),
            }
        }
        ok = exit_code == 0 and not r.stopped
        status = {"phase": "Succeeded" if ok else "Failed", "conditions": [scheduled]}
        if r.stopped:  # the operator stops survivors with activeDeadlineSeconds
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
    status["startTime"] = started
    status["containerStatuses"] = [
        {"name": CONTAINER, "ready": code is None, "restartCount": 0, "state": state}
    ]
    return {**r.pod, "metadata": meta, "spec": spec, "status": status}


class JobStatus:
    """status.json of a local FineTuneJob: the operator's planner run on the ranks observed as pods."""

    def __init__(self, job: FineTuneJob, output: Path, cfg: OperatorConfig):
        self.job = job.model_copy(deep=True)
        self.job.spec.run_policy.backoff_limit = 0  # a local gang is never restarted
        self.job.status = FineTuneJobStatus()
        meta = self.job.metadata
        meta.generation = meta.generation or 1  # a created object's first generation
        meta.creation_timestamp = meta.creation_timestamp or _now().replace(microsecond=0)
        self.cfg = cfg
        self.output = output
        self.path = output / STATUS_FILE
        try:  # observed as they would be, so the planner plans no creates
            self.children: tuple[Manifest | None, Manifest | None] = (
                render_config_map(job, cfg),
                render_service(job, cfg),
            )
        except InvalidSpec:  # the first pass says so (admission)
            self.children = (None, None)

    @property
    def status(self) -> FineTuneJobStatus:
        return self.job.status

    def observe(self, ranks: list[RankRun], now: datetime | None = None) -> FineTuneJobStatus:
        """One planning pass over the ranks as they are now; status.json is rewritten when it changed."""
        now = now or _now()
        observed = ftj.Observed(
            pods=[observed_pod(r, now) for r in ranks],
            progress=_read_json(self.output / "progress.json"),
            config_map=self.children[0],
            service=self.children[1],
        )
        plan = ftj.reconcile(self.job, observed, now, self.cfg)
        if plan.status is not None or not self.path.exists():
            self._set(FineTuneJobStatus.model_validate(plan.status) if plan.status else self.job.status)
        return self.job.status

    def fail(self, reason: str, message: str) -> None:
        """Failed for a reason only a local run has (Interrupted, Unsupported)."""
        ctx = Context(self.job, _now(), self.job.status.model_copy(deep=True))
        ctx.cond(FAILED, True, reason, message)  # as the planner's terminal failures set them
        for ctype in (RUNNING, RESTARTING, SUSPENDED):
            ctx.cond(ctype, False, reason, "")
        ctx.st.completion_time = ctx.st.completion_time or ctx.now
        ctx.st.phase = ftj.phase_of(ctx.st)  # type: ignore[assignment]
        self._set(ctx.st)

    def prune(self, message: str, ranks: list[RankRun]) -> None:
        """Pruned by its sweep: the job is planned with the prune annotation it would carry on a cluster;
        unless that pass already ended it, it fails with reason Pruned (its ranks are stopped by the caller)."""
        self.job.metadata.annotations = {**self.job.metadata.annotations, ANN_PRUNE: message}
        if self.observe(ranks).phase not in TERMINAL:
            self.fail(REASON_PRUNED, PRUNED_PREFIX + message)

    def _set(self, st: FineTuneJobStatus) -> None:
        self.job.status = st
        write_status(self.path, st.dump())


def failed_condition(conditions: list[Condition]) -> Condition | None:
    """The Failed condition when it is True (the object is over), else None."""
    return find_condition(conditions, FAILED) if is_true(conditions, FAILED) else None


class _Interrupt:
    """SIGINT and SIGTERM set `.set` instead of raising, so every rank is stopped cleanly."""

    def __init__(self) -> None:
        self.set = False
        self.originals: dict[int, Any] = {}

    def _on(self, _sig: int, _frame: FrameType | None) -> None:
        self.set = True

    def __enter__(self) -> _Interrupt:
        self.originals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in self.originals:
            signal.signal(sig, self._on)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.originals.items():
            signal.signal(sig, handler)


def _start_ranks(job: FineTuneJob, cfg: OperatorConfig, output: Path, status: JobStatus) -> list[RankRun]:
    """Every rank as a process; a pod a process cannot run fails the job (Unsupported) and is raised."""
    cm = render_config_map(job, cfg)
    ports = lp.PortMap()
    ranks: list[RankRun] = []
    try:
        for rank in range(job.spec.num_nodes):
            pod = render_pod(job, cfg, 0, rank)
            prep = lp.prepare(
                pod, {config_map_name(job.metadata.name): cm}, output / ".local" / f"node-{rank}", ports
            )
            log = output / "logs" / f"node-{rank}.log"
            log.unlink(missing_ok=True)
            ranks.append(RankRun(rank, pod, prep, lp.start(prep, log), log, _now()))
    except lp.Unsupported as e:
        _stop_ranks(ranks)
        status.fail("Unsupported", str(e))
        raise
    return ranks


def _stop_ranks(ranks: list[RankRun]) -> None:
    for r in ranks:
        if r.proc.poll() is None:
            r.stopped = True
    for r in ranks:
        lp.stop(r.proc, grace=10)


def _progress_bar(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[sps]} samples/s"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )


# set by a local FineTuneSweep on each trial it starts: its own pid. A trial whose sweep process is gone
# (SIGKILLed: it could not stop its trials) stops its ranks instead of training on unobserved.
SWEEP_PID_ENV = "TAUON_SWEEP_PID"


def orphaned(env: Mapping[str, str], ppid: int) -> str | None:
    """Why this run's sweep is gone (our parent is no longer the pid it set), or None (no sweep, or alive)."""
    want = env.get(SWEEP_PID_ENV, "")
    if not want.isdigit() or int(want) == ppid:
        return None
    return f"its FineTuneSweep process (pid {want}) is gone: all ranks stopped"


def _watch(ranks: list[RankRun], status: JobStatus, interrupt: _Interrupt, quiet: bool) -> None:
    """Plan every half second until the job is Succeeded or Failed, all ranks ended, a signal came, or the
    sweep that started it is gone."""
    with _progress_bar(quiet) as bar:
        task = bar.add_task("training", total=None, loss="-", sps="-")
        while True:
            st = status.observe(ranks)
            p = st.progress
            bar.update(
                task,
                completed=p.step,
                total=p.total_steps or None,
                loss=f"{p.loss:.4f}" if p.loss is not None else "-",
                sps=f"{p.samples_per_second:.1f}" if p.samples_per_second is not None else "-",
            )
            if st.phase in TERMINAL or interrupt.set or all(r.proc.poll() is not None for r in ranks):
                return
            pruned = prune_message(status.output)
            if pruned is not None:
                status.prune(pruned, ranks)
                return
            gone = orphaned(os.environ, os.getppid())
            if gone is not None:
                status.fail("Interrupted", gone)
                return
            time.sleep(0.5)


LOCAL_UID_NAMESPACE = uuid.UUID("6f0d5bd4-3c1e-4d7a-9a55-2f3c1b7e9d10")  # names local jobs' uids


def local_uid(job: FineTuneJob) -> str:
    """The uid of a local FineTuneJob: stable for its namespace/name, different for any other job."""
    meta = job.metadata
    return str(uuid.uuid5(LOCAL_UID_NAMESPACE, f"{meta.namespace or 'default'}/{meta.name}"))


def run_finetunejob(job: FineTuneJob, output: Path, quiet: bool = False) -> int:
    """Train locally; returns the process exit status (0 on success). <output>/status.json follows it."""
    output = output.resolve()
    job.metadata.uid = job.metadata.uid or local_uid(job)  # the output's owner (module docstring)
    job.spec.output.storage = f"file://{output}"
    cfg = OperatorConfig(allow_host_paths=True)
    status = JobStatus(job, output, cfg)
    failed = failed_condition(status.observe([]).conditions)  # admission, as the operator's first pass
    if failed is not None:
        raise InvalidSpec(failed.message)
    pruned = prune_message(output)
    if pruned is not None:  # pruned before it started (a resumed sweep): nothing runs
        status.prune(pruned, [])
        return _report(job, status.status, [], output, quiet)
    ranks = _start_ranks(job, cfg, output, status)
    if not quiet:
        console.print(
            f"[bold]tauon[/] training [cyan]{job.metadata.name}[/]: {job.spec.num_nodes} node(s) x "
            f"{ranks[0].prep.env.get('PET_NPROC_PER_NODE', '1')} process(es), backend "
            f"{ranks[0].prep.env.get('TAUON_DIST_BACKEND')}; logs in {output / 'logs'}"
        )
    try:
        with _Interrupt() as interrupt:
            _watch(ranks, status, interrupt, quiet)
            if interrupt.set and status.status.phase not in TERMINAL:
                status.fail("Interrupted", "tauon run --local was interrupted: all ranks stopped")
    finally:
        _stop_ranks(ranks)
    status.observe(ranks)  # the stopped ranks as the kubelet reports them (status.pods)
    return _report(job, status.status, ranks, output, quiet)


def _report(job: FineTuneJob, st: FineTuneJobStatus, ranks: list[RankRun], output: Path, quiet: bool) -> int:
    """The end of a local run on the console; returns the exit status."""
    if st.phase == SUCCEEDED:
        if not quiet:
            _summary_table(job, output)
        return 0
    failed = failed_condition(st.conditions)
    if failed is not None and failed.reason == "Interrupted":
        console.print("[yellow]interrupted: all ranks stopped[/]")
        return EXIT_INTERRUPTED
    if failed is not None and failed.reason == REASON_PRUNED:
        if not quiet:
            console.print(f"[yellow]FineTuneJob {job.metadata.name} {failed.message}[/]")
        return EXIT_PRUNED
    lf = st.last_failure
    rank = next((r for r in ranks if lf is not None and lf.pod == r.pod["metadata"]["name"]), None)
    if rank is not None:
        code = lp.exit_code(rank.proc.returncode)
        msg = lp.termination_message(rank.prep)
        console.print(f"[red]rank {rank.rank} failed with exit code {code}[/]" + (f": {msg}" if msg else ""))
        console.print(f"[dim]last lines of {rank.log}:[/]\n{_tail(rank.log)}")
    if failed is not None:
        console.print(f"[red]FineTuneJob {job.metadata.name} Failed: {failed.reason}[/]: {failed.message}")
    return (lf.exit_code if lf is not None else None) or 1


def _summary_table(job: FineTuneJob, output: Path) -> None:
    metrics = _read_json(output / "metrics.json") or {}
    table = Table(title=f"{job.metadata.name}: finished", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "steps",
        "epochs",
        "trainLoss",
        "initialEvalAccuracy",
        "evalAccuracy",
        "evalLoss",
        "evalPerplexity",
        "samplesPerSecond",
        "runtimeSeconds",
        "worldSize",
        "backend",
    ):
        if key in metrics:
            v = metrics[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    table.add_row("model", str(output / "model"))
    console.print(table)


# -- InferenceService ------------------------------------------------------------------------------------


def service_status_path(runs: Path, name: str) -> Path:
    return runs / local_service_status_file(name)


def _job_bodies(isvc: InferenceService, runs: Path) -> dict[str, Manifest]:
    """The FineTuneJob spec.model references, as the planner reads it: its local run's status.json."""
    ref = isvc.spec.model.fine_tune_job_ref
    status = _read_json(runs / ref.name / STATUS_FILE) if ref is not None else None
    if ref is None or status is None:
        return {}
    return {
        ref.name: {"metadata": {"name": ref.name, "namespace": isvc.metadata.namespace}, "status": status}
    }


def _sweep_bodies(isvc: InferenceService, runs: Path) -> dict[str, Manifest]:
    """The FineTuneSweep spec.model references (fineTuneSweepRef), as the planner reads it: its local run's
    <runs>/<sweep>/status.json (best.model) and the sweep it ran (.sweep/sweep.json: the template's task)."""
    ref = isvc.spec.model.fine_tune_sweep_ref
    status = _read_json(runs / ref.name / STATUS_FILE) if ref is not None else None
    if ref is None or status is None:
        return {}
    saved = _read_json(runs / ref.name / ".sweep" / "sweep.json") or {}
    meta = {"name": ref.name, "namespace": isvc.metadata.namespace}
    return {ref.name: {"metadata": meta, "spec": saved.get("spec") or {}, "status": status}}


def _model_location(isvc: InferenceService, runs: Path) -> ModelLocation:
    """Where the predictor's model is for a local run: its source, or a FineTuneJob's local output
    (resolved by the operator's rule from that run's status.json)."""
    model = isvc.spec.model
    if model.source and model.source.startswith("pvc://"):
        raise lp.Unsupported("pvc:// sources cannot be served locally; use file:// or hf://")
    res = isv.resolve_model(model, _job_bodies(isvc, runs), None, sweeps=_sweep_bodies(isvc, runs))
    if res.state == "failed":
        raise lp.Unsupported(res.message)
    job = model.fine_tune_job_ref.name if model.fine_tune_job_ref else None
    sweep = model.fine_tune_sweep_ref.name if model.fine_tune_sweep_ref else None
    if res.location is None and sweep is not None:
        raise lp.Unsupported(
            f"no succeeded local run of FineTuneSweep {sweep} in {runs}: run the FineTuneSweep {sweep} "
            f"locally first (tauon run --local SWEEP.yaml --output {runs / sweep})"
        )
    if res.location is None:
        raise lp.Unsupported(
            f"no finished local run of FineTuneJob {job} in {runs}: run the FineTuneJob {job} locally first"
        )
    path = res.location.source.removeprefix("file://")
    what = f"FineTuneJob {job}" if job is not None else f"FineTuneSweep {sweep}" if sweep else None
    if what is not None and res.location.source.startswith("file://") and not Path(path).is_dir():
        raise lp.Unsupported(f"no model at {path}: run the {what} locally first")
    return res.location


class ServiceStatus:
    """<runs>/<name>-server.status.json: the operator's planner run on the local server observed as the
    predictor Deployment (one replica; ready when /v2/health/ready answers)."""

    def __init__(self, isvc: InferenceService, runs: Path):
        self.isvc = isvc.model_copy(deep=True)
        spec = self.isvc.spec
        spec.replicas, spec.autoscaling, spec.canary = 1, None, None  # what a local run serves
        self.isvc.status = InferenceServiceStatus()
        self.isvc.metadata.generation = self.isvc.metadata.generation or 1
        self.cfg = OperatorConfig(allow_host_paths=True)
        self.jobs = _job_bodies(isvc, runs)
        self.sweeps = _sweep_bodies(isvc, runs)
        self.path = service_status_path(runs, isvc.metadata.name)
        self.url: str | None = None  # where the local server listens
        self.written: Manifest | None = None

    def observe(self, ready: bool | None) -> InferenceServiceStatus:
        """One planning pass; `ready` None: no server process (yet, or any more)."""
        st = self._plan(ready)
        self._set(st)
        return st

    def fail(self, reason: str, message: str) -> None:
        """Failed: the server cannot run or has exited (nothing restarts it locally)."""
        ctx = Context(self.isvc, _now(), self._plan(None))
        for ctype in (PREDICTOR_READY, READY):
            ctx.cond(ctype, False, reason, message)
        ctx.st.phase = "Failed"
        self._set(ctx.st)

    def _plan(self, ready: bool | None) -> InferenceServiceStatus:
        observed = isv.Observed(
            fine_tune_jobs=self.jobs, fine_tune_sweeps=self.sweeps, deployments=self._deployments(ready)
        )
        plan = isv.reconcile(self.isvc, observed, _now(), self.cfg)
        return InferenceServiceStatus.model_validate(plan.status) if plan.status else self.isvc.status

    def _deployments(self, ready: bool | None) -> dict[str, Manifest]:
        res = isv.resolve_model(self.isvc.spec.model, self.jobs, None, sweeps=self.sweeps)
        if ready is None or res.location is None:
            return {}
        name = predictor_name(self.isvc.metadata.name)
        dep = next(
            c for c in render(self.isvc, Models(res.location), self.cfg) if c["metadata"]["name"] == name
        )
        n = int(ready)
        status = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": n}
        return {name: {**dep, "metadata": {**dep["metadata"], "generation": 1}, "status": status}}

    def _set(self, st: InferenceServiceStatus) -> None:
        self.isvc.status = st
        out = st.model_copy(deep=True)  # reachable at the local server's URL, not an in-cluster Service
        out.url = self.url
        out.openai.base_url = f"{self.url}/v1" if self.url and out.openai.base_url else None
        for c in out.conditions:
            if st.url and self.url:
                c.message = c.message.replace(st.url, self.url)
        dumped = out.dump()
        if dumped != self.written:
            write_status(self.path, dumped)
            self.written = dumped


def prepare_server(isvc: InferenceService, runs: Path, port: int | None) -> lp.Prepared:
    """The predictor exactly as the operator renders it (command, args, env, mounts), prepared for a local
    process like a training rank: mounts mapped to local paths, its http port to `port` (or a free one),
    listening on 127.0.0.1 only."""
    cfg = OperatorConfig(allow_host_paths=True)
    deployment = render_deployment(isvc, "predictor", _model_location(isvc, runs), 1, cfg)
    pod = {
        "metadata": {"name": deployment["metadata"]["name"], "namespace": isvc.metadata.namespace},
        "spec": deployment["spec"]["template"]["spec"],
    }
    ports = lp.PortMap()
    if port:
        ports.shared[f"{isvc.metadata.namespace}/{pod['metadata']['name']}:{PORT_NAME}"] = port
    prep = lp.prepare(pod, {}, runs / ".local" / f"{isvc.metadata.name}-server", ports)
    prep.argv += ["--host", "127.0.0.1"]
    return prep


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _serve(proc: subprocess.Popen[bytes], status: ServiceStatus, url: str, reprobe: float = 5.0) -> None:
    """Until the server exits: its readiness probed again every `reprobe` seconds into the status."""
    while True:
        try:
            proc.wait(timeout=reprobe)
            return
        except subprocess.TimeoutExpired:
            status.observe(_ready(url))


def serve_inferenceservice(
    isvc: InferenceService, runs: Path, port: int | None, ready_timeout: float = 300
) -> int:
    runs = runs.resolve()
    status = ServiceStatus(isvc, runs)
    try:
        prep = prepare_server(isvc, runs, port)
    except lp.Unsupported as e:
        status.fail("Unsupported", str(e))
        console.print(f"[red]{e}[/]")
        return 1
    port = prep.ports[PORT_NAME]
    url = status.url = f"http://127.0.0.1:{port}"

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # run the finally below: the server must not outlive us

    signal.signal(signal.SIGTERM, on_term)
    log = runs / f"{isvc.metadata.name}-server.log"
    proc = lp.start(prep, log)
    try:  # directly after the start: a signal from here on still stops the server
        status.observe(False)
        model = prep.argv[prep.argv.index("--model") + 1]
        console.print(f"serving [cyan]{isvc.metadata.name}[/] from {model}; logs in {log}")
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline and proc.poll() is None and not _ready(url):
            time.sleep(0.5)
        if proc.poll() is None:
            status.observe(_ready(url))
            console.print(
                f"ready: {url}/v2/models/{isvc.metadata.name}/infer  (V1: {url}/v1/models/{isvc.metadata.name}:predict)"
            )
            print(url, flush=True)
            _serve(proc, status, url)
        code = lp.exit_code(proc.returncode)
        status.fail("ServerExited", f"the model server exited with code {code}: {_tail(log, 3)}")
        console.print(f"[red]server exited with {code}[/]\n{_tail(log)}")
        return 1
    except KeyboardInterrupt:  # stopped like a deleted object: no status left behind
        status.path.unlink(missing_ok=True)
    finally:
        lp.stop(proc, grace=10)
    return 0
