"""FineTuneSweep planner: (sweep, its observed trials, now) -> Plan. Pure; same inputs give the same plan.

The sweep's state is rebuilt from its trials at every pass: each trial is a FineTuneJob `<sweep>-t<k>`
(labels LABEL_SWEEP and LABEL_TRIAL, owned by the sweep) whose parameters were fixed at its creation and
recorded in its ANN_TRIAL_PARAMETERS annotation; they are read back from there, never sampled again.
status.trials remembers trials whose FineTuneJob is gone (deleted by someone), so an index is never
reused. A new trial takes the next index (one past every index known) and its parameters from an
in-memory Optuna study rebuilt from the known trials (finished ones with their objective, failed ones as
FAIL, unfinished ones as RUNNING so the sampler does not pick them again), with the sampler seeded by
(algorithm.seed, k): the same sweep and the same trials always sample the same parameters for trial k.
Grid sweeps take the k-th point of the grid instead (first parameter slowest).

Policy, as named steps (`STEPS`, the first that decides ends the pass): a finished sweep stays finished
(and the trials of a failed one are deleted); maxFailedTrials failed trials fail the sweep
(TooManyFailedTrials) and delete its unfinished trials, whose work would be discarded anyway; maxTrials
finished trials (or the whole grid) end it, Succeeded with status.best, or Failed (NoSuccessfulTrial)
when no trial produced its objective; otherwise trials are created up to parallelTrials unfinished ones,
never while an earlier create has not been observed yet. A converged sweep plans nothing (no writes).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial

from tauon.api.common import is_true
from tauon.api.finetunesweep import (
    FineTuneSweep,
    FineTuneSweepSpec,
    FineTuneSweepStatus,
    SweepBest,
    SweepParameter,
    SweepTrial,
    apply_parameters,
    grid_point,
    grid_size,
    template_dict,
)
from tauon.api.names import (
    ANN_TRIAL_PARAMETERS,
    API_VERSION,
    FAILED,
    FINETUNEJOB,
    FINETUNESWEEP,
    LABEL_MANAGED_BY,
    LABEL_SWEEP,
    LABEL_TRIAL,
    MANAGER,
    REASON_ALL_TRIALS_FINISHED,
    REASON_NO_SUCCESSFUL_TRIAL,
    REASON_TOO_MANY_FAILED_TRIALS,
    REASON_TRIAL_CREATED,
    REASON_TRIALS_RUNNING,
    RUNNING,
    SUCCEEDED,
    Manifest,
)
from tauon.reconcile.context import Context
from tauon.reconcile.plan import Plan
from tauon.render.common import owner_reference

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = ("Succeeded", "Failed", "Pruned")
STOPPED = "stopped: the sweep failed"
GONE = "its FineTuneJob is gone (deleted before it finished, or its create was refused)"

Ctx = Context[FineTuneSweep, FineTuneSweepStatus]


@dataclass
class Observed:
    """The sweep's trials as the operator sees them (FineTuneJob bodies owned by the sweep), and the names
    of trials created but not seen yet (their watch events are on their way)."""

    trials: list[Manifest] = field(default_factory=list)
    creating: list[str] = field(default_factory=list)


@dataclass
class Trial:
    index: int
    record: SweepTrial
    model: str | None = None
    exists: bool = True  # its FineTuneJob is (or is about to be) there

    @property
    def finished(self) -> bool:
        return self.record.phase in FINISHED


@dataclass
class Pass:
    trials: dict[int, Trial]
    creating: bool

    def count(self, *phases: str) -> int:
        return sum(1 for t in self.trials.values() if t.record.phase in phases)

    def unfinished(self) -> list[Trial]:
        return [t for _, t in sorted(self.trials.items()) if not t.finished]


def trial_name(sweep: str, k: int) -> str:
    return f"{sweep}-t{k}"


def trial_index(body: Manifest) -> int | None:
    raw = ((body.get("metadata") or {}).get("labels") or {}).get(LABEL_TRIAL)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _parameters(body: Manifest) -> dict[str, Any]:
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ANN_TRIAL_PARAMETERS) or "{}"
    try:
        got = json.loads(raw)
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def observe_trial(spec: FineTuneSweepSpec, body: Manifest, index: int) -> Trial:
    """A trial's record from its FineTuneJob: phase, and the objective once it succeeded."""
    st = body.get("status") or {}
    output = st.get("output") or {}
    rec = SweepTrial(name=body["metadata"]["name"], parameters=_parameters(body))
    rec.step = (st.get("progress") or {}).get("step") or None
    phase = st.get("phase") or "Pending"
    metric = spec.objective.metric
    if phase == "Succeeded":
        value = (output.get("metrics") or {}).get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            rec.phase, rec.objective = "Succeeded", float(value)
        else:
            rec.phase, rec.message = "Failed", f"succeeded without {metric} in status.output.metrics"
    elif phase == "Failed":
        cond: dict[str, Any] = next((c for c in st.get("conditions") or [] if c.get("type") == FAILED), {})
        rec.phase = "Failed"
        rec.message = f"{cond.get('reason') or 'Failed'}: {cond.get('message') or ''}".rstrip(": ")[:1024]
    else:
        rec.phase = "Pending" if phase == "Pending" else "Running"
    return Trial(index, rec, model=output.get("model"))


