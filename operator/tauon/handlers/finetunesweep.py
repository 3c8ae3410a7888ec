"""Kopf wiring for FineTuneSweep: an index of sweeps and one of their trials (FineTuneJobs labelled with
the sweep), triggers (a trial's events requeue its sweep), and how a sweep is observed. The reconcile
itself is tauon.handlers.skeleton's (leader gate, parse, plan, apply); the planner is
tauon.reconcile.finetunesweep's."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, get_args

import kopf

from tauon import metrics
from tauon.api.finetunesweep import FineTuneSweep, SweepTrial
from tauon.api.names import (
    FINETUNEJOB,
    FINETUNEJOBS,
    FINETUNESWEEP,
    FINETUNESWEEPS,
    GROUP,
    LABEL_SWEEP,
    VERSION,
)
from tauon.handlers import indexes as ix
from tauon.handlers.runtime import RT
from tauon.handlers.skeleton import Controller, register
from tauon.kube.client import owned_by
from tauon.reconcile.finetunesweep import Observed, reconcile
from tauon.reconcile.plan import Plan

log = logging.getLogger("tauon.finetunesweep")
CONTROLLER = "finetunesweep"
TRIAL = {LABEL_SWEEP: kopf.PRESENT}
TRIAL_PHASES: tuple[str, ...] = get_args(SweepTrial.model_fields["phase"].annotation)

# Signatures follow kopf's IndexingFn/WatchingFn protocols (see tauon.handlers.finetunejob).


@kopf.index(GROUP, VERSION, FINETUNESWEEPS, id=ix.FTS)
def index_sweeps(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", name): ix.project_object(body)}


@kopf.index(GROUP, VERSION, FINETUNEJOBS, labels=TRIAL, id=ix.FTS_TRIALS)
def index_trials(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", labels[LABEL_SWEEP]): ix.project_object(body)}


@kopf.on.event(GROUP, VERSION, FINETUNESWEEPS)
async def on_sweep(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    RT.indexes.capture(kwargs)
    ns = namespace or ""
    if type == "DELETED":
        RT.forget((CONTROLLER, ns, name))
        return
    echo = RT.own_write((CONTROLLER, ns, name), kwargs.get("body"))
    RT.trigger(CONTROLLER, ns, name, RT.child_coalesce_seconds if echo else 0.0)


@kopf.on.event(GROUP, VERSION, FINETUNEJOBS, labels=TRIAL)
async def on_trial(namespace: str | None, name: str, labels: kopf.Labels, **kwargs: Any) -> None:
    RT.indexes.capture(kwargs)
    owner = (CONTROLLER, namespace or "", labels[LABEL_SWEEP])
    RT.expectations.observe(owner, (FINETUNEJOB, name))
    RT.trigger(*owner, RT.child_coalesce_seconds)


async def plan_sweep(sweep: FineTuneSweep, body: dict[str, Any], uid: str, now: dt.datetime) -> Plan:
    ns, name = sweep.metadata.namespace or "", sweep.metadata.name
    trials = [b for b in RT.indexes.bodies(ix.FTS_TRIALS, (ns, name)) if owned_by(b, uid)]
    seen = [(FINETUNEJOB, b["metadata"]["name"]) for b in trials]
    creating = RT.expectations.pending((CONTROLLER, ns, name), uid, seen)
    observed = Observed(trials=trials, creating=sorted(n for _, n in creating))
    return reconcile(sweep, observed, now)


CTL: Controller[FineTuneSweep] = Controller(
    name=CONTROLLER,
    kind=FINETUNESWEEP,
    index=ix.FTS,
    parse=FineTuneSweep.model_validate,
    plan=plan_sweep,
    expect=frozenset({FINETUNEJOB}),
)
register(CTL)


def update_gauges() -> None:
    """Trials by phase per namespace (every phase of a namespace with sweeps, 0 when none is in it, so
    Pruned reads 0 rather than nothing), and each sweep's best objective."""
    live = ((key, RT.indexes.live(ix.FTS, key)) for key in all_keys())
    trials, best = sweep_gauges([(key, body) for key, body in live if body is not None])
    metrics.set_phase_counts(metrics.FINETUNESWEEP_TRIALS, trials)
    metrics.set_values(metrics.FINETUNESWEEP_BEST_OBJECTIVE, best)


def sweep_gauges(
    sweeps: list[tuple[tuple[str, str], dict[str, Any]]],
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, ...], float]]:
    """(namespace, trial phase) -> trials, and (namespace, sweep) -> best objective, from the sweeps'
    ((namespace, name), body)."""
    trials: dict[tuple[str, str], int] = {}
    best: dict[tuple[str, ...], float] = {}
    for (ns, name), body in sweeps:
        for phase in TRIAL_PHASES:
            trials.setdefault((ns, phase), 0)
        status = body.get("status") or {}
        for trial in status.get("trials") or []:
            phase = str(trial.get("phase") or "Pending")
            trials[(ns, phase)] = trials.get((ns, phase), 0) + 1
        objective = (status.get("best") or {}).get("objective")
        if isinstance(objective, int | float) and not isinstance(objective, bool):
            best[(ns, name)] = float(objective)
    return trials, best


def all_keys() -> list[tuple[str, str]]:
    return RT.indexes.keys(ix.FTS)
