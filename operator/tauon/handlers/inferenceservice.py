"""Kopf wiring for InferenceService: indexes of services and owned children, triggers (including from the
FineTuneJobs they reference), and the thin reconcile around the pure planner."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf
from pydantic import ValidationError

from tauon import metrics
from tauon.api.inferenceservice import InferenceService
from tauon.handlers.runtime import RT
from tauon.kube.client import owned_by
from tauon.reconcile.inferenceservice import Observed, reconcile
from tauon.render.inferenceservice import LABEL_ISVC

log = logging.getLogger("tauon.inferenceservice")
GROUP, VERSION, PLURAL = "tauon.dev", "v1alpha1", "inferenceservices"
CONTROLLER = "inferenceservice"


@kopf.index(GROUP, VERSION, PLURAL)
def isvc_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): dict(body)}


@kopf.index("deployments", labels={LABEL_ISVC: kopf.PRESENT})
def isvc_deployments_idx(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_ISVC]): dict(body)}


@kopf.index("services", labels={LABEL_ISVC: kopf.PRESENT})
def isvc_services_idx(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_ISVC]): dict(body)}


@kopf.index("horizontalpodautoscalers.v2.autoscaling", labels={LABEL_ISVC: kopf.PRESENT})
def isvc_hpas_idx(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_ISVC]): dict(body)}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def isvc_event(type: str, namespace: str, name: str, **kwargs: Any) -> None:
    RT.remember(**kwargs)
    if type != "DELETED":
        RT.trigger(CONTROLLER, namespace, name)


@kopf.on.event("deployments", labels={LABEL_ISVC: kopf.PRESENT})
@kopf.on.event("services", labels={LABEL_ISVC: kopf.PRESENT})
@kopf.on.event("horizontalpodautoscalers.v2.autoscaling", labels={LABEL_ISVC: kopf.PRESENT})
async def isvc_child_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    RT.remember(**kwargs)
    RT.trigger(CONTROLLER, namespace, labels[LABEL_ISVC])


def references(body: dict[str, Any]) -> set[str]:
    spec = body.get("spec") or {}
    names = set()
    for model in (spec.get("model") or {}, ((spec.get("canary") or {}).get("model")) or {}):
        ref = model.get("fineTuneJobRef") or {}
        if ref.get("name"):
            names.add(ref["name"])
    return names


def on_job_change(namespace: str, job: str) -> None:
    """A FineTuneJob changed: re-evaluate the InferenceServices in its namespace that reference it."""
    for key in RT.keys("isvc_idx"):
        if key[0] == namespace and any(job in references(b) for b in RT.bodies("isvc_idx", key)):
            RT.trigger(CONTROLLER, key[0], key[1])


async def reconcile_service(namespace: str, name: str) -> None:
    assert RT.kube is not None
    key = (namespace, name)
    bodies = RT.bodies("isvc_idx", key)
    if not bodies:
        return
    ctl_key = (CONTROLLER, namespace, name)
    body = RT.freshest(ctl_key, bodies[0])
    if body["metadata"].get("deletionTimestamp"):
        return
    uid = body["metadata"]["uid"]
    try:
        isvc = InferenceService.model_validate(body)
    except ValidationError as e:
        log.error("InferenceService %s/%s does not parse: %s", namespace, name, e)
        return
    jobs: dict[str, dict[str, Any]] = {}
    for ref in references(body):
        found = RT.bodies("ftj_idx", (namespace, ref))
        if found:
            jobs[ref] = found[0]
    deployments = {
        d["metadata"]["name"]: d for d in RT.bodies("isvc_deployments_idx", key) if owned_by(d, uid)
    }
    services = [s for s in RT.bodies("isvc_services_idx", key) if owned_by(s, uid)]
    hpas = [h for h in RT.bodies("isvc_hpas_idx", key) if owned_by(h, uid)]
    observed = Observed(
        fine_tune_jobs=jobs,
        deployments=deployments,
        service=services[0] if services else None,
        hpa=hpas[0] if hpas else None,
        conflicts=await RT.current_conflicts(ctl_key, uid),
    )
    plan = reconcile(isvc, observed, dt.datetime.now(dt.UTC), RT.cfg)
    if plan.is_empty():
        return
    await RT.apply(CONTROLLER, "InferenceService", body, plan)


def update_phase_gauge() -> None:
    metrics.set_phase_counts(metrics.INFERENCESERVICES, RT.phase_counts("isvc_idx"))


def all_keys() -> list[tuple[str, str]]:
    return RT.keys("isvc_idx")


RT.reconcilers[CONTROLLER] = reconcile_service
