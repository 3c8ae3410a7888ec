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

Early stopping (`step_prune`, before creates): each running trial's curve (the objective metric of its
status.progress.evaluations) is judged by Optuna's own pruner (MedianPruner or SuccessiveHalvingPruner)
against a fresh in-memory study of the other trials' curves (`judge`), so the same observed trials always
give the same decision. A trial the rule stops gets the ANN_PRUNE annotation (a merge patch in
`Plan.patches`, once: an annotated trial is not judged again) and shows Running until its FineTuneJob
ends Failed with reason Pruned; then it is Pruned: finished (it counts toward maxTrials), not failed (it
does not count toward maxFailedTrials), and PRUNED with its curve in the sampler's study. ASHA's rungs are
stateless too: a rung a trial reached by the step the last status recorded (status.trials[].
intermediateStep) was judged in an earlier pass, so only rungs reached since are judged now.
"""

from __future__ import annotations

import json
import math
import statistics
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
from optuna.pruners import BasePruner, MedianPruner, SuccessiveHalvingPruner
from optuna.trial import FrozenTrial, TrialState, create_trial

from tauon.api.common import is_true
from tauon.api.finetunesweep import (
    EarlyStopping,
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
    ANN_PRUNE,
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
    REASON_PRUNED,
    REASON_TOO_MANY_FAILED_TRIALS,
    REASON_TRIAL_CREATED,
    REASON_TRIAL_PRUNED,
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
MAX_CURVE = 1000  # evaluations read from a trial (the FineTuneJob keeps at most 100)
ASHA_REDUCTION = 3  # Optuna's default reduction factor: the best third of a rung is promoted
ASHA_RUNG = "completed_rung_{}"  # the system attr SuccessiveHalvingPruner records a trial's rung value in
MAX_MESSAGE = 1024

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
    curve: dict[int, float] = field(default_factory=dict)  # step -> intermediate objective
    pruning: str | None = None  # the ANN_PRUNE message set on it (it is being stopped)
    judged_step: int | None = None  # the last intermediateStep status recorded (ASHA rungs judged)
    _rungs: dict[str, float] | None = None  # its ASHA rung values (computed once per pass)

    @property
    def finished(self) -> bool:
        return self.record.phase in FINISHED

    def rung_values(self, min_steps: int) -> dict[str, float]:
        """Every ASHA rung its curve reached, with its value there."""
        if self._rungs is None:
            self._rungs = rungs(self.curve, min_steps, max(self.curve, default=None))
        return self._rungs


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


def _number(x: Any) -> float | None:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def curve(body: Manifest, metric: str) -> dict[int, float]:
    """step -> the metric, from a FineTuneJob's status.progress.evaluations (entries without a finite
    value, or with a bad step, are skipped; a later entry for a step wins)."""
    evaluations = ((body.get("status") or {}).get("progress") or {}).get("evaluations")
    out: dict[int, float] = {}
    if not isinstance(evaluations, list):
        return out
    for e in evaluations[-MAX_CURVE:]:
        if not isinstance(e, dict):
            continue
        step, value = e.get("step"), _number(e.get(metric))
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0 and value is not None:
            out[step] = value
    return dict(sorted(out.items()))


def observe_trial(spec: FineTuneSweepSpec, body: Manifest, index: int) -> Trial:
    """A trial's record from its FineTuneJob: phase, the objective once it succeeded, its curve."""
    st = body.get("status") or {}
    output = st.get("output") or {}
    rec = SweepTrial(name=body["metadata"]["name"], parameters=_parameters(body))
    rec.step = (st.get("progress") or {}).get("step") or None
    phase = st.get("phase") or "Pending"
    metric = spec.objective.metric
    points = curve(body, metric)
    if points:
        rec.intermediate_step, rec.intermediate = next(reversed(points.items()))
    pruning = ((body.get("metadata") or {}).get("annotations") or {}).get(ANN_PRUNE)
    cond: dict[str, Any] = next((c for c in st.get("conditions") or [] if c.get("type") == FAILED), {})
    if phase == "Succeeded":
        value = _number((output.get("metrics") or {}).get(metric))
        if value is not None:
            rec.phase, rec.objective = "Succeeded", value
        else:
            rec.phase, rec.message = "Failed", f"succeeded without {metric} in status.output.metrics"
    elif phase == "Failed" and cond.get("reason") == REASON_PRUNED:
        rec.phase = "Pruned"
        rec.message = (pruning or cond.get("message") or REASON_PRUNED)[:MAX_MESSAGE]
    elif phase == "Failed":
        rec.phase = "Failed"
        rec.message = f"{cond.get('reason') or 'Failed'}: {cond.get('message') or ''}".rstrip(": ")[
            :MAX_MESSAGE
        ]
    else:
        rec.phase = "Pending" if phase == "Pending" else "Running"
        if pruning:
            rec.message = pruning[:MAX_MESSAGE]  # being stopped by the rule: Pruned once it ended
    return Trial(index, rec, model=output.get("model"), curve=points, pruning=pruning or None)