def collect(sweep: FineTuneSweep, observed: Observed) -> Pass:
    """Every trial known: the observed FineTuneJobs, then status.trials for those not observed."""
    trials: dict[int, Trial] = {}
    for body in observed.trials:
        if body["metadata"].get("deletionTimestamp"):
            continue  # being deleted: what status.trials says of it stands
        k = trial_index(body)
        if k is not None and body["metadata"]["name"] == trial_name(sweep.metadata.name, k):
            trials[k] = observe_trial(sweep.spec, body, k)
    for rec in sweep.status.trials:
        k = _index_of(sweep.metadata.name, rec.name)
        if k is None or k in trials:
            continue
        t = Trial(k, rec.model_copy(deep=True), exists=rec.name in observed.creating)
        if not t.exists and not t.finished:
            t.record.phase, t.record.message = "Failed", GONE
        trials[k] = t
    return Pass(trials, creating=bool(observed.creating))


def _index_of(sweep: str, name: str) -> int | None:
    prefix = f"{sweep}-t"
    tail = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


# -- sampling --------------------------------------------------------------------------------------------


def distribution(p: SweepParameter) -> BaseDistribution:
    if p.values is not None:
        return CategoricalDistribution(list(p.values))
    assert p.min is not None and p.max is not None
    if p.type == "int":
        return IntDistribution(int(p.min), int(p.max), log=p.log)
    return FloatDistribution(p.min, p.max, log=p.log)


def _seed(seed: int, k: int) -> int:
    """A sampler seed per trial: a fresh study with the same seed would otherwise draw the same values."""
    return (seed * 1_000_003 + k * 7919) % 2**32


def _frozen(t: Trial, dists: dict[str, BaseDistribution]) -> optuna.trial.FrozenTrial | None:
    """A known trial as Optuna's study holds it: COMPLETE with its objective, FAIL, or RUNNING."""
    params = t.record.parameters
    try:
        if t.record.phase == "Succeeded" and t.record.objective is not None:
            return create_trial(params=params, distributions=dists, value=t.record.objective)
        state = TrialState.FAIL if t.finished else TrialState.RUNNING
        return create_trial(params=params, distributions=dists, state=state)
    except ValueError:
        return None  # not from this search space (admission keeps it immutable): the sampler skips it


