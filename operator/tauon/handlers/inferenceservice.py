"""Kopf wiring for InferenceService: indexes of services and owned children, triggers (including from the
FineTuneJobs and FineTuneSweeps they reference), and how a service is observed. The reconcile itself is
tauon.handlers.skeleton's."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf

from tauon import metrics
from tauon.api.inferenceservice import InferenceService
from tauon.api.names import (
    FINETUNESWEEPS,
    GROUP,
    INFERENCESERVICE,
    INFERENCESERVICES,
    LABEL_ISVC,
    VERSION,
)
from tauon.handlers import indexes as ix
from tauon.handlers.runtime import RT
from tauon.handlers.skeleton import Controller, register
from tauon.kube.client import owned_by
from tauon.reconcile.inferenceservice import Observed, reconcile
from tauon.reconcile.plan import Plan

log = logging.getLogger("tauon.inferenceservice")
CONTROLLER = "inferenceservice"
CHILD = {LABEL_ISVC: kopf.PRESENT}
HPAS = "horizontalpodautoscalers.v2.autoscaling"

# Signatures follow kopf's IndexingFn/WatchingFn protocols (see tauon.handlers.finetunejob).


@kopf.index(GROUP, VERSION, INFERENCESERVICES, id=ix.ISVC)
def index_services(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", name): ix.project_object(body)}


@kopf.index("deployments", labels=CHILD, id=ix.ISVC_DEPLOYMENTS)
def index_deployments(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", labels[LABEL_ISVC]): ix.project_deployment(body)}


@kopf.index("services", labels=CHILD, id=ix.ISVC_SERVICES)
@kopf.index(HPAS, labels=CHILD, id=ix.ISVC_HPAS)
def index_children(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", labels[LABEL_ISVC]): ix.project_owned(body)}


@kopf.on.event(GROUP, VERSION, INFERENCESERVICES)
async def on_service(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    RT.indexes.capture(kwargs)
    if type == "DELETED":
        RT.forget((CONTROLLER, namespace or "", name))
        return
    RT.trigger(CONTROLLER, namespace or "", name)


@kopf.on.event("deployments", labels=CHILD)
@kopf.on.event("services", labels=CHILD)
@kopf.on.event(HPAS, labels=CHILD)
async def on_child(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    RT.indexes.capture(kwargs)
    RT.trigger(CONTROLLER, namespace or "", labels[LABEL_ISVC])


JOB_REF, SWEEP_REF = "fineTuneJobRef", "fineTuneSweepRef"


def references(body: dict[str, Any], field: str = JOB_REF) -> set[str]:
    """Names of the FineTuneJobs (or, with field fineTuneSweepRef, FineTuneSweeps) a (raw) InferenceService
    body serves from: spec.model's and spec.canary.model's."""
    spec = body.get("spec") or {}
    names = set()
    for model in (spec.get("model") or {}, ((spec.get("canary") or {}).get("model")) or {}):
        ref = model.get(field) or {}
        if ref.get("name"):
            names.add(ref["name"])
    return names


def _trigger_referencing(namespace: str, name: str, field: str) -> None:
    for key in RT.indexes.keys(ix.ISVC):
        body = RT.indexes.live(ix.ISVC, key)
        if key[0] == namespace and body is not None and name in references(body, field):
            RT.trigger(CONTROLLER, key[0], key[1])


def on_job_change(namespace: str, job: str) -> None:
    """A FineTuneJob changed: re-evaluate the InferenceServices in its namespace that reference it."""
    _trigger_referencing(namespace, job, JOB_REF)


def on_sweep_change(namespace: str, sweep: str) -> None:
    """A FineTuneSweep changed: re-evaluate the InferenceServices in its namespace that reference it."""
    _trigger_referencing(namespace, sweep, SWEEP_REF)


@kopf.on.event(GROUP, VERSION, FINETUNESWEEPS, id="inferenceservice_on_sweep")
async def on_referenced_sweep(namespace: str | None, name: str, **kwargs: Any) -> None:
    """Every event of a FineTuneSweep (the sweep controller has its own handler for the same events)."""
    RT.indexes.capture(kwargs)
    on_sweep_change(namespace or "", name)


def _referenced(index: str, ns: str, names: set[str]) -> dict[str, dict[str, Any]]:
    """name -> the live body of each referenced object the index holds (missing ones left out)."""
    found = {ref: RT.indexes.live(index, (ns, ref)) for ref in sorted(names)}
    return {ref: b for ref, b in found.items() if b is not None}


def _owned(index: str, key: ix.Key, uid: str) -> list[dict[str, Any]]:
    return [b for b in RT.indexes.bodies(index, key) if owned_by(b, uid)]


async def plan_service(isvc: InferenceService, body: dict[str, Any], uid: str, now: dt.datetime) -> Plan:
    ns, name = isvc.metadata.namespace or "", isvc.metadata.name
    key = (ns, name)
    services = _owned(ix.ISVC_SERVICES, key, uid)
    hpas = _owned(ix.ISVC_HPAS, key, uid)
    observed = Observed(
        fine_tune_jobs=_referenced(ix.FTJ, ns, references(body, JOB_REF)),
        fine_tune_sweeps=_referenced(ix.FTS, ns, references(body, SWEEP_REF)),
        deployments={d["metadata"]["name"]: d for d in _owned(ix.ISVC_DEPLOYMENTS, key, uid)},
        service=services[0] if services else None,
        hpa=hpas[0] if hpas else None,
        conflicts=await RT.current_conflicts((CONTROLLER, ns, name), uid),
        refused=RT.refusals((CONTROLLER, ns, name), isvc.metadata.generation),
    )
    return reconcile(isvc, observed, now, RT.cfg)


CTL: Controller[InferenceService] = Controller(
    name=CONTROLLER,
    kind=INFERENCESERVICE,
    index=ix.ISVC,
    parse=InferenceService.model_validate,
    plan=plan_service,
)
register(CTL)


def update_phase_gauge() -> None:
    metrics.set_phase_counts(metrics.INFERENCESERVICES, RT.indexes.phase_counts(ix.ISVC))


def all_keys() -> list[tuple[str, str]]:
    return RT.indexes.keys(ix.ISVC)