def collect(sweep: FineTuneSweep, observed: Observed) -> Pass:
    """Every trial known: the observed FineTuneJobs, then status.trials for those not observed."""
    trials: dict[int, Trial] = {}
    recorded = {rec.name: rec for rec in sweep.status.trials}
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
        if rec.intermediate_step is not None and rec.intermediate is not None:
            t.curve = {rec.intermediate_step: rec.intermediate}  # only its last value is remembered
        if not t.exists and not t.finished:
            if rec.phase == "Running" and rec.message:
                t.record.phase = "Pruned"  # the rule was stopping it (a running trial's message says so)
            else:
                t.record.phase, t.record.message = "Failed", GONE
        trials[k] = t
    for t in trials.values():
        old = recorded.get(t.record.name)
        t.judged_step = old.intermediate_step if old is not None else None
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


def _state(t: Trial) -> TrialState:
    if t.record.phase == "Succeeded" and t.record.objective is not None:
        return TrialState.COMPLETE
    if t.record.phase == "Pruned":
        return TrialState.PRUNED
    return TrialState.FAIL if t.finished else TrialState.RUNNING


def _frozen(t: Trial, dists: dict[str, BaseDistribution]) -> FrozenTrial | None:
    """A known trial as Optuna's study holds it: COMPLETE with its objective, PRUNED, FAIL or RUNNING,
    with its curve as intermediate values (a pruned trial ranks by its last one)."""
    state = _state(t)
    try:
        return create_trial(
            params=t.record.parameters,
            distributions=dists,
            state=state,
            value=t.record.objective if state == TrialState.COMPLETE else None,
            intermediate_values=dict(t.curve),
        )
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


# -- early stopping --------------------------------------------------------------------------------------


def pruner(rule: EarlyStopping) -> BasePruner | None:
    """Optuna's pruner of the rule (None: type none)."""
    if rule.type == "median":
        return MedianPruner(
            n_startup_trials=rule.min_trials,
            n_warmup_steps=rule.min_steps,
            interval_steps=1,
            n_min_trials=rule.min_trials,
        )
    if rule.type == "asha":
        return SuccessiveHalvingPruner(
            min_resource=rule.min_steps,
            reduction_factor=ASHA_REDUCTION,
            min_early_stopping_rate=0,
            bootstrap_count=0,
        )
    return None


def rung_step(min_steps: int, rung: int) -> int:
    return int(min_steps * ASHA_REDUCTION**rung)