def sample(spec: FineTuneSweepSpec, trials: list[Trial], k: int) -> dict[str, Any] | None:
    """The parameters of trial k given the trials known (None: a grid that is covered)."""
    if spec.algorithm.type == "grid":
        return grid_point(spec.parameters, k)
    dists = {p.name: distribution(p) for p in spec.parameters}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant_liar is experimental in Optuna
        sampler: optuna.samplers.BaseSampler = (
            optuna.samplers.RandomSampler(seed=_seed(spec.algorithm.seed, k))
            if spec.algorithm.type == "random"
            else optuna.samplers.TPESampler(seed=_seed(spec.algorithm.seed, k), constant_liar=True)
        )
        study = optuna.create_study(sampler=sampler, direction=spec.objective.goal)
        for t in sorted(trials, key=lambda t: t.index):
            frozen = _frozen(t, dists)
            if frozen is not None:
                study.add_trial(frozen)
        params = study.ask(dists).params
    return {p.name: params[p.name] for p in spec.parameters}


def trial_manifest(sweep: FineTuneSweep, k: int, parameters: dict[str, Any]) -> Manifest:
    """FineTuneJob `<sweep>-t<k>`: the template with the parameters set, its output under /<trial>."""
    meta = sweep.metadata
    name = trial_name(meta.name, k)
    spec = apply_parameters(template_dict(sweep.spec.template.spec), parameters)
    spec["output"]["storage"] = f"{sweep.spec.template.spec.output.storage.rstrip('/')}/{name}"
    return {
        "apiVersion": API_VERSION,
        "kind": FINETUNEJOB,
        "metadata": {
            "name": name,
            "namespace": meta.namespace,
            "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_SWEEP: meta.name, LABEL_TRIAL: str(k)},
            "annotations": {ANN_TRIAL_PARAMETERS: json.dumps(parameters, sort_keys=True)},
            "ownerReferences": [owner_reference(FINETUNESWEEP, meta)],
        },
        "spec": spec,
    }


# -- policy steps ------------------------------------------------------------------------------------------


def target_trials(spec: FineTuneSweepSpec) -> int:
    """Trials the sweep runs in all: maxTrials, or fewer when the grid has fewer points."""
    if spec.algorithm.type == "grid":
        return min(spec.max_trials, grid_size(spec.parameters) or 0)
    return spec.max_trials


def _delete_unfinished(ctx: Ctx, p: Pass) -> None:
    for t in p.unfinished():
        if t.exists:
            ctx.plan.deletes.append((FINETUNEJOB, t.record.name))
        t.record.phase, t.record.message = "Failed", STOPPED


def step_finished(ctx: Ctx, p: Pass) -> bool:
    """A sweep that ended stays so; a failed one's unfinished trials are deleted (again, if need be)."""
    if is_true(ctx.st.conditions, SUCCEEDED):
        return True
    if is_true(ctx.st.conditions, FAILED):
        _delete_unfinished(ctx, p)
        return True
    return False


def step_too_many_failures(ctx: Ctx, p: Pass) -> bool:
    failed = p.count("Failed")
    limit = ctx.obj.spec.max_failed_trials
    if failed < limit:
        return False
    _delete_unfinished(ctx, p)
    msg = f"{failed} trials failed (maxFailedTrials {limit}); unfinished trials were deleted"
    ctx.cond(RUNNING, False, REASON_TOO_MANY_FAILED_TRIALS, msg)
    ctx.transition(
        FAILED, True, REASON_TOO_MANY_FAILED_TRIALS, msg, ("Warning", REASON_TOO_MANY_FAILED_TRIALS, msg)
    )
    return True


