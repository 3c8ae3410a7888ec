"""InferenceService planner: (service, observed children and FineTuneJobs, now) -> Plan. Pure; the same
inputs give the same plan, and a converged object gives an empty plan.

Conditions (docs/api.md): ModelReady, PredictorReady, CanaryReady (only while spec.canary is set) and Ready.
- ModelReady is about the MAIN model (spec.model): False/WaitingForFineTuneJob while the referenced job is
  missing or not Succeeded, False/FineTuneJobFailed once it Failed, False/InvalidSpec when the location
  cannot be mounted (file:// without --allow-host-paths), True/ModelResolved once resolved.
  With fineTuneSweepRef: False/WaitingForFineTuneSweep while the sweep is missing, not Succeeded or has
  no best model, False/FineTuneSweepFailed once it Failed, True/ModelResolved with its best trial's model
  (status.best.model; the task of the sweep's template) once it Succeeded.
  `status.model` records the resolved location and is kept when the job (or sweep) is later deleted.
- The canary's model is reported on CanaryReady (same reasons), so a failing canary job never takes the
  predictor down. The canary's resolved location is remembered on its Deployment (annotation
  `tauon.dev/model-source`); until it is known there is no canary Deployment and the predictor takes all
  replicas.
- While a new model is not ready (spec changed to a job still training, or that failed), the previous
  resolved model keeps being served (children are rendered with it); the conditions say not ready.
- PredictorReady / CanaryReady come from the Deployment: readyReplicas >= spec.replicas, updatedReplicas ==
  status.replicas and status.observedGeneration >= metadata.generation -> True/MinimumReplicasAvailable,
  else False/Progressing (False/ProgressDeadlineExceeded when the Deployment says so).
- Ready = ModelReady and PredictorReady (and CanaryReady). Conflicts -> Ready False/ResourceConflict and
  no writes to children.
Phase: Failed when ModelReady's reason is FineTuneJobFailed, FineTuneSweepFailed or InvalidSpec; Ready when Ready; Pending while
ModelReady is False; else NotReady.

status.replicas / readyReplicas are the sums over the observed predictor and canary Deployments
(`status.replicas` / `status.readyReplicas`): spec.replicas is the total over both and status.selector
(`tauon.dev/inference-service=<name>`) selects both, so the scale subresource stays consistent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from tauon.api.common import find_condition, is_true
from tauon.api.inferenceservice import (
    CanaryStatus,
    InferenceService,
    InferenceServiceStatus,
    ResolvedModel,
    ServedModelSpec,
)
from tauon.api.names import (
    ANN_SPEC_HASH,
    CANARY_READY,
    FAILED,
    MODEL_READY,
    PREDICTOR_READY,
    READY,
    REASON_FINE_TUNE_JOB_FAILED,
    REASON_FINE_TUNE_SWEEP_FAILED,
    REASON_INVALID_SPEC,
    REASON_MINIMUM_REPLICAS_AVAILABLE,
    REASON_MODEL_NOT_FOUND,
    REASON_MODEL_RESOLVED,
    REASON_PROGRESS_DEADLINE_EXCEEDED,
    REASON_PROGRESSING,
    REASON_READY,
    REASON_RESOURCE_CONFLICT,
    REASON_SERVING,
    REASON_WAITING_FOR_FINE_TUNE_JOB,
    REASON_WAITING_FOR_FINE_TUNE_SWEEP,
    REASON_WAITING_FOR_MODEL,
    SUCCEEDED,
    TASKS,
    Manifest,
    Task,
)
from tauon.reconcile.context import Context, EventSpec, summarise
from tauon.reconcile.plan import Plan
from tauon.render.common import InvalidSpec
from tauon.render.config import OperatorConfig
from tauon.render.inferenceservice import (
    ModelLocation,
    Models,
    canary_name,
    effective_percent,
    job_model_location,
    location_from_annotations,
    openai_base_url,
    predictor_name,
    render,
    render_deployment,
    replica_plan,
    resolve_runtime,
    selector,
    served_model_name,
    served_task,
    url,
)

FAILED_REASONS = (REASON_FINE_TUNE_JOB_FAILED, REASON_FINE_TUNE_SWEEP_FAILED, REASON_INVALID_SPEC)


@dataclass
class Observed:
    """What the handler layer saw in the cluster for one InferenceService."""

    # name -> FineTuneJob body (same namespace), only the ones spec.model / spec.canary.model reference
    fine_tune_jobs: dict[str, Manifest] = field(default_factory=dict)
    # name -> FineTuneSweep body (same namespace), only the ones spec.model / spec.canary.model reference
    fine_tune_sweeps: dict[str, Manifest] = field(default_factory=dict)
    # name -> our Deployment (`<name>-predictor`, `<name>-canary`), with status
    deployments: dict[str, Manifest] = field(default_factory=dict)
    service: Manifest | None = None
    hpa: Manifest | None = None
    # children with our names that are not ours ("Kind/name" or "name")
    conflicts: list[str] = field(default_factory=list)
    # children the API server refused (422) for this generation: the spec cannot work as written
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Resolution:
    state: Literal["ready", "waiting", "failed"]
    reason: str
    message: str
    location: ModelLocation | None = None  # when ready


def job_state(body: Manifest) -> tuple[str, str]:
    """(Succeeded | Failed | <phase>, detail) of a FineTuneJob (or FineTuneSweep: the same conditions)
    body, from its conditions then its phase."""
    st = body.get("status") or {}
    for c in st.get("conditions") or []:
        if c.get("type") in (FAILED, SUCCEEDED) and c.get("status") == "True":
            detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            return str(c["type"]), detail
    phase = st.get("phase") or "Pending"
    return str(phase), ""


def resolve_model(
    model: ServedModelSpec,
    jobs: Mapping[str, Manifest],
    remembered: ModelLocation | None,
    what: str = "model",
    sweeps: Mapping[str, Manifest] | None = None,
) -> Resolution:
    """Where `model` lives now. `remembered` is the location resolved earlier (status.model for the
    predictor, the canary Deployment's annotations for the canary): used when the job (or sweep) has been
    deleted. `jobs` and `sweeps` are the referenced FineTuneJobs and FineTuneSweeps by name."""
    if model.source is not None:
        return Resolution(
            "ready", REASON_MODEL_RESOLVED, f"{what} {model.source}", ModelLocation(model.source)
        )
    if model.fine_tune_sweep_ref is not None:
        name = model.fine_tune_sweep_ref.name
        return resolve_sweep(name, (sweeps or {}).get(name), remembered, what)
    if model.fine_tune_job_ref is None:  # admission forbids this
        return Resolution(
            "failed",
            REASON_INVALID_SPEC,
            f"{what}: one of fineTuneJobRef, fineTuneSweepRef and source must be set",
        )
    job = model.fine_tune_job_ref.name
    body = jobs.get(job)
    if body is None:
        if remembered is not None and remembered.fine_tune_job == job:
            return Resolution(
                "ready",
                REASON_MODEL_RESOLVED,
                f"{what} {remembered.source} from FineTuneJob {job} (the job no longer exists)",
                remembered,
            )
        return Resolution(
            "waiting",
            REASON_WAITING_FOR_FINE_TUNE_JOB,
            f"FineTuneJob {job} does not exist yet; waiting for it",
        )
    state, detail = job_state(body)
    if state == FAILED:
        return Resolution(
            "failed",
            REASON_FINE_TUNE_JOB_FAILED,
            f"FineTuneJob {job} failed" + (f" ({detail})" if detail else ""),
        )
    if state != SUCCEEDED:
        return Resolution(
            "waiting",
            REASON_WAITING_FOR_FINE_TUNE_JOB,
            f"FineTuneJob {job} is {state}; waiting for it to succeed",
        )
    try:
        loc = job_model_location(body)  # carries the job's task to the renderer (runtime, server args)
    except InvalidSpec as e:
        return Resolution("waiting", REASON_MODEL_NOT_FOUND, str(e))
    loc = ModelLocation(loc.source, job, loc.task)
    return Resolution("ready", REASON_MODEL_RESOLVED, f"{what} {loc.source} from FineTuneJob {job}", loc)


def _task_of(value: object) -> Task | None:
    return next((t for t in TASKS if t == value), None)


def sweep_best(body: Manifest) -> ModelLocation | None:
    """The model of a FineTuneSweep's best trial (raw body): status.best.model, the trial (a FineTuneJob)
    and the task of the sweep's template; None while the sweep reports no best model."""
    best = (body.get("status") or {}).get("best") or {}
    source, trial = best.get("model"), best.get("trial")
    if not isinstance(source, str) or not source or not isinstance(trial, str) or not trial:
        return None
    spec = body.get("spec") or {}
    task = (((spec.get("template") or {}).get("spec") or {}).get("model") or {}).get("task")
    name = str((body.get("metadata") or {}).get("name") or "") or None
    return ModelLocation(source, trial, _task_of(task), name)


def _best_so_far(body: Manifest) -> str:
    """ " (best so far <trial>, <metric> <objective>)" for a running sweep, "" without one."""
    best = (body.get("status") or {}).get("best") or {}
    if not best.get("trial"):
        return ""
    metric = (((body.get("spec") or {}).get("objective") or {}).get("metric")) or "objective"
    objective = best.get("objective")
    return f" (best so far {best['trial']}" + (f", {metric} {objective})" if objective is not None else ")")


def resolve_sweep(
    name: str, body: Manifest | None, remembered: ModelLocation | None, what: str = "model"
) -> Resolution:
    """A fineTuneSweepRef: the best trial's model once the sweep Succeeded; waiting while it is missing,
    runs or reports no best model; failed once it Failed. `remembered` serves on when the sweep is gone."""
    if body is None:
        if remembered is not None and remembered.fine_tune_sweep == name:
            return Resolution(
                "ready",
                REASON_MODEL_RESOLVED,
                f"{what} {remembered.source} from FineTuneSweep {name} (best trial {remembered.fine_tune_job}; "
                "the sweep no longer exists)",
                remembered,
            )
        return Resolution(
            "waiting",
            REASON_WAITING_FOR_FINE_TUNE_SWEEP,
            f"FineTuneSweep {name} does not exist yet; waiting for it",
        )
    state, detail = job_state(body)
    if state == FAILED:
        return Resolution(
            "failed",
            REASON_FINE_TUNE_SWEEP_FAILED,
            f"FineTuneSweep {name} failed" + (f" ({detail})" if detail else ""),
        )
    if state != SUCCEEDED:
        return Resolution(
            "waiting",
            REASON_WAITING_FOR_FINE_TUNE_SWEEP,
            f"FineTuneSweep {name} is {state}{_best_so_far(body)}; waiting for it to succeed",
        )
    loc = sweep_best(body)
    if loc is None:
        return Resolution(
            "waiting",
            REASON_WAITING_FOR_FINE_TUNE_SWEEP,
            f"FineTuneSweep {name} succeeded but reports no best model (status.best.model) yet",
        )
    loc = ModelLocation(loc.source, loc.fine_tune_job, loc.task, name)
    best = (body.get("status") or {}).get("best") or {}
    metric = (((body.get("spec") or {}).get("objective") or {}).get("metric")) or "objective"
    score = f", {metric} {best['objective']}" if best.get("objective") is not None else ""
    return Resolution(
        "ready",
        REASON_MODEL_RESOLVED,
        f"{what} {loc.source} from FineTuneSweep {name} (best trial {loc.fine_tune_job}{score})",
        loc,
    )


def _annotations(obj: Manifest | None) -> dict[str, str]:
    if not obj:
        return {}
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _remembered_on(dep: Manifest | None) -> ModelLocation | None:
    return location_from_annotations(_annotations(dep))


def needs_apply(desired: Manifest, observed: Manifest | None) -> bool:
    """Whether a rendered child differs from what is in the cluster: missing, a different spec hash, or
    (Deployments) replicas changed behind our back (e.g. `kubectl scale deployment`)."""
    if observed is None:
        return True
    if _annotations(observed).get(ANN_SPEC_HASH) != desired["metadata"]["annotations"][ANN_SPEC_HASH]:
        return True
    want = desired.get("spec", {}).get("replicas")
    return want is not None and (observed.get("spec") or {}).get("replicas", 1) != want


@dataclass(frozen=True)
class Rollout:
    ready: bool
    reason: str
    message: str


def deployment_rollout(name: str, observed: Manifest | None, updating: bool) -> Rollout:
    if observed is None:
        return Rollout(False, REASON_PROGRESSING, f"Deployment {name} is being created")
    if updating:
        return Rollout(False, REASON_PROGRESSING, f"Deployment {name} is being updated")
    meta = observed.get("metadata") or {}
    st = observed.get("status") or {}
    desired = int((observed.get("spec") or {}).get("replicas", 1))
    replicas = int(st.get("replicas") or 0)
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    current = int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    if current and ready >= desired and updated == replicas:
        return Rollout(True, REASON_MINIMUM_REPLICAS_AVAILABLE, f"{ready}/{desired} replicas of {name} ready")
    for c in st.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == REASON_PROGRESS_DEADLINE_EXCEEDED:
            return Rollout(
                False,
                REASON_PROGRESS_DEADLINE_EXCEEDED,
                f"Deployment {name}: {c.get('message') or 'progress deadline exceeded'} "
                f"({ready}/{desired} ready)",
            )
    return Rollout(
        False, REASON_PROGRESSING, f"{ready}/{desired} replicas of {name} ready, {updated}/{replicas} updated"
    )


Ctx = Context[InferenceService, InferenceServiceStatus]


def _conflicting(conflicts: list[str], name: str) -> bool:
    return any(c == name or c.endswith("/" + name) for c in conflicts)


@dataclass
class Pass:
    """Facts one planning pass derives (shared by the steps)."""

    observed: Observed
    cfg: OperatorConfig
    main: Resolution | None = None
    serving: ModelLocation | None = None  # what the predictor serves (resolved now, or before)
    canary: Resolution | None = None
    canary_loc: ModelLocation | None = None
    updating: set[str] = field(default_factory=set)  # Deployments being applied this pass


def step_main_model(ctx: Ctx, p: Pass) -> None:
    """ModelReady for spec.model; status.model remembers the resolved location."""
    st = ctx.st
    stored = (
        ModelLocation(st.model.source, st.model.fine_tune_job, st.model.task, st.model.fine_tune_sweep)
        if st.model.source is not None
        else None
    )
    main = resolve_model(
        ctx.obj.spec.model, p.observed.fine_tune_jobs, stored, sweeps=p.observed.fine_tune_sweeps
    )
    if p.observed.refused:  # the spec cannot work as written: Failed/InvalidSpec until it changes
        msg = "the API server refused a child: " + summarise(p.observed.refused, "more refused")
        main = Resolution("failed", REASON_INVALID_SPEC, msg)
    if main.state == "ready" and main.location is not None:
        err = _mount_error(ctx.obj, "predictor", main.location, p.cfg)
        if err is not None:
            main = Resolution("failed", REASON_INVALID_SPEC, err)
    if main.state == "ready" and main.location is not None:
        loc = main.location
        changed = stored is None or (stored.source, stored.fine_tune_job, stored.fine_tune_sweep) != (
            loc.source,
            loc.fine_tune_job,
            loc.fine_tune_sweep,
        )
        # the served task when known: spec.model.task, else the job's or sweep's (carried by the location)
        task = served_task(ctx.obj.spec.model, loc)
        st.model = ResolvedModel(
            source=loc.source, fine_tune_job=loc.fine_tune_job, fine_tune_sweep=loc.fine_tune_sweep, task=task
        )
        if ctx.cond(MODEL_READY, True, main.reason, main.message) or changed:
            ctx.event("Normal", REASON_MODEL_RESOLVED, f"serving {main.message}")
    else:
        event: EventSpec | None = ("Warning", main.reason, main.message) if main.state == "failed" else None
        ctx.transition(MODEL_READY, False, main.reason, main.message, event)
    p.main = main
    # what the predictor serves: the resolved model, else the one resolved before (still serving)
    p.serving = main.location if main.location is not None else stored


def step_canary_model(ctx: Ctx, p: Pass) -> None:
    """The canary's model (its last location is remembered on its Deployment)."""
    spec = ctx.obj.spec
    if spec.canary is None:
        return
    observed_canary = p.observed.deployments.get(canary_name(ctx.obj.metadata.name))
    res = resolve_model(
        spec.canary.model,
        p.observed.fine_tune_jobs,
        _remembered_on(observed_canary),
        "canary model",
        p.observed.fine_tune_sweeps,
    )
    if res.state == "ready" and res.location is not None:
        err = _mount_error(ctx.obj, "canary", res.location, p.cfg)
        if err is not None:
            res = Resolution("failed", REASON_INVALID_SPEC, err)
    p.canary = res
    p.canary_loc = res.location or _remembered_on(observed_canary)


def step_children(ctx: Ctx, p: Pass) -> None:
    """Apply children that differ from the rendered ones; delete the canary and HPA when unset."""
    isvc, observed = ctx.obj, p.observed
    name = isvc.metadata.name
    pred_name, can_name = predictor_name(name), canary_name(name)
    children: list[Manifest] = []
    if p.serving is not None:
        try:
            children = render(isvc, Models(p.serving, p.canary_loc), p.cfg)
        except InvalidSpec as e:  # e.g. a malformed GPU quantity; the model locations were checked above
            ctx.transition(
                MODEL_READY, False, REASON_INVALID_SPEC, str(e), ("Warning", REASON_INVALID_SPEC, str(e))
            )
            children = []
    if observed.conflicts or observed.refused:
        return
    current: dict[tuple[str, str], Manifest | None] = {
        ("Deployment", pred_name): observed.deployments.get(pred_name),
        ("Deployment", can_name): observed.deployments.get(can_name),
        ("Service", name): observed.service,
        ("HorizontalPodAutoscaler", name): observed.hpa,
    }
    for child in children:
        key = (child["kind"], child["metadata"]["name"])
        if needs_apply(child, current.get(key)):
            ctx.plan.applies.append(child)
            p.updating.add(key[1])
    if children:
        if isvc.spec.canary is None and observed.deployments.get(can_name) is not None:
            ctx.plan.deletes.append(("Deployment", can_name))
        if isvc.spec.autoscaling is None and observed.hpa is not None:
            ctx.plan.deletes.append(("HorizontalPodAutoscaler", name))


def step_readiness(ctx: Ctx, p: Pass) -> None:
    """PredictorReady, CanaryReady and Ready (conflicts block Ready)."""
    isvc, observed, st = ctx.obj, p.observed, ctx.st
    name = isvc.metadata.name
    pred_name, can_name = predictor_name(name), canary_name(name)
    assert p.main is not None
    if p.serving is None:
        pred = Rollout(False, REASON_WAITING_FOR_MODEL, "no model to serve yet")
    elif _conflicting(observed.conflicts, pred_name):
        pred = Rollout(
            False, REASON_RESOURCE_CONFLICT, f"Deployment {pred_name} exists and is not owned by {name}"
        )
    else:
        pred = deployment_rollout(pred_name, observed.deployments.get(pred_name), pred_name in p.updating)
    ctx.cond(PREDICTOR_READY, pred.ready, pred.reason, pred.message)
    parts = [(MODEL_READY, p.main.state == "ready"), (PREDICTOR_READY, pred.ready)]

    if isvc.spec.canary is not None and p.canary is not None:
        res = p.canary
        if _conflicting(observed.conflicts, can_name):
            can = Rollout(
                False, REASON_RESOURCE_CONFLICT, f"Deployment {can_name} exists and is not owned by {name}"
            )
        elif res.state != "ready":
            can = Rollout(False, res.reason, res.message)
        elif p.serving is None:
            can = Rollout(False, REASON_WAITING_FOR_MODEL, "no model to serve yet")
        else:
            can = deployment_rollout(can_name, observed.deployments.get(can_name), can_name in p.updating)
        event: EventSpec | None = (
            ("Warning", res.reason, f"canary: {res.message}") if res.state == "failed" else None
        )
        ctx.transition(CANARY_READY, can.ready, can.reason, can.message, event)
        parts.append((CANARY_READY, can.ready))
    else:
        ctx.drop(CANARY_READY)

    if observed.conflicts:
        msg = f"children exist that tauon does not own: {', '.join(sorted(observed.conflicts))}"
        ctx.transition(
            READY, False, REASON_RESOURCE_CONFLICT, msg, ("Warning", REASON_RESOURCE_CONFLICT, msg)
        )
        return
    blocking = next((c for c, ok in parts if not ok), None)
    if blocking is None:
        serving_at = f"serving at {st.url}"
        ctx.transition(READY, True, REASON_SERVING, serving_at, ("Normal", REASON_READY, serving_at))
    else:
        b = find_condition(st.conditions, blocking)
        ctx.cond(READY, False, b.reason if b else REASON_PROGRESSING, b.message if b else "")


def step_replicas_and_phase(ctx: Ctx, p: Pass) -> None:
    """status.replicas/readyReplicas over both Deployments, the canary's share, and the phase."""
    st, observed = ctx.st, p.observed
    name = ctx.obj.metadata.name
    deps = [
        d
        for d in (observed.deployments.get(predictor_name(name)), observed.deployments.get(canary_name(name)))
        if d is not None
    ]
    st.replicas = sum(int((d.get("status") or {}).get("replicas") or 0) for d in deps)
    st.ready_replicas = sum(int((d.get("status") or {}).get("readyReplicas") or 0) for d in deps)
    st.canary = _canary_status(ctx.obj, observed, p.canary_loc is not None and p.serving is not None)
    model_cond = find_condition(st.conditions, MODEL_READY)
    if model_cond is not None and model_cond.status != "True" and model_cond.reason in FAILED_REASONS:
        st.phase = "Failed"
    elif is_true(st.conditions, READY):
        st.phase = "Ready"
    elif not is_true(st.conditions, MODEL_READY):
        st.phase = "Pending"
    else:
        st.phase = "NotReady"


def step_serving_status(ctx: Ctx, p: Pass) -> None:
    """status.resolved.runtime, and status.openai for causal LMs (or vllm): how to call the service."""
    isvc, st = ctx.obj, ctx.st
    task = served_task(isvc.spec.model, p.serving)
    runtime = resolve_runtime(isvc, task, p.serving.source if p.serving is not None else None)
    st.resolved.runtime = runtime
    if task == "causal-lm" or runtime == "vllm":
        st.openai.base_url = openai_base_url(isvc, p.cfg)
        st.openai.model = served_model_name(isvc)
    else:
        st.openai.base_url = None
        st.openai.model = None


STEPS = (
    step_main_model,
    step_canary_model,
    step_children,
    step_readiness,
    step_replicas_and_phase,
    step_serving_status,
)


def reconcile(isvc: InferenceService, observed: Observed, now: datetime, cfg: OperatorConfig) -> Plan:
    ctx: Ctx = Context.start(isvc, isvc.status, now)
    ctx.st.observed_generation = ctx.gen
    ctx.st.url = url(isvc, cfg)
    ctx.st.selector = selector(isvc.metadata.name)
    p = Pass(observed, cfg)
    for step in STEPS:
        step(ctx, p)
    new = _status_dump(ctx.st)
    if new != _status_dump(isvc.status):
        ctx.plan.status = new
    return ctx.plan


def _mount_error(
    isvc: InferenceService, component: Literal["predictor", "canary"], loc: ModelLocation, cfg: OperatorConfig
) -> str | None:
    """InvalidSpec message when the model location cannot be mounted (checked per component)."""
    try:
        render_deployment(isvc, component, loc, 1, cfg)
    except InvalidSpec as e:
        return str(e)
    return None


def _canary_status(isvc: InferenceService, observed: Observed, active: bool) -> CanaryStatus:
    """Planned canary replicas and the share of replicas it gets. With autoscaling the predictor's count is
    the HPA's (the observed Deployment's spec.replicas), falling back to the HPA's minimum."""
    if isvc.spec.canary is None or not active:
        return CanaryStatus()
    plan = replica_plan(isvc, True)
    if plan.predictor is not None:
        return CanaryStatus(replicas=plan.canary, effective_traffic_percent=plan.effective_percent)
    dep = observed.deployments.get(predictor_name(isvc.metadata.name))
    predictor = (dep.get("spec") or {}).get("replicas") if dep is not None else None
    if predictor is None:
        predictor = plan.hpa_min or 0
    return CanaryStatus(
        replicas=plan.canary, effective_traffic_percent=effective_percent(int(predictor), plan.canary)
    )


def _status_dump(st: InferenceServiceStatus) -> Manifest:
    return st.model_dump(by_alias=True, exclude_none=True, mode="json")


__all__ = [
    "Observed",
    "Resolution",
    "deployment_rollout",
    "job_state",
    "needs_apply",
    "reconcile",
    "resolve_model",
    "resolve_sweep",
    "sweep_best",
]