def rungs(points: dict[int, float], min_steps: int, upto: int | None) -> dict[str, float]:
    """The ASHA rungs a curve reached by step `upto` (None: by none), as SuccessiveHalvingPruner records
    them: rung r holds the value of the first evaluation at or past step min_steps * 3**r."""
    out: dict[str, float] = {}
    if upto is None:
        return out
    rung = 0
    for s, v in sorted(points.items()):
        if s > upto:
            break
        while s >= rung_step(min_steps, rung):
            out[ASHA_RUNG.format(rung)] = v
            rung += 1
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def judge(spec: FineTuneSweepSpec, others: list[Trial], trial: Trial) -> str | None:
    """Whether the early-stopping rule stops a running trial, given the other trials known: the message
    naming the rule and the values, or None. Optuna's pruner decides, on a fresh in-memory study of the
    others (as `_state`, with their curves; ASHA's rung values rebuilt from the curves) plus this trial as
    RUNNING with its curve. Pure: the same trials give the same answer."""
    rule = spec.early_stopping
    judge_with = pruner(rule)
    if judge_with is None or not trial.curve:
        return None
    asha = rule.type == "asha"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(
            direction=spec.objective.goal, sampler=optuna.samplers.RandomSampler(seed=0)
        )
        step = max(trial.curve)
        for o in sorted(others, key=lambda o: o.index):
            state = _state(o)
            # only what the pruner reads: MedianPruner the succeeded trials' values at this step (and how
            # many succeeded), SuccessiveHalvingPruner every trial's rung values
            if asha:
                points: dict[int, float] = {}
                attrs = o.rung_values(rule.min_steps)
                if not attrs:
                    continue
            elif state == TrialState.COMPLETE:
                points, attrs = ({step: o.curve[step]} if step in o.curve else {}), {}
            else:
                continue
            study.add_trial(
                create_trial(
                    state=state,
                    value=o.record.objective if state == TrialState.COMPLETE else None,
                    intermediate_values=points,
                    system_attrs=attrs,
                )
            )
        # ASHA judges a rung once, when a trial first reports past it: rungs reached by the step the last
        # status recorded were judged in an earlier pass
        judged = rungs(trial.curve, rule.min_steps, trial.judged_step) if asha else None
        study.add_trial(
            create_trial(state=TrialState.RUNNING, intermediate_values=dict(trial.curve), system_attrs=judged)
        )
        frozen = study.get_trials(deepcopy=False)[-1]
        if not judge_with.prune(study, frozen):
            return None
        after = study.get_trials(deepcopy=False)[-1]
    metric = spec.objective.metric
    if asha:
        return _asha_message(spec, others, trial, after.system_attrs)
    values = [o.curve[step] for o in others if _state(o) == TrialState.COMPLETE and step in o.curve]
    median = float(statistics.median(values))
    pick = min if spec.objective.goal == "minimize" else max
    best = pick(trial.curve.values())
    return (
        f"median: {metric} {_fmt(best)} (its best by step {step}) is worse than the median "
        f"{_fmt(median)} of {len(values)} succeeded trials at step {step}"
    )


def _asha_message(spec: FineTuneSweepSpec, others: list[Trial], trial: Trial, attrs: dict[str, Any]) -> str:
    rule, metric, step = spec.early_stopping, spec.objective.metric, max(trial.curve)
    rung = max((r for r in range(64) if ASHA_RUNG.format(r) in attrs), default=0)
    key = ASHA_RUNG.format(rung)
    competing = sorted(
        [v for o in others if (v := o.rung_values(rule.min_steps).get(key)) is not None] + [trial.curve[step]]
    )
    keep = max(len(competing) // ASHA_REDUCTION, 1)
    cutoff = competing[keep - 1] if spec.objective.goal == "minimize" else competing[-keep]
    return (
        f"asha: {metric} {_fmt(trial.curve[step])} at step {step} is not in the best {keep} of "
        f"{len(competing)} trials at rung {rung} (step {rung_step(rule.min_steps, rung)}; cutoff {_fmt(cutoff)})"
    )


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


def step_prune(ctx: Ctx, p: Pass) -> bool:
    """The early-stopping rule on each running trial not being stopped yet: annotate the ones it stops."""
    if ctx.obj.spec.early_stopping.type == "none":
        return False
    for t in p.unfinished():
        if t.record.phase != "Running" or not t.exists or t.pruning or not t.curve:
            continue
        others = [o for o in p.trials.values() if o.index != t.index]
        msg = judge(ctx.obj.spec, others, t)
        if msg is None:
            continue
        msg = msg[:MAX_MESSAGE]
        ctx.plan.patches.append((FINETUNEJOB, t.record.name, {"metadata": {"annotations": {ANN_PRUNE: msg}}}))
        t.pruning = t.record.message = msg
        ctx.event("Normal", REASON_TRIAL_PRUNED, f"trial {t.record.name} pruned: {msg}")
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
    step_prune,
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
