"""FineTuneJob planner: (job, observed children, now) -> Plan. Pure; same inputs give the same plan.

Follows the API contract's failure semantics: whole-gang restarts for retryable failures (disruptions do
not count toward backoffLimit), immediate failure on `retryable: false`, startup and schedule timeouts,
deadline, suspend/resume, TTL, and stopping (not deleting) survivors of a failed job so their logs stay
readable.

The planner is a list of named policy steps (`STEPS`), run in order on one shared `Context`; the first
step that decides the pass (returns DONE) ends it, and `_finish` turns the context into the Plan. Events
follow the rule in tauon.reconcile.context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tauon.api.common import is_true
from tauon.api.finetunejob import (
    MAX_EVALUATIONS,
    Evaluation,
    FineTuneJob,
    FineTuneJobStatus,
    LastFailure,
    Output,
    Progress,
    ResolvedDataset,
    StrategyEstimate,
)
from tauon.api.names import (
    ANN_PRUNE,
    CREATED,
    FAILED,
    LABEL_ATTEMPT,
    REASON_ALL_PODS_RUNNING,
    REASON_BACKOFF_LIMIT_EXCEEDED,
    REASON_CREATE_FAILED,
    REASON_CREATING,
    REASON_DEADLINE_EXCEEDED,
    REASON_GANG_RECREATED,
    REASON_GANG_RELEASED,
    REASON_GANG_SCHEDULED,
    REASON_INVALID_SPEC,
    REASON_PERMANENT_ERROR,
    REASON_POD_DISRUPTED,
    REASON_POD_FAILED,
    REASON_PODS_CREATED,
    REASON_PRUNED,
    REASON_QUOTA_EXCEEDED,
    REASON_RESOURCE_CONFLICT,
    REASON_RESTARTING,
    REASON_RESUMED,
    REASON_RUNNING,
    REASON_STARTUP_TIMEOUT,
    REASON_SUCCEEDED,
    REASON_SUSPENDED,
    REASON_UNSCHEDULABLE,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Manifest,
)
from tauon.reconcile import pods as P
from tauon.reconcile.context import Context, summarise
from tauon.reconcile.plan import Plan
from tauon.render.common import InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.finetunejob import (
    CONTAINER,
    config_map_name,
    pod_name,
    render_attempt,
    resolve,
    service_name,
    shared_claims,
    validate,
)

RWX = "ReadWriteMany"
ROX = "ReadOnlyMany"
# Backoff between gang attempts (pure: from status.restarts and status.lastFailure.time): the first
# restart is immediate (one lost node should cost nothing), then 10 s doubling per restart, capped at 5 min.
BACKOFF_BASE_SECONDS = 10
BACKOFF_MAX_SECONDS = 300
# Progress values are bounded so a rank 0 reporting nonsense cannot make every status patch invalid.
MAX_PROGRESS_INT = 2**53 - 1  # exact in JSON numbers everywhere
MAX_PROGRESS_FLOAT = 1e15


@dataclass
class Observed:
    """What the handler layer saw in the cluster for one job."""

    pods: list[Manifest] = field(default_factory=list)  # owned by the job (any attempt)
    # (kind, name) of children this operator created whose watch events have not arrived yet: not
    # created again (step_create), and nothing else (missing pods are judged by `pods` alone)
    creating: frozenset[tuple[str, str]] = frozenset()
    config_map: Manifest | None = None
    service: Manifest | None = None
    pvcs: dict[str, list[str]] = field(default_factory=dict)  # claim -> accessModes (known claims only)
    progress: dict[str, Any] | None = None  # rank 0's progress report
    conflicts: list[str] = field(default_factory=list)  # children with our names that are not ours
    refused: list[str] = field(default_factory=list)  # children the API server rejected (422)
    # creates the API server forbade (403: ResourceQuota, PodSecurity), and whether a quota was the cause
    forbidden: list[str] = field(default_factory=list)
    quota_exceeded: bool = False


Ctx = Context[FineTuneJob, FineTuneJobStatus]


@dataclass
class Pass:
    """Facts one planning pass derives from Observed (shared by the steps)."""

    observed: Observed
    cfg: OperatorConfig
    cur: list[Manifest]  # pods of the current attempt
    stale: list[Manifest]  # pods of older attempts
    counted: list[Manifest]  # pods status.pods describes (none while suspended or restarting)


DONE = True  # a step decided this pass
NEXT = False  # go on with the next step
Step = Callable[[Ctx, Pass], bool]


def _status_dump(st: FineTuneJobStatus) -> Manifest:
    return st.model_dump(by_alias=True, exclude_none=True, mode="json")


def phase_of(st: FineTuneJobStatus) -> str:
    for ctype in (FAILED, SUCCEEDED, SUSPENDED, RESTARTING, RUNNING):
        if is_true(st.conditions, ctype):
            return ctype
    return "Pending"


def _stop(ctx: Ctx, active: list[Manifest]) -> None:
    for pod in active:
        if (
            not P.finished(pod)
            and not P.deleting(pod)
            and not pod.get("spec", {}).get("activeDeadlineSeconds")
        ):
            ctx.plan.stops.append(P.name(pod))


def _fail(ctx: Ctx, reason: str, message: str, active: list[Manifest]) -> bool:
    """Terminal failure: Failed condition (one event), survivors stopped, status written first."""
    ctx.transition(FAILED, True, reason, message, ("Warning", reason, message))
    for ctype in (RUNNING, RESTARTING, SUSPENDED):
        ctx.cond(ctype, False, reason, "")
    ctx.st.completion_time = ctx.st.completion_time or ctx.now
    _stop(ctx, active)
    ctx.plan.status_first = True
    return DONE


def _delete_pods(ctx: Ctx, pods: list[Manifest]) -> None:
    for p in pods:
        if not P.deleting(p):
            ctx.plan.deletes.append(("Pod", P.name(p)))


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


def _bounded_number(v: Any) -> bool:
    """False for an int or float out of bounds (NaN, infinite, huge); True for anything else."""
    if isinstance(v, bool):
        return True
    if isinstance(v, int) and abs(v) > MAX_PROGRESS_INT:
        return False
    if isinstance(v, float) and (not math.isfinite(v) or abs(v) > MAX_PROGRESS_FLOAT):
        return False
    return True


def bounded_progress(report: dict[str, Any]) -> Progress | None:
    """A Progress from rank 0's report, or None when any field is unusable (NaN, infinite, huge).
    `evaluations` is bounded entry by entry (bounded_evaluations): a bad entry is dropped, not the report."""
    # percent is ours to compute (an integer for the printer column); the trainer may send a float;
    # "resolved" is read by take_resolved
    fields = {k: v for k, v in report.items() if k not in ("percent", "resolved", "evaluations")}
    if not all(_bounded_number(v) for v in fields.values()):
        return None
    try:
        progress = Progress.model_validate(fields)
    except (ValueError, OverflowError):
        return None
    progress.evaluations = bounded_evaluations(report.get("evaluations"))
    return progress


def thin_evaluations(points: list[Evaluation], limit: int = MAX_EVALUATIONS) -> list[Evaluation]:
    """At most `limit` points of an ascending history: while longer, every other point of the oldest half
    is dropped (the first point and the newest half stay), so the curve keeps its shape with recent steps
    dense and old ones sparse. The same rule as the trainer's (tauon_train.evaluate.thin)."""
    if limit < 2:
        raise ValueError(f"limit must be >= 2, got {limit}")
    out = list(points)
    while len(out) > limit:
        half = max(2, len(out) // 2)
        out = out[:half:2] + out[half:]
    return out


def bounded_evaluations(report: Any) -> list[Evaluation] | None:
    """rank 0's `evaluations` ([{step, trainLoss, evalLoss, evalAccuracy}]) as a bounded, ascending
    history: entries that are not objects, lack an integer step in [0, 2**53) or carry a non-finite or
    huge value are dropped; the last entry wins for a repeated step; thinned to MAX_EVALUATIONS. None
    when the report has no usable list."""
    if not isinstance(report, list):
        return None
    by_step: dict[int, Evaluation] = {}
    for item in report[: 4 * MAX_EVALUATIONS]:  # a report longer than this is not the trainer's
        point = _evaluation(item)
        if point is not None:
            by_step[point.step] = point
    return thin_evaluations([by_step[k] for k in sorted(by_step)])


def _evaluation(item: Any) -> Evaluation | None:
    if not isinstance(item, dict):
        return None
    step = item.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_PROGRESS_INT:
        return None
    values: dict[str, float | None] = {}
    for key in ("trainLoss", "evalLoss", "evalAccuracy"):
        v = item.get(key)
        if v is None:
            values[key] = None
        elif isinstance(v, bool) or not isinstance(v, int | float) or not _bounded_number(v):
            return None
        else:
            values[key] = float(v)
    return Evaluation(
        step=step,
        train_loss=values["trainLoss"],
        eval_loss=values["evalLoss"],
        eval_accuracy=values["evalAccuracy"],
    )


def merge_evaluations(old: list[Evaluation] | None, new: list[Evaluation] | None) -> list[Evaluation] | None:
    """status' history merged with a report's by step: older steps are kept (a restarted attempt reports
    only its own evaluations), the report wins for a step both have; ascending, thinned to
    MAX_EVALUATIONS. None when neither has any."""
    if old is None and new is None:
        return None
    by_step = {e.step: e for e in old or []}
    by_step.update({e.step: e for e in new or []})
    return thin_evaluations([by_step[k] for k in sorted(by_step)])


def _bounded_bytes(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_PROGRESS_INT:
        return None
    return v


def take_resolved(st: FineTuneJobStatus, report: Any) -> None:
    """status.resolved.strategy (and its estimate), status.resolved.dataset and status.resolved.compile from
    what rank 0 reported (`"resolved": {"strategy": "ddp" | "fsdp", "estimateBytes": N, "deviceMemoryBytes":
    N, "dataset": {"shards", "documents", "tokens", "cacheKey", "cacheHit"}, "compile": bool}` in /progress
    or the termination message).
    Each is written once and never overwritten: a later attempt's report (another world size, a cache hit
    on the entry the first attempt wrote) changes nothing. Anything else (unknown strategy, non-integers,
    huge values) is ignored."""
    if not isinstance(report, dict):
        return
    if st.resolved.compile is None and isinstance(report.get("compile"), bool):
        st.resolved.compile = report["compile"]
    if st.resolved.dataset is None:
        st.resolved.dataset = _resolved_dataset(report.get("dataset"))
    if st.resolved.strategy is not None:
        return
    strategy = report.get("strategy")
    if strategy not in ("ddp", "fsdp"):
        return
    state = _bounded_bytes(report.get("estimateBytes", report.get("stateBytesPerRank")))
    device = _bounded_bytes(report.get("deviceMemoryBytes"))
    st.resolved.strategy = strategy
    if state is not None or device is not None:
        st.resolved.estimate = StrategyEstimate(state_bytes_per_rank=state, device_memory_bytes=device)


def _resolved_dataset(report: Any) -> ResolvedDataset | None:
    if not isinstance(report, dict):
        return None
    key = report.get("cacheKey")
    hit = report.get("cacheHit")
    counts = {k: _bounded_bytes(report.get(k)) for k in ("shards", "documents", "tokens")}
    out = ResolvedDataset(
        **counts,
        cache_key=key if isinstance(key, str) and re.fullmatch(r"[0-9a-f]{8,128}", key) else None,
        cache_hit=hit if isinstance(hit, bool) else None,
    )
    return out if out.shards is not None else None


def restart_delay(restarts: int) -> timedelta:
    """How long the gang of the next attempt waits after the failure that caused restart `restarts`."""
    if restarts <= 1:
        return timedelta(0)
    return timedelta(seconds=min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(restarts - 2, 30)))


def next_attempt_at(st: FineTuneJobStatus) -> datetime | None:
    """When the current attempt's gang may be created (None: now). A resume after the failure does not
    wait (start_time moved past it)."""
    lf = st.last_failure
    if st.restarts == 0 or lf is None or lf.time is None:
        return None
    if st.start_time is not None and st.start_time > lf.time:
        return None
    return lf.time + restart_delay(st.restarts)


# -- policy steps, in order ----------------------------------------------------------------------------


def step_finished(ctx: Ctx, p: Pass) -> bool:
    """A Succeeded or Failed job only stops survivors, removes old attempts and honours its TTL."""
    st = ctx.st
    if not (is_true(st.conditions, SUCCEEDED) or is_true(st.conditions, FAILED)):
        return NEXT
    _stop(ctx, p.cur)
    _delete_pods(ctx, [s for s in p.stale if not P.finished(s)])
    ttl = ctx.obj.spec.run_policy.ttl_seconds_after_finished
    if ttl is not None and st.completion_time is not None:
        if ctx.now >= st.completion_time + timedelta(seconds=ttl):
            ctx.plan.delete_self = True
    return DONE


def step_cleanup_and_progress(ctx: Ctx, p: Pass) -> bool:
    """Old attempts' pods go; rank 0's latest progress report is taken into status."""
    _delete_pods(ctx, p.stale)
    report = p.observed.progress
    if not report:
        return NEXT
    take_resolved(ctx.st, report.get("resolved"))
    new = bounded_progress(report)
    if new is None:
        return NEXT
    old = ctx.st.progress
    if old.updated_at is not None and new.updated_at is not None and new.updated_at <= old.updated_at:
        return NEXT
    if new.total_steps:
        new.percent = max(0, min(100, int(100 * new.step / new.total_steps)))
    new.evaluations = merge_evaluations(old.evaluations, new.evaluations)
    ctx.st.progress = new
    return NEXT


def step_admission(ctx: Ctx, p: Pass) -> bool:
    """Rules the schema could not check: operator config, PVC access modes, the API server's refusals."""
    try:
        validate(ctx.obj, p.cfg)
        problem = _pvc_problem(ctx.obj, p.observed.pvcs)
        if problem:
            raise InvalidSpec(problem)
        if p.observed.refused:
            raise InvalidSpec(
                "the API server refused a child: " + summarise(p.observed.refused, "more refused")
            )
    except InvalidSpec as e:
        return _fail(ctx, REASON_INVALID_SPEC, str(e), p.cur)
    return NEXT


def step_conflicts(ctx: Ctx, p: Pass) -> bool:
    """Children with our names that are not ours: say so and touch nothing until they are gone."""
    if not p.observed.conflicts:
        return NEXT
    names = sorted(p.observed.conflicts)
    msg = f"children exist that tauon does not own: {', '.join(names)}"
    ctx.transition(CREATED, False, REASON_RESOURCE_CONFLICT, msg, ("Warning", REASON_RESOURCE_CONFLICT, msg))
    return DONE


def step_defaults(ctx: Ctx, p: Pass) -> bool:
    """Resolve image, processes per node and backend once; start the clock."""
    st = ctx.st
    if st.resolved.image is None:
        st.resolved = resolve(ctx.obj, p.cfg, st.resolved)
    if st.start_time is None:
        st.start_time = ctx.obj.metadata.creation_timestamp or ctx.now
    return NEXT


def prune_message(annotation: str) -> str:
    """The Failed condition's message for a trial its sweep pruned (the annotation holds the rule's why)."""
    why = annotation.strip()
    return f"pruned by its FineTuneSweep: {why}" if why else "pruned by its FineTuneSweep"


def step_prune(ctx: Ctx, p: Pass) -> bool:
    """The sweep set tauon.dev/prune on an unfinished trial: end it (pods deleted, Failed/Pruned, one
    event, no restart). Before suspend, so a suspended trial can be pruned too; a finished job never gets
    here (step_finished)."""
    annotation = ctx.obj.metadata.annotations.get(ANN_PRUNE)
    if annotation is None:
        return NEXT
    message = prune_message(annotation)
    ctx.transition(FAILED, True, REASON_PRUNED, message, ("Normal", REASON_PRUNED, message))
    for ctype in (RUNNING, RESTARTING, SUSPENDED):
        ctx.cond(ctype, False, REASON_PRUNED, "")
    ctx.st.completion_time = ctx.st.completion_time or ctx.now
    _delete_pods(ctx, p.cur)
    ctx.plan.status_first = True
    p.counted = []
    return DONE


def step_suspend(ctx: Ctx, p: Pass) -> bool:
    """runPolicy.suspend deletes the gang; clearing it starts a new attempt."""
    st = ctx.st
    if ctx.obj.spec.run_policy.suspend:
        _delete_pods(ctx, p.cur)
        ctx.transition(
            SUSPENDED,
            True,
            REASON_SUSPENDED,
            "runPolicy.suspend is true: pods deleted",
            ("Normal", REASON_SUSPENDED, "job suspended; pods deleted"),
        )
        ctx.cond(RUNNING, False, REASON_SUSPENDED)
        ctx.cond(RESTARTING, False, REASON_SUSPENDED)
        p.counted = []
        return DONE
    if is_true(st.conditions, SUSPENDED):
        ctx.cond(SUSPENDED, False, REASON_RESUMED, "runPolicy.suspend is false")
        ctx.event("Normal", REASON_RESUMED, "job resumed; starting a new gang")  # a new attempt
        st.attempt += 1
        st.start_time = ctx.now
        ctx.plan.status_first = True
        p.counted = []
        return DONE
    return NEXT


def step_deadline(ctx: Ctx, p: Pass) -> bool:
    """activeDeadlineSeconds, counted from the latest start or resume."""
    limit = ctx.obj.spec.run_policy.active_deadline_seconds
    start = ctx.st.start_time
    if limit and start is not None and ctx.now >= start + timedelta(seconds=limit):
        return _fail(
            ctx, REASON_DEADLINE_EXCEEDED, f"job ran longer than activeDeadlineSeconds ({limit}s)", p.cur
        )
    return NEXT


def _failures(ctx: Ctx, p: Pass) -> list[P.Failure]:
    st, name = ctx.st, ctx.obj.metadata.name
    failures = [f for pod in p.cur if (f := P.classify(pod, CONTAINER, ctx.now)) is not None]
    present = {P.name(pod) for pod in p.cur}
    if st.created_attempt == st.attempt:
        failures += [
            P.missing_failure(pod_name(name, st.attempt, i), ctx.now)
            for i in range(ctx.obj.spec.num_nodes)
            if pod_name(name, st.attempt, i) not in present
        ]
    return sorted(failures, key=lambda f: (f.time, f.pod))


def step_gang_failure(ctx: Ctx, p: Pass) -> bool:
    """The gang is judged by its earliest failure: permanent -> Failed, limit used up -> Failed."""
    failures = _failures(ctx, p)
    if not failures:
        return NEXT
    st, first = ctx.st, failures[0]
    permanent = next((f for f in failures if f.permanent), None)
    if permanent is not None:
        st.last_failure = _last_failure(permanent)
        return _fail(
            ctx,
            REASON_PERMANENT_ERROR,
            f"pod {permanent.pod} failed with a non-retryable error: {permanent.reason}: {permanent.message}",
            p.cur,
        )
    limit = ctx.obj.spec.run_policy.backoff_limit
    if not first.disruption and st.restarts_count_towards_limit >= limit:
        st.last_failure = _last_failure(first)
        return _fail(
            ctx,
            REASON_BACKOFF_LIMIT_EXCEEDED,
            f"pod {first.pod} failed ({first.reason}, exit code {first.exit_code}) and backoffLimit "
            f"({limit}) restarts are used up",
            p.cur,
        )
    return _restart(ctx, p, first)


def _restart(ctx: Ctx, p: Pass, first: P.Failure) -> bool:
    """Whole-gang restart: delete this attempt's pods; the next attempt starts right away."""
    st = ctx.st
    counts = not first.disruption
    st.last_failure = _last_failure(first)
    st.attempt += 1
    st.restarts += 1
    if counts:
        st.restarts_count_towards_limit += 1
    msg = (
        f"restarting the whole gang as attempt {st.attempt}: pod {first.pod} "
        f"{'was disrupted' if first.disruption else 'failed'} ({first.reason}"
        + (f", exit code {first.exit_code}" if first.exit_code is not None else "")
        + ")"
    )
    delay = restart_delay(st.restarts)
    if delay:
        msg += f"; backoff: the new gang starts {int(delay.total_seconds())}s after the failure"
    ctx.cond(RESTARTING, True, REASON_POD_DISRUPTED if first.disruption else REASON_POD_FAILED, msg)
    ctx.cond(RUNNING, False, REASON_RESTARTING, "")
    ctx.event("Warning", REASON_RESTARTING, msg)  # a new attempt
    _delete_pods(ctx, p.cur)
    ctx.plan.status_first = True
    ctx.plan.observations["restart"] = "failure" if counts else "disruption"
    p.counted = []
    return DONE


def step_success(ctx: Ctx, p: Pass) -> bool:
    """Every rank of the current attempt succeeded."""
    n = ctx.obj.spec.num_nodes
    if not (len(p.cur) == n and all(P.phase(pod) == "Succeeded" for pod in p.cur)):
        return NEXT
    st = ctx.st
    ctx.transition(
        SUCCEEDED,
        True,
        REASON_SUCCEEDED,
        f"all {n} nodes finished",
        ("Normal", REASON_SUCCEEDED, f"training finished after {st.restarts} restart(s)"),
    )
    ctx.cond(RUNNING, False, REASON_SUCCEEDED)
    ctx.cond(RESTARTING, False, REASON_SUCCEEDED)
    st.completion_time = st.completion_time or ctx.now
    _success_output(ctx, p.cur)
    return DONE


def step_backoff(ctx: Ctx, p: Pass) -> bool:
    """After a restart the next gang waits its backoff (restart_delay) before any pod is created."""
    if p.cur:
        return NEXT
    at = next_attempt_at(ctx.st)
    if at is None or ctx.now >= at:
        return NEXT
    p.counted = []
    return DONE  # the periodic pass re-plans; nothing to write while waiting


def step_release_partial(ctx: Ctx, p: Pass) -> bool:
    """A partial gang (some pods scheduled, others refused or unschedulable) past scheduleTimeoutSeconds
    holds accelerators nobody can use: delete it as a new attempt (a restart that does not count toward
    backoffLimit); the next gang is created after the backoff (restart_delay)."""
    n = ctx.obj.spec.num_nodes
    live = [pod for pod in p.cur if not P.deleting(pod)]
    scheduled = [pod for pod in live if P.scheduled(pod)]
    if not scheduled or (len(live) == n and len(scheduled) == n):
        return NEXT
    timeout = ctx.obj.spec.run_policy.schedule_timeout_seconds
    if ctx.now - _created_at(ctx, p) < timedelta(seconds=timeout):
        return NEXT
    st = ctx.st
    names = {P.name(pod) for pod in scheduled}
    waiting = sorted(pod_name(ctx.obj.metadata.name, st.attempt, i) for i in range(n))
    waiting = [w for w in waiting if w not in names]
    o = p.observed
    reason = (
        REASON_QUOTA_EXCEEDED
        if o.quota_exceeded
        else REASON_CREATE_FAILED
        if o.forbidden
        else REASON_UNSCHEDULABLE
    )
    msg = (
        f"gang of attempt {st.attempt} not fully placed after {timeout}s ({len(scheduled)}/{n} pods "
        f"scheduled; {summarise(waiting, 'more waiting')} {reason}): releasing its pods"
    )
    st.last_failure = LastFailure(
        pod=waiting[0] if waiting else None, reason=reason, message=msg, time=ctx.now
    )
    st.attempt += 1
    st.restarts += 1
    delay = restart_delay(st.restarts)
    if delay:
        msg += f"; the next gang starts in {int(delay.total_seconds())}s"
    ctx.cond(RESTARTING, True, REASON_GANG_RELEASED, msg)
    ctx.cond(RUNNING, False, REASON_RESTARTING, "")
    ctx.event("Warning", REASON_GANG_RELEASED, msg)
    _delete_pods(ctx, p.cur)
    ctx.plan.status_first = True
    ctx.plan.observations["restart"] = "unschedulable"
    p.counted = []
    return DONE


def step_create(ctx: Ctx, p: Pass) -> bool:
    """Create what is missing of the current attempt and not already on its way (idempotent: 409 means
    already there)."""
    st = ctx.st
    present = {P.name(pod) for pod in p.cur}
    if _nothing_to_create(ctx, p, present):
        return NEXT  # rendering the gang costs more than the rest of a pass: skip it when all is there
    for child in render_attempt(ctx.obj, p.cfg, st.attempt):
        kind, cname = child["kind"], child["metadata"]["name"]
        if (kind, cname) in p.observed.creating:
            continue
        if kind == "ConfigMap" and p.observed.config_map is not None:
            continue
        if kind == "Service" and p.observed.service is not None:
            continue
        if kind == "Pod" and cname in present:
            continue
        if kind == "PodGroup" and st.created_attempt == st.attempt:
            continue
        ctx.plan.creates.append(child)
    if len(p.cur) == ctx.obj.spec.num_nodes and st.created_attempt != st.attempt:
        st.created_attempt = st.attempt
    return NEXT


def _nothing_to_create(ctx: Ctx, p: Pass, present: set[str]) -> bool:
    """Every child of the current attempt is observed or on its way, and the gang was seen whole (so
    created_attempt and the attempt's PodGroup, if any, are done): what step_create would find anyway."""
    st, o, name = ctx.st, p.observed, ctx.obj.metadata.name
    if st.created_attempt != st.attempt:
        return False
    pods = present | {n for kind, n in o.creating if kind == "Pod"}
    return (
        all(pod_name(name, st.attempt, i) in pods for i in range(ctx.obj.spec.num_nodes))
        and (o.config_map is not None or ("ConfigMap", config_map_name(name)) in o.creating)
        and (o.service is not None or ("Service", service_name(name)) in o.creating)
    )


def step_create_forbidden(ctx: Ctx, p: Pass) -> bool:
    """Creates of this gang were forbidden (403): say so once; the periodic pass retries the creates."""
    if not p.observed.forbidden or len(p.cur) == ctx.obj.spec.num_nodes:
        return NEXT
    reason = REASON_QUOTA_EXCEEDED if p.observed.quota_exceeded else REASON_CREATE_FAILED
    msg = f"the API server forbade creating {summarise(p.observed.forbidden, 'more forbidden')}"
    ctx.transition(CREATED, False, reason, msg, ("Warning", reason, msg))
    return DONE


def _created_at(ctx: Ctx, p: Pass) -> datetime:
    times = (P.parse_time(pod["metadata"].get("creationTimestamp")) or ctx.now for pod in p.cur)
    return min(times, default=ctx.now)


def step_scheduling(ctx: Ctx, p: Pass) -> bool:
    """Created condition: all scheduled, or waiting past scheduleTimeoutSeconds (one event)."""
    st, n = ctx.st, ctx.obj.spec.num_nodes
    timeout = ctx.obj.spec.run_policy.schedule_timeout_seconds
    all_present = len(p.cur) == n
    n_sched = sum(1 for pod in p.cur if P.scheduled(pod))
    if all_present and n_sched == n:
        reason = REASON_GANG_SCHEDULED if st.attempt == 0 else REASON_GANG_RECREATED
        ctx.cond(CREATED, True, reason, f"attempt {st.attempt}: all {n} pods scheduled")
    elif all_present and ctx.now - _created_at(ctx, p) >= timedelta(seconds=timeout):
        msg = f"gang not fully scheduled after {timeout}s: {n_sched}/{n} pods scheduled; waiting"
        # Created stays True while waiting: the transition is into the Unschedulable reason
        ctx.transition(CREATED, True, REASON_UNSCHEDULABLE, msg, ("Warning", REASON_UNSCHEDULABLE, msg))

    else:
        ctx.cond(
            CREATED,
            all_present,
            REASON_PODS_CREATED if all_present else REASON_CREATING,
            f"attempt {st.attempt}",
        )
    return NEXT


def step_running(ctx: Ctx, p: Pass) -> bool:
    """Running once every pod of the attempt runs (one event, and time-to-running for attempt 0)."""
    st, n, job = ctx.st, ctx.obj.spec.num_nodes, ctx.obj
    if not (len(p.cur) == n and all(P.phase(pod) == "Running" for pod in p.cur)):
        return NEXT
    if ctx.transition(
        RUNNING,
        True,
        REASON_ALL_PODS_RUNNING,
        f"all {n} pods of attempt {st.attempt} running",
        ("Normal", REASON_RUNNING, f"attempt {st.attempt}: all {n} pods running"),
    ):
        if st.attempt == 0 and job.metadata.creation_timestamp is not None:
            ctx.plan.observations["running_after_seconds"] = (
                ctx.now - job.metadata.creation_timestamp
            ).total_seconds()
    ctx.cond(RESTARTING, False, REASON_ALL_PODS_RUNNING, "")
    return DONE


def step_startup(ctx: Ctx, p: Pass) -> bool:
    """Pods scheduled but not running startupTimeoutSeconds after the gang was fully scheduled."""
    n = ctx.obj.spec.num_nodes
    timeout = ctx.obj.spec.run_policy.startup_timeout_seconds
    if not (len(p.cur) == n and sum(1 for pod in p.cur if P.scheduled(pod)) == n):
        return NEXT
    startup = [pod for pod in p.cur if P.phase(pod) == "Pending"]
    created_at = _created_at(ctx, p)
    # counted from when the gang became fully scheduled (its last pod), not its first: a gang that
    # waited past scheduleTimeoutSeconds must not fail the moment its last pod is placed
    gang_sched = max(
        (
            P.parse_time((P.pod_condition(pod, "PodScheduled") or {}).get("lastTransitionTime")) or created_at
            for pod in p.cur
        ),
        default=created_at,
    )
    if not startup or ctx.now - gang_sched < timedelta(seconds=timeout):
        return NEXT
    detail = ""
    for pod in startup:
        w = P.waiting_error(pod, CONTAINER)
        if w:
            detail = f": pod {P.name(pod)} is waiting with {w[0]} ({w[1]})"
            break
    return _fail(
        ctx,
        REASON_STARTUP_TIMEOUT,
        f"{len(startup)} pod(s) not running {timeout}s after scheduling{detail}",
        p.cur,
    )


STEPS: tuple[Step, ...] = (
    step_finished,
    step_cleanup_and_progress,
    step_admission,
    step_conflicts,
    step_defaults,
    step_prune,
    step_suspend,
    step_deadline,
    step_gang_failure,
    step_success,
    step_backoff,
    step_release_partial,
    step_create,
    step_create_forbidden,
    step_scheduling,
    step_running,
    step_startup,
)


def reconcile(job: FineTuneJob, observed: Observed, now: datetime, cfg: OperatorConfig) -> Plan:
    ctx: Ctx = Context.start(job, job.status, now)
    ctx.st.observed_generation = ctx.gen
    attempt = ctx.st.attempt
    cur = [pod for pod in observed.pods if P.label_int(pod, LABEL_ATTEMPT) == attempt]
    stale = [pod for pod in observed.pods if P.label_int(pod, LABEL_ATTEMPT) != attempt]
    p = Pass(observed, cfg, cur, stale, counted=cur)
    for step in STEPS:
        if step(ctx, p):
            break
    return _finish(ctx, p.counted)


def _success_output(ctx: Ctx, cur: list[Manifest]) -> None:
    storage = ctx.obj.spec.output.storage.rstrip("/")
    metrics: dict[str, Any] = {}
    rank0 = next((p for p in cur if P.name(p) == pod_name(ctx.obj.metadata.name, ctx.st.attempt, 0)), None)
    if rank0 is not None:
        msg = P.termination_message(rank0, CONTAINER) or {}
        if isinstance(msg.get("metrics"), dict):
            metrics = msg["metrics"]
        take_resolved(ctx.st, msg.get("resolved"))
    ctx.st.output = Output(model=f"{storage}/model", metrics=metrics or ctx.st.output.metrics)
    if ctx.st.progress.total_steps:
        ctx.st.progress.step = ctx.st.progress.total_steps
        ctx.st.progress.percent = 100
        ctx.st.progress.eta_seconds = 0


def _last_failure(f: P.Failure) -> LastFailure:
    return LastFailure(
        pod=f.pod, exit_code=f.exit_code, reason=f.reason, message=f.message[:1024], time=f.time
    )


def _finish(ctx: Ctx, counted: list[Manifest]) -> Plan:
    st = ctx.st
    # every condition was re-evaluated against this generation (KEP-1623 observedGeneration)
    for c in st.conditions:
        c.observed_generation = ctx.gen
    active, ready, succeeded, failed = _counts(counted)
    st.pods.active, st.pods.ready, st.pods.succeeded, st.pods.failed = active, ready, succeeded, failed
    st.phase = phase_of(st)  # type: ignore[assignment]
    new = _status_dump(st)
    if new != _status_dump(ctx.obj.status):
        ctx.plan.status = new
    return ctx.plan