def step_all_finished(ctx: Ctx, p: Pass) -> bool:
    target = target_trials(ctx.obj.spec)
    if len(p.trials) < target or p.unfinished() or p.creating:
        return False
    best = best_trial(ctx.obj.spec, p)
    if best is None:
        msg = f"none of the {len(p.trials)} trials reported {ctx.obj.spec.objective.metric}"
        ctx.cond(RUNNING, False, REASON_NO_SUCCESSFUL_TRIAL, msg)
        ctx.transition(
            FAILED, True, REASON_NO_SUCCESSFUL_TRIAL, msg, ("Warning", REASON_NO_SUCCESSFUL_TRIAL, msg)
        )
        return True
    msg = f"{len(p.trials)} trials finished; best {best.record.name} ({ctx.obj.spec.objective.metric} {best.record.objective})"
    ctx.cond(RUNNING, False, REASON_ALL_TRIALS_FINISHED, msg)
    ctx.transition(
        SUCCEEDED, True, REASON_ALL_TRIALS_FINISHED, msg, ("Normal", REASON_ALL_TRIALS_FINISHED, msg)
    )
    return True


def step_create_trials(ctx: Ctx, p: Pass) -> bool:
    """Up to parallelTrials unfinished trials, maxTrials in all; none while a create is unobserved."""
    spec = ctx.obj.spec
    if p.creating:
        return False
    room = min(spec.parallel_trials - len(p.unfinished()), target_trials(spec) - len(p.trials))
    for _ in range(max(room, 0)):
        k = max(p.trials, default=-1) + 1
        params = sample(spec, list(p.trials.values()), k)
        if params is None:
            break
        manifest = trial_manifest(ctx.obj, k, params)
        ctx.plan.creates.append(manifest)
        p.trials[k] = Trial(k, SweepTrial(name=manifest["metadata"]["name"], parameters=params))
        ctx.event(
            "Normal",
            REASON_TRIAL_CREATED,
            f"trial {manifest['metadata']['name']}: {json.dumps(params, sort_keys=True)}",
        )
    return False


def step_running(ctx: Ctx, p: Pass) -> bool:
    done = sum(1 for t in p.trials.values() if t.finished)
    msg = f"{len(p.unfinished())} trials running, {done} of {target_trials(ctx.obj.spec)} finished"
    ctx.cond(RUNNING, True, REASON_TRIALS_RUNNING, msg)
    return True


STEPS: tuple[Callable[[Ctx, Pass], bool], ...] = (
    step_finished,
    step_too_many_failures,
    step_all_finished,
    step_create_trials,
    step_running,
)


def best_trial(spec: FineTuneSweepSpec, p: Pass) -> Trial | None:
    """The succeeded trial with the best objective; ties go to the lowest index."""
    done = [t for t in p.trials.values() if t.record.phase == "Succeeded" and t.record.objective is not None]
    if not done:
        return None
    sign = 1.0 if spec.objective.goal == "minimize" else -1.0
    return min(done, key=lambda t: (sign * (t.record.objective or 0.0), t.index))


def _phase(st: FineTuneSweepStatus) -> str:
    for ctype, phase in ((SUCCEEDED, "Succeeded"), (FAILED, "Failed"), (RUNNING, "Running")):
        if is_true(st.conditions, ctype):
            return phase
    return "Pending"


def _finish(ctx: Ctx, p: Pass) -> None:
    st = ctx.st
    for c in st.conditions:
        c.observed_generation = ctx.gen
    st.trials = [t.record for _, t in sorted(p.trials.items())]
    st.finished_trials = sum(1 for t in p.trials.values() if t.finished)
    best = best_trial(ctx.obj.spec, p)
    if best is not None:
        st.best = SweepBest(
            trial=best.record.name,
            parameters=best.record.parameters,
            objective=best.record.objective,
            model=best.model or (st.best.model if st.best and st.best.trial == best.record.name else None),
        )
    st.phase = _phase(st)  # type: ignore[assignment]


def reconcile(sweep: FineTuneSweep, observed: Observed, now: datetime) -> Plan:
    """The plan of one pass; empty when the sweep has converged."""
    ctx: Ctx = Context.start(sweep, sweep.status, now)
    ctx.st.observed_generation = ctx.gen
    p = collect(sweep, observed)
    for step in STEPS:
        if step(ctx, p):
            break
    _finish(ctx, p)
    new = ctx.st.dump()
    if new != sweep.status.dump():
        ctx.plan.status = new
    return ctx.plan
