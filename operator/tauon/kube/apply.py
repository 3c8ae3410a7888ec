"""Apply a Plan. Status first when the plan says so (new attempts, terminal transitions: a crash must
never double-count a restart or turn a terminal failure into a restart), otherwise children first and
status last (a crash never records what was not done). In a namespace being deleted nothing is created
and no status or event is written once the API server says so. Status writes carry the resourceVersion the
plan was made from: a stale or ghost body writes nothing (and, status first, does nothing). No pod is created while a non-pod child (the
job's ConfigMap, its Service) is in conflict or refused: pods must never start with a foreign config."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tauon.api.names import Manifest
from tauon.kube.client import Conflict, Forbidden, Invalid, Kube, NamespaceTerminating, Stale
from tauon.reconcile.plan import Event, Plan

PostEvent = Callable[[Event], Awaitable[None]]


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning old into new (None deletes a key)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out: dict[str, Any] = {}
    for k in old.keys() - new.keys():
        out[k] = None
    for k, v in new.items():
        if k not in old:
            out[k] = v
        elif old[k] != v:
            out[k] = merge_patch(old[k], v)
    return out


class ApplyResult:
    def __init__(self) -> None:
        self.conflicts: list[str] = []  # "Kind/name" of children with our names that are not ours
        self.invalid: list[str] = []  # children the API server refused (422)
        self.forbidden: list[Forbidden] = []  # creates the API server forbade (403: quota, PodSecurity)
        self.written: Manifest | None = None  # the object after our status write
        self.skipped_pods: int = 0  # pods not created because a non-pod child failed
        self.stale = False  # the object changed since the plan was made: nothing after that was done
        self.namespace_terminating = False  # creates refused: the namespace is being deleted
        self.gone = False  # the object no longer exists (its status write found nothing)
        self.created: list[tuple[str, str]] = []  # (kind, name) of creates that succeeded (or existed)


async def apply_plan(
    kube: Kube, kind: str, obj: Manifest, plan: Plan, post_event: PostEvent | None = None
) -> ApplyResult:
    meta = obj["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    result = ApplyResult()

    async def write_status() -> None:
        if plan.status is not None:
            patch = merge_patch(obj.get("status") or {}, plan.status)
            if patch:
                rv = meta.get("resourceVersion")
                result.written = await kube.patch_status(kind, ns, name, patch, resource_version=rv)
                result.gone = result.written is None  # 404: a ghost a cache still held

    async def guarded(coro: Awaitable[None]) -> bool:
        try:
            await coro
        except Conflict as e:
            result.conflicts.append(f"{e.kind}/{e.name}")
        except Invalid as e:
            result.invalid.append(str(e))
        except Forbidden as e:
            result.forbidden.append(e)
        except NamespaceTerminating:
            result.namespace_terminating = True
        else:
            return True
        return False

    try:
        if plan.status_first:
            await write_status()
    except Stale:
        result.stale = True  # decided on an old version: do none of it; the newer version triggers a pass
        return result
    if result.gone:
        return result
    await asyncio.gather(*(kube.delete(k, ns, n) for k, n in plan.deletes))
    await asyncio.gather(*(kube.stop_pod(ns, n) for n in plan.stops))
    # merge patches of children (a sweep's prune annotation); a child gone (404) is skipped
    await asyncio.gather(*(kube.patch(k, ns, n, body) for k, n, body in plan.patches))
    # ConfigMap/Service before pods, so pods never start without their config (nor with another's).
    first = [c for c in plan.creates if c["kind"] != "Pod"]
    pods = [c for c in plan.creates if c["kind"] == "Pod"]

    async def create(child: Manifest) -> bool:
        ok = await guarded(kube.create(child, uid))
        if ok:
            result.created.append((child["kind"], child["metadata"]["name"]))
        return ok

    ok = await asyncio.gather(*(create(c) for c in first))
    if all(ok):
        await asyncio.gather(*(create(c) for c in pods))
    else:
        result.skipped_pods = len(pods)
    await asyncio.gather(*(guarded(kube.apply(c, uid)) for c in plan.applies))
    if result.namespace_terminating:
        return result  # the namespace controller is removing everything: no status, no events

    if not plan.status_first:
        try:
            await write_status()
        except Stale:
            result.stale = True  # children are idempotent; the next pass re-plans from the new version
            return result
    if post_event is not None:
        for ev in plan.events:
            await post_event(ev)
    if plan.delete_self:
        await kube.delete(kind, ns, name, uid=uid)
    return result
