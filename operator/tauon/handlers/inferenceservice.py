"""Kopf wiring for InferenceService: indexes of services and owned children, triggers (including from the
FineTuneJobs they reference), and how a service is observed. The reconcile itself is
tauon.handlers.skeleton's."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf

from tauon import metrics
from tauon.api.inferenceservice import InferenceService
from tauon.api.names import GROUP, INFERENCESERVICE, INFERENCESERVICES, LABEL_ISVC, VERSION
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


def references(body: dict[str, Any]) -> set[str]:
    """Names of the FineTuneJobs a (raw) InferenceService body serves from."""
    spec = body.get("spec") or {}
    names = set()
    for model in (spec.get("model") or {}, ((spec.get("canary") or {}).get("model")) or {}):
        ref = model.get("fineTuneJobRef") or {}
        if ref.get("name"):
            names.add(ref["name"])
    return names


def on_job_change(namespace: str, job: str) -> None:
    """A FineTuneJob changed: re-evaluate the InferenceServices in its namespace that reference it."""
    for key in RT.indexes.keys(ix.ISVC):
        body = RT.indexes.live(ix.ISVC, key)
        if key[0] == namespace and body is not None and job in references(body):
            RT.trigger(CONTROLLER, key[0], key[1])


def _owned(index: str, key: ix.Key, uid: str) -> list[dict[str, Any]]:
    return [b for b in RT.indexes.bodies(index, key) if owned_by(b, uid)]


async def plan_service(isvc: InferenceService, body: dict[str, Any], uid: str, now: dt.datetime) -> Plan:
    ns, name = isvc.metadata.namespace or "", isvc.metadata.name
    key = (ns, name)
    jobs: dict[str, dict[str, Any]] = {}
    for ref in references(body):
        found = RT.indexes.live(ix.FTJ, (ns, ref))
        if found is not None:
            jobs[ref] = found
    services = _owned(ix.ISVC_SERVICES, key, uid)
    hpas = _owned(ix.ISVC_HPAS, key, uid)
    observed = Observed(
        fine_tune_jobs=jobs,
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
