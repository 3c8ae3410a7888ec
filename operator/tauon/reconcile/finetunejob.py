"""FineTuneJob planner: (job, observed children, now) -> Plan. Pure; same inputs give the same plan.

Follows API.md's failure semantics: whole-gang restarts for retryable failures (disruptions do not count
toward backoffLimit), immediate failure on `retryable: false`, startup and schedule timeouts, deadline,
suspend/resume, TTL, and stopping (not deleting) survivors of a failed job so their logs stay readable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tauon.api.finetunejob import FineTuneJob, FineTuneJobStatus, LastFailure, Output, Progress
from tauon.reconcile import pods as P
from tauon.reconcile.conditions import is_true, set_condition
from tauon.reconcile.plan import Event, Plan
from tauon.render.common import InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.finetunejob import (
    CONTAINER,
    LABEL_ATTEMPT,
    pod_name,
    render_attempt,
    resolve,
    shared_claims,
    validate,
)

Manifest = dict[str, Any]
RWX = "ReadWriteMany"
ROX = "ReadOnlyMany"


@dataclass
class Observed:
    """What the handler layer saw in the cluster for one job."""

    pods: list[Manifest] = field(default_factory=list)  # owned by the job (any attempt)
    config_map: Manifest | None = None
    service: Manifest | None = None
    pvcs: dict[str, list[str]] = field(default_factory=dict)  # claim -> accessModes (known claims only)
    progress: dict[str, Any] | None = None  # rank 0's progress report
    conflicts: list[str] = field(default_factory=list)  # children with our names that are not ours
    refused: list[str] = field(default_factory=list)  # children the API server rejected (422)


def _status_dump(st: FineTuneJobStatus) -> Manifest:
    return st.model_dump(by_alias=True, exclude_none=True, mode="json")


def phase_of(st: FineTuneJobStatus) -> str:
    for ctype in ("Failed", "Succeeded", "Suspended", "Restarting", "Running"):
        if is_true(st.conditions, ctype):
            return ctype
    return "Pending"


class _Ctx:
    def __init__(self, job: FineTuneJob, now: datetime):
        self.job = job
        self.now = now
        self.gen = job.metadata.generation
        self.st = copy.deepcopy(job.status)
        self.plan = Plan()

    def cond(self, ctype: str, status: bool, reason: str, message: str = "") -> bool:
        return set_condition(
            self.st.conditions, ctype, "True" if status else "False", reason, message, self.gen, self.now
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))  # type: ignore[arg-type]

    def fail(self, reason: str, message: str, active: list[Manifest]) -> None:
        if self.cond("Failed", True, reason, message):
            self.event("Warning", reason, message)
        for ctype in ("Running", "Restarting", "Suspended"):
            self.cond(ctype, False, reason, "")
        self.st.completion_time = self.st.completion_time or self.now
        self.stop(active)

    def stop(self, active: list[Manifest]) -> None:
        for pod in active:
            if (
                not P.finished(pod)
                and not P.deleting(pod)
                and not pod.get("spec", {}).get("activeDeadlineSeconds")
            ):
                self.plan.stops.append(P.name(pod))


def _counts(cur: list[Manifest]) -> tuple[int, int, int, int]:
    active = sum(1 for p in cur if not P.finished(p) and not P.deleting(p))
    ready = sum(1 for p in cur if P.ready(p) and not P.deleting(p))
    succeeded = sum(1 for p in cur if P.phase(p) == "Succeeded")
    failed = sum(1 for p in cur if P.phase(p) == "Failed")
    return active, ready, succeeded, failed


def _pvc_problem(job: FineTuneJob, pvcs: dict[str, list[str]]) -> str | None:
    if job.spec.num_nodes <= 1:
        return None
    for claim, mode in shared_claims(job).items():
        modes = pvcs.get(claim)
        if modes is None:
            continue  # unknown (not created yet, or not visible): pods wait for it like any pod would
        if mode == "write" and RWX not in modes:
            return (
                f"PersistentVolumeClaim {claim} (spec.output.storage) must be ReadWriteMany for "
                f"numNodes > 1; it is {', '.join(modes) or 'unset'}"
            )
        if mode == "read" and not ({RWX, ROX} & set(modes)):
            return (
                f"PersistentVolumeClaim {claim} (a model/dataset source) must be ReadOnlyMany or "
                f"ReadWriteMany for numNodes > 1; it is {', '.join(modes) or 'unset'}"
            )
    return None


def _progress(ctx: _Ctx, report: dict[str, Any] | None) -> None:
    if not report:
        return
    # percent is ours to compute (an integer for the printer column); the trainer may send a float
    fields = {k: v for k, v in report.items() if k != "percent"}
    try:
        new = Progress.model_validate(fields)
    except ValueError:
        return
    old = ctx.st.progress
    if old.updated_at is not None and new.updated_at is not None and new.updated_at <= old.updated_at:
        return
    if new.total_steps:
        new.percent = max(0, min(100, int(100 * new.step / new.total_steps)))
    ctx.st.progress = new


def _success_output(ctx: _Ctx, cur: list[Manifest]) -> None:
    storage = ctx.job.spec.output.storage.rstrip("/")
    metrics: dict[str, Any] = {}
    rank0 = next((p for p in cur if P.name(p) == pod_name(ctx.job.metadata.name, ctx.st.attempt, 0)), None)
    if rank0 is not None:
        msg = P.termination_message(rank0, CONTAINER) or {}
        if isinstance(msg.get("metrics"), dict):
            metrics = msg["metrics"]
    ctx.st.output = Output(model=f"{storage}/model", metrics=metrics or ctx.st.output.metrics)
    if ctx.st.progress.total_steps:
        ctx.st.progress.step = ctx.st.progress.total_steps
        ctx.st.progress.percent = 100
        ctx.st.progress.eta_seconds = 0


def reconcile(job: FineTuneJob, observed: Observed, now: datetime, cfg: OperatorConfig) -> Plan:
    ctx = _Ctx(job, now)
    st = ctx.st
    spec = job.spec
    policy = spec.run_policy
    name = job.metadata.name
    st.observed_generation = ctx.gen

    def attempt_of(p: Manifest) -> int | None:
        return P.label_int(p, LABEL_ATTEMPT)

    cur = [p for p in observed.pods if attempt_of(p) == st.attempt]
    stale = [p for p in observed.pods if attempt_of(p) != st.attempt]
    terminal = is_true(st.conditions, "Succeeded") or is_true(st.conditions, "Failed")

    if not terminal:
        for p in stale:
            if not P.deleting(p):
                ctx.plan.deletes.append(("Pod", P.name(p)))
        _progress(ctx, observed.progress)

    if terminal:
        ctx.stop(cur)
        for p in stale:
            if not P.deleting(p) and not P.finished(p):
                ctx.plan.deletes.append(("Pod", P.name(p)))
        ttl = policy.ttl_seconds_after_finished
        if (
            ttl is not None
            and st.completion_time is not None
            and now >= st.completion_time + timedelta(seconds=ttl)
        ):
            ctx.plan.delete_self = True
        return _finish(ctx, job, cur)

    # Rules the schema could not check.
    try:
        validate(job, cfg)
        problem = _pvc_problem(job, observed.pvcs)
        if problem:
            raise InvalidSpec(problem)
        if observed.refused:
            raise InvalidSpec("the API server refused a child: " + "; ".join(observed.refused))
    except InvalidSpec as e:
        ctx.fail("InvalidSpec", str(e), cur)
        return _finish(ctx, job, cur)

    if observed.conflicts:
        msg = f"children exist that tauon does not own: {', '.join(sorted(observed.conflicts))}"
        if ctx.cond("Created", False, "ResourceConflict", msg):
            ctx.event("Warning", "ResourceConflict", msg)
        return _finish(ctx, job, cur)

    if st.resolved.image is None:
        r = resolve(job, cfg)
        st.resolved.image, st.resolved.nproc_per_node, st.resolved.backend = (
            r.image,
            r.nproc_per_node,
            r.backend,
        )
    if st.start_time is None:
        st.start_time = job.metadata.creation_timestamp or now

    # Suspend / resume.
    if policy.suspend:
        for p in cur:
            if not P.deleting(p):
                ctx.plan.deletes.append(("Pod", P.name(p)))
        if ctx.cond("Suspended", True, "Suspended", "runPolicy.suspend is true: pods deleted"):
            ctx.event("Normal", "Suspended", "job suspended; pods deleted")
        ctx.cond("Running", False, "Suspended")
        ctx.cond("Restarting", False, "Suspended")
        return _finish(ctx, job, [])
    if is_true(st.conditions, "Suspended"):
        ctx.cond("Suspended", False, "Resumed", "runPolicy.suspend is false")
        ctx.event("Normal", "Resumed", "job resumed; starting a new gang")
        st.attempt += 1
        st.start_time = now
        ctx.plan.status_first = True
        return _finish(ctx, job, [])

    # Deadline, counted from the latest start or resume.
    if policy.active_deadline_seconds and st.start_time is not None:
        if now >= st.start_time + timedelta(seconds=policy.active_deadline_seconds):
            ctx.fail(
                "DeadlineExceeded",
                f"job ran longer than activeDeadlineSeconds ({policy.active_deadline_seconds}s)",
                cur,
            )
            return _finish(ctx, job, cur)

    # Failures of the current attempt (the gang is classified by its earliest failure).
    failures = [f for p in cur if (f := P.classify(p, CONTAINER, now)) is not None]
    present = {P.name(p) for p in cur}
    if st.created_attempt == st.attempt:
        failures += [
            P.missing_failure(pod_name(name, st.attempt, i), now)
            for i in range(spec.num_nodes)
            if pod_name(name, st.attempt, i) not in present
        ]
    if failures:
        first = min(failures, key=lambda f: (f.time, f.pod))
        permanent = next((f for f in sorted(failures, key=lambda f: (f.time, f.pod)) if f.permanent), None)
        if permanent is not None:
            st.last_failure = _last_failure(permanent)
            ctx.fail(
                "PermanentError",
                f"pod {permanent.pod} failed with a non-retryable error: {permanent.reason}: {permanent.message}",
                cur,
            )
            return _finish(ctx, job, cur)
        counts = not first.disruption
        if counts and st.restarts_count_towards_limit >= policy.backoff_limit:
            st.last_failure = _last_failure(first)
            ctx.fail(
                "BackoffLimitExceeded",
                f"pod {first.pod} failed ({first.reason}, exit code {first.exit_code}) and backoffLimit "
                f"({policy.backoff_limit}) restarts are used up",
                cur,
            )
            return _finish(ctx, job, cur)
        # Whole-gang restart: delete this attempt's pods; the next attempt starts right away.
        st.last_failure = _last_failure(first)
        st.attempt += 1
        st.restarts += 1
        if counts:
            st.restarts_count_towards_limit += 1
        kind = "failure" if counts else "disruption"
        msg = (
            f"restarting the whole gang as attempt {st.attempt}: pod {first.pod} "
            f"{'was disrupted' if first.disruption else 'failed'} ({first.reason}"
            + (f", exit code {first.exit_code}" if first.exit_code is not None else "")
            + ")"
        )
        ctx.cond("Restarting", True, "PodDisrupted" if first.disruption else "PodFailed", msg)
        ctx.cond("Running", False, "Restarting", "")
        ctx.event("Warning", "Restarting", msg)
        for p in cur:
            if not P.deleting(p):
                ctx.plan.deletes.append(("Pod", P.name(p)))
        ctx.plan.status_first = True
        ctx.plan.observations["restart"] = kind
        return _finish(ctx, job, [])

    # Success: every rank of the current attempt succeeded.
    if len(cur) == spec.num_nodes and all(P.phase(p) == "Succeeded" for p in cur):
        if ctx.cond("Succeeded", True, "Succeeded", f"all {spec.num_nodes} nodes finished"):
            ctx.event("Normal", "Succeeded", f"training finished after {st.restarts} restart(s)")
        ctx.cond("Running", False, "Succeeded")
        ctx.cond("Restarting", False, "Succeeded")
        st.completion_time = st.completion_time or now
        _success_output(ctx, cur)
        return _finish(ctx, job, cur)

    # Create what is missing of the current attempt (idempotent: 409 means already there).
    children = render_attempt(job, cfg, st.attempt)
    for child in children:
        kind, cname = child["kind"], child["metadata"]["name"]
        if kind == "ConfigMap" and observed.config_map is not None:
            continue
        if kind == "Service" and observed.service is not None:
            continue
        if kind == "Pod" and cname in present:
            continue
        if kind == "PodGroup" and st.created_attempt == st.attempt:
            continue
        ctx.plan.creates.append(child)

    all_present = len(cur) == spec.num_nodes
    if all_present and st.created_attempt != st.attempt:
        st.created_attempt = st.attempt
    created_at = min((P.parse_time(p["metadata"].get("creationTimestamp")) or now for p in cur), default=now)

    # Scheduling and startup timeouts.
    n_sched = sum(1 for p in cur if P.scheduled(p))
    if all_present and n_sched == spec.num_nodes:
        ctx.cond(
            "Created",
            True,
            "GangScheduled" if st.attempt == 0 else "GangRecreated",
            f"attempt {st.attempt}: all {spec.num_nodes} pods scheduled",
        )
    elif all_present and now - created_at >= timedelta(seconds=policy.schedule_timeout_seconds):
        msg = (
            f"gang not fully scheduled after {policy.schedule_timeout_seconds}s: {n_sched}/{spec.num_nodes} "
            "pods scheduled; waiting"
        )
        prev = next((c for c in st.conditions if c.type == "Created"), None)
        if prev is None or prev.reason != "Unschedulable":
            ctx.event("Warning", "Unschedulable", msg)
        ctx.cond("Created", True, "Unschedulable", msg)
    else:
        ctx.cond(
            "Created", all_present, "PodsCreated" if all_present else "Creating", f"attempt {st.attempt}"
        )

    running = all_present and all(P.phase(p) == "Running" for p in cur)
    if running:
        if ctx.cond(
            "Running", True, "AllPodsRunning", f"all {spec.num_nodes} pods of attempt {st.attempt} running"
        ):
            ctx.event("Normal", "Running", f"attempt {st.attempt}: all {spec.num_nodes} pods running")
            if st.attempt == 0 and job.metadata.creation_timestamp is not None:
                ctx.plan.observations["running_after_seconds"] = (
                    now - job.metadata.creation_timestamp
                ).total_seconds()
        ctx.cond("Restarting", False, "AllPodsRunning", "")
    elif n_sched == spec.num_nodes and all_present:
        startup = [p for p in cur if P.phase(p) == "Pending"]
        # counted from when the gang became fully scheduled (its last pod), not its first: a gang that
        # waited past scheduleTimeoutSeconds must not fail the moment its last pod is placed
        gang_sched = max(
            (
                P.parse_time((P.pod_condition(p, "PodScheduled") or {}).get("lastTransitionTime"))
                or created_at
                for p in cur
            ),
            default=created_at,
        )
        if startup and now - gang_sched >= timedelta(seconds=policy.startup_timeout_seconds):
            detail = ""
            for p in startup:
                w = P.waiting_error(p, CONTAINER)
                if w:
                    detail = f": pod {P.name(p)} is waiting with {w[0]} ({w[1]})"
                    break
            ctx.fail(
                "StartupTimeout",
                f"{len(startup)} pod(s) not running {policy.startup_timeout_seconds}s after scheduling{detail}",
                cur,
            )
            return _finish(ctx, job, cur)
    return _finish(ctx, job, cur)


def _last_failure(f: P.Failure) -> LastFailure:
    return LastFailure(
        pod=f.pod, exit_code=f.exit_code, reason=f.reason, message=f.message[:1024], time=f.time
    )


def _finish(ctx: _Ctx, job: FineTuneJob, cur: list[Manifest]) -> Plan:
    st = ctx.st
    # every condition was re-evaluated against this generation (KEP-1623 observedGeneration)
    for c in st.conditions:
        c.observed_generation = ctx.gen
    active, ready, succeeded, failed = _counts(cur)
    st.pods.active, st.pods.ready, st.pods.succeeded, st.pods.failed = active, ready, succeeded, failed
    st.phase = phase_of(st)  # type: ignore[assignment]
    new = _status_dump(st)
    if new != _status_dump(job.status):
        ctx.plan.status = new
    return ctx.plan
