"""Kopf wiring for FineTuneJob: indexes of jobs and owned children, triggers, and the thin reconcile
that feeds observed state to the pure planner and applies its plan."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from tauon import metrics
from tauon.api.finetunejob import FineTuneJob
from tauon.handlers.runtime import RT
from tauon.kube.client import owned_by
from tauon.reconcile import pods as P
from tauon.reconcile.finetunejob import Observed, reconcile
from tauon.render.finetunejob import LABEL_ATTEMPT, LABEL_JOB, pod_name, shared_claims

log = logging.getLogger("tauon.finetunejob")
GROUP, VERSION, PLURAL = "tauon.dev", "v1alpha1", "finetunejobs"
CONTROLLER = "finetunejob"
# Dev hook: the process-backed node publishes where a pod's metrics port really listens.
METRICS_ADDRESS_ANNOTATION = "tauon.dev/metrics-address"


@kopf.index(GROUP, VERSION, PLURAL)
def ftj_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): dict(body)}


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT})
def ftj_pods_idx(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_JOB]): dict(body)}


@kopf.index("configmaps", labels={LABEL_JOB: kopf.PRESENT})
def ftj_configmaps_idx(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_JOB]): dict(body)}


@kopf.index("services", labels={LABEL_JOB: kopf.PRESENT})
def ftj_services_idx(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_JOB]): dict(body)}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def ftj_event(type: str, namespace: str, name: str, **kwargs: Any) -> None:
    RT.remember(**kwargs)
    from tauon.handlers.inferenceservice import on_job_change

    on_job_change(namespace, name)
    if type == "DELETED":
        RT.progress.pop((namespace, name), None)
        return
    RT.trigger(CONTROLLER, namespace, name)


@kopf.on.event("pods", labels={LABEL_JOB: kopf.PRESENT})
async def ftj_pod_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    RT.remember(**kwargs)
    RT.trigger(CONTROLLER, namespace, labels[LABEL_JOB])


@kopf.on.event("configmaps", labels={LABEL_JOB: kopf.PRESENT})
@kopf.on.event("services", labels={LABEL_JOB: kopf.PRESENT})
async def ftj_child_event(type: str, namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    RT.remember(**kwargs)
    if type == "DELETED":
        RT.trigger(CONTROLLER, namespace, labels[LABEL_JOB])


async def reconcile_job(namespace: str, name: str) -> None:
    assert RT.kube is not None
    key = (namespace, name)
    bodies = RT.bodies("ftj_idx", key)
    if not bodies:
        return
    ctl_key = (CONTROLLER, namespace, name)
    body = RT.freshest(ctl_key, bodies[0])
    if body["metadata"].get("deletionTimestamp"):
        return
    uid = body["metadata"]["uid"]
    try:
        job = FineTuneJob.model_validate(body)
    except ValidationError as e:
        # Admission should have caught this (e.g. CRDs older than the operator): fail clearly, once.
        if (body.get("status") or {}).get("phase") != "Failed":
            msg = "; ".join(
                f"spec.{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}" for err in e.errors()
            )
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            cond = {
                "type": "Failed",
                "status": "True",
                "reason": "InvalidSpec",
                "message": msg[:2000],
                "lastTransitionTime": now,
                "observedGeneration": body["metadata"].get("generation"),
            }
            await RT.kube.patch_status(
                "FineTuneJob", namespace, name, {"phase": "Failed", "conditions": [cond]}
            )
        return
    pods = [p for p in RT.bodies("ftj_pods_idx", key) if owned_by(p, uid)]
    cms = [c for c in RT.bodies("ftj_configmaps_idx", key) if owned_by(c, uid)]
    svcs = [s for s in RT.bodies("ftj_services_idx", key) if owned_by(s, uid)]
    observed = Observed(
        pods=pods,
        config_map=cms[0] if cms else None,
        service=svcs[0] if svcs else None,
        progress=RT.progress.get(key),
        conflicts=await RT.current_conflicts(ctl_key, uid),
        refused=RT.refused.get(ctl_key, []),
    )
    if job.spec.num_nodes > 1 and job.status.created_attempt is None:
        for claim in shared_claims(job):
            modes = await RT.kube.pvc_access_modes(namespace, claim)
            if modes is not None:
                observed.pvcs[claim] = modes
    now = dt.datetime.now(dt.UTC)
    plan = reconcile(job, observed, now, RT.cfg)
    if plan.is_empty():
        return
    await RT.apply(CONTROLLER, "FineTuneJob", body, plan)
    if "restart" in plan.observations:
        metrics.GANG_RESTARTS.labels(namespace, plan.observations["restart"]).inc()
    if "running_after_seconds" in plan.observations:
        metrics.TIME_TO_RUNNING.observe(plan.observations["running_after_seconds"])


async def fetch_progress(session: aiohttp.ClientSession) -> None:
    """Read rank 0's /progress (the trainer serves it beside /metrics) for every running job."""
    jobs = [
        (key[0], key[1], body)
        for key in RT.keys("ftj_idx")
        for body in RT.bodies("ftj_idx", key)
        if (body.get("status") or {}).get("phase") == "Running"
    ]

    async def one(ns: str, name: str, body: dict[str, Any]) -> None:
        attempt = (body.get("status") or {}).get("attempt", 0)
        rank0 = next(
            (
                p
                for p in RT.bodies("ftj_pods_idx", (ns, name))
                if P.name(p) == pod_name(name, attempt, 0) and P.label_int(p, LABEL_ATTEMPT) == attempt
            ),
            None,
        )
        if rank0 is None:
            return
        addr = (rank0["metadata"].get("annotations") or {}).get(METRICS_ADDRESS_ANNOTATION)
        if not addr:
            ip = (rank0.get("status") or {}).get("podIP")
            if not ip:
                return
            addr = f"{ip}:{RT.cfg.metrics_port}"
        try:
            async with session.get(f"http://{addr}/progress", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    data = await r.json()
                    if isinstance(data, dict) and data != RT.progress.get((ns, name)):
                        RT.progress[(ns, name)] = data
                        RT.trigger(CONTROLLER, ns, name)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return

    await asyncio.gather(*(one(ns, n, b) for ns, n, b in jobs))


def update_phase_gauge() -> None:
    metrics.set_phase_counts(metrics.FINETUNEJOBS, RT.phase_counts("ftj_idx"))


def all_keys() -> list[tuple[str, str]]:
    return RT.keys("ftj_idx")


RT.reconcilers[CONTROLLER] = reconcile_job
