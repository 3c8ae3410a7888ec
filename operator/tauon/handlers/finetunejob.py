"""Kopf wiring for FineTuneJob: indexes of jobs and owned children, triggers, how a job is observed, and
the periodic /progress read. The reconcile itself is tauon.handlers.skeleton's."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

import aiohttp
import kopf

from tauon import metrics
from tauon.api.finetunejob import FineTuneJob
from tauon.api.names import FINETUNEJOB, FINETUNEJOBS, GROUP, LABEL_ATTEMPT, LABEL_JOB, VERSION
from tauon.handlers import indexes as ix
from tauon.handlers import inferenceservice, progress
from tauon.handlers.runtime import RT
from tauon.handlers.skeleton import Controller, register
from tauon.kube.client import owned_by, path
from tauon.reconcile import pods as P
from tauon.reconcile.finetunejob import Observed, reconcile
from tauon.reconcile.plan import Plan
from tauon.render.finetunejob import pod_name, shared_claims

log = logging.getLogger("tauon.finetunejob")
CONTROLLER = "finetunejob"
CHILD = {LABEL_JOB: kopf.PRESENT}
_backoff = progress.Backoff()
_reported: dict[ix.Key, str] = {}  # job -> the /progress failure last logged (logged once per change)
POD_RESYNC_SECONDS = 60.0  # a job's pod index is compared with a LIST of its pods at most this often
_resynced: dict[ix.Key, float] = {}  # job -> monotonic time of its last pod LIST

# Index and watch handlers take every keyword Kopf passes (**kwargs) and name only what they use, with
# the types of kopf's IndexingFn/WatchingFn protocols (namespace is None for cluster-scoped objects).


@kopf.index(GROUP, VERSION, FINETUNEJOBS, id=ix.FTJ)
def index_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", name): ix.project_object(body)}


@kopf.index("pods", labels=CHILD, id=ix.FTJ_PODS)
def index_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", labels[LABEL_JOB]): ix.project_pod(body)}


@kopf.index("configmaps", labels=CHILD, id=ix.FTJ_CONFIGMAPS)
@kopf.index("services", labels=CHILD, id=ix.FTJ_SERVICES)
def index_children(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> object:
    return {(namespace or "", labels[LABEL_JOB]): ix.project_owned(body)}


@kopf.on.event(GROUP, VERSION, FINETUNEJOBS)
async def on_job(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    RT.indexes.capture(kwargs)
    ns = namespace or ""
    inferenceservice.on_job_change(ns, name)
    if type == "DELETED":
        RT.forget((CONTROLLER, ns, name))
        _resynced.pop((ns, name), None)
        return
    # the echo of our own status write: the children that pass created are still on their way through
    # their watches, so wait for them (and the pods' events) and make one pass of it all
    echo = RT.own_write((CONTROLLER, ns, name), kwargs.get("body"))
    RT.trigger(CONTROLLER, ns, name, RT.child_coalesce_seconds if echo else 0.0)


@kopf.on.event("pods", labels=CHILD)
async def on_pod(namespace: str | None, name: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    RT.indexes.capture(kwargs)
    owner = (CONTROLLER, namespace or "", labels[LABEL_JOB])
    RT.expectations.observe(owner, ("Pod", name or ""))
    RT.trigger(*owner, RT.child_coalesce_seconds)


@kopf.on.event("configmaps", labels=CHILD)
async def on_config_map(
    type: str, namespace: str | None, name: str | None, labels: kopf.Labels, **kwargs: Any
) -> None:
    _child_event("ConfigMap", type, namespace or "", name or "", labels, kwargs)


@kopf.on.event("services", labels=CHILD)
async def on_service(
    type: str, namespace: str | None, name: str | None, labels: kopf.Labels, **kwargs: Any
) -> None:
    _child_event("Service", type, namespace or "", name or "", labels, kwargs)


def _child_event(
    kind: str, type: str, ns: str, name: str, labels: kopf.Labels, kwargs: dict[str, Any]
) -> None:
    RT.indexes.capture(kwargs)
    owner = (CONTROLLER, ns, labels[LABEL_JOB])
    RT.expectations.observe(owner, (kind, name))
    if type == "DELETED":
        RT.trigger(*owner)


def _owned(index: str, key: ix.Key, uid: str) -> list[dict[str, Any]]:
    return [b for b in RT.indexes.bodies(index, key) if owned_by(b, uid)]


async def resync_pods(ns: str, name: str, now: float | None = None) -> None:
    """At most every POD_RESYNC_SECONDS per job: LIST the job's pods and hide the pod index's entries the
    LIST proves gone (deleted while the watch was away; Kopf does not diff a re-list). Best effort: a
    failed LIST is tried again at the next pass."""
    assert RT.kube is not None
    key, t = (ns, name), time.monotonic() if now is None else now
    if t - _resynced.get(key, -POD_RESYNC_SECONDS) < POD_RESYNC_SECONDS:
        return
    try:
        got = await RT.kube._call("GET", path("Pod", ns), query=[("labelSelector", f"{LABEL_JOB}={name}")])
    except Exception as e:
        log.warning("listing the pods of FineTuneJob %s/%s failed: %s", ns, name, e)
        return
    _resynced[key] = t
    items = [dict(i) for i in got.get("items") or []]
    rv = str((got.get("metadata") or {}).get("resourceVersion") or "")
    dropped = RT.indexes.resync(ix.FTJ_PODS, key, items, rv)
    if dropped:
        log.warning("FineTuneJob %s/%s: pods gone but still indexed: %s", ns, name, ", ".join(dropped))


async def plan_job(job: FineTuneJob, body: dict[str, Any], uid: str, now: dt.datetime) -> Plan:
    assert RT.kube is not None
    ns, name = job.metadata.namespace or "", job.metadata.name
    key = (ns, name)
    if job.status.phase not in ("Succeeded", "Failed"):
        await resync_pods(ns, name)
    cms = _owned(ix.FTJ_CONFIGMAPS, key, uid)
    svcs = _owned(ix.FTJ_SERVICES, key, uid)
    pods = _owned(ix.FTJ_PODS, key, uid)
    seen = [
        (kind, P.name(b))
        for kind, bodies in (("Pod", pods), ("ConfigMap", cms), ("Service", svcs))
        for b in bodies
    ]
    observed = Observed(
        pods=pods,
        creating=RT.expectations.pending((CONTROLLER, ns, name), uid, seen),
        config_map=cms[0] if cms else None,
        service=svcs[0] if svcs else None,
        progress=RT.progress.get(key),
        conflicts=await RT.current_conflicts((CONTROLLER, ns, name), uid),
        refused=RT.refusals((CONTROLLER, ns, name), job.metadata.generation),
        forbidden=RT.forbidden.get((CONTROLLER, ns, name), []),
        quota_exceeded=(CONTROLLER, ns, name) in RT.quota_exceeded,
    )
    if job.spec.num_nodes > 1 and job.status.created_attempt is None:
        for claim in shared_claims(job):
            modes = await RT.kube.pvc_access_modes(ns, claim)
            if modes is not None:
                observed.pvcs[claim] = modes
    return reconcile(job, observed, now, RT.cfg)


def record(body: dict[str, Any], plan: Plan) -> None:
    if "restart" in plan.observations:
        metrics.GANG_RESTARTS.labels(body["metadata"]["namespace"], plan.observations["restart"]).inc()
    if "running_after_seconds" in plan.observations:
        metrics.TIME_TO_RUNNING.observe(plan.observations["running_after_seconds"])


CTL: Controller[FineTuneJob] = Controller(
    name=CONTROLLER,
    kind=FINETUNEJOB,
    index=ix.FTJ,
    parse=FineTuneJob.model_validate,
    plan=plan_job,
    after=record,
    expect=frozenset({"Pod", "ConfigMap", "Service"}),
)
register(CTL)


async def fetch_progress(session: aiohttp.ClientSession) -> None:
    """Read rank 0's /progress for every running job (see tauon.handlers.progress)."""
    loop = asyncio.get_running_loop()
    jobs = [
        (key, body)
        for key in RT.indexes.keys(ix.FTJ)
        if (body := RT.indexes.live(ix.FTJ, key)) is not None
        and (body.get("status") or {}).get("phase") == "Running"
    ]

    async def one(key: ix.Key, body: dict[str, Any]) -> None:
        if not _backoff.ready(key, loop.time()):
            return
        attempt = (body.get("status") or {}).get("attempt", 0)
        uid = body["metadata"].get("uid", "")
        rank0 = next(
            (
                p
                for p in _owned(ix.FTJ_PODS, key, uid)
                if P.name(p) == pod_name(key[1], attempt, 0) and P.label_int(p, LABEL_ATTEMPT) == attempt
            ),
            None,
        )
        addr = progress.address(rank0, RT.cfg.metrics_port, RT.trust_metrics_address) if rank0 else None
        if addr is None:
            return
        try:
            data = await progress.read(session, addr)
        except (aiohttp.ClientError, TimeoutError):
            return  # not serving (yet): try again next period
        except progress.BadReport as e:
            _backoff.failed(key, loop.time(), RT.progress_period_seconds)
            if _reported.get(key) != str(e):
                _reported[key] = str(e)
                log.warning("FineTuneJob %s/%s: ignoring rank 0's /progress: %s", key[0], key[1], e)
            return
        _backoff.ok(key)
        if _reported.pop(key, None) is not None:
            log.info("FineTuneJob %s/%s: rank 0's /progress answers again", key[0], key[1])
        if data != RT.progress.get(key):
            RT.progress[key] = data
            RT.trigger(CONTROLLER, key[0], key[1])

    running = {k for k, _ in jobs}
    for gone in [k for k in _reported if k not in running]:
        del _reported[gone]  # no longer running (or deleted): a new failure is logged again
    await asyncio.gather(*(one(k, b) for k, b in jobs))


def update_phase_gauge() -> None:
    metrics.set_phase_counts(metrics.FINETUNEJOBS, RT.indexes.phase_counts(ix.FTJ))


def all_keys() -> list[tuple[str, str]]:
    return RT.indexes.keys(ix.FTJ)
