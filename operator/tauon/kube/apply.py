"""Apply a Plan: status first for new attempts (so a crash never double-counts a restart), otherwise
children first and status last (so a crash never records what was not done)."""

from __future__ import annotations

import asyncio
from typing import Any

from tauon.kube.client import Conflict, Invalid, Kube
from tauon.reconcile.plan import Plan

Manifest = dict[str, Any]


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
        self.conflicts: list[str] = []
        self.invalid: list[str] = []
        self.written: Manifest | None = None  # the object after our status write


async def apply_plan(
    kube: Kube, kind: str, obj: Manifest, plan: Plan, post_event: Any | None = None
) -> ApplyResult:
    meta = obj["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    result = ApplyResult()

    async def write_status() -> None:
        if plan.status is not None:
            patch = merge_patch(obj.get("status") or {}, plan.status)
            if patch:
                result.written = await kube.patch_status(kind, ns, name, patch)

    if plan.status_first:
        await write_status()

    async def guarded(coro: Any, label: str) -> None:
        try:
            await coro
        except Conflict as e:
            result.conflicts.append(f"{e.kind}/{e.name}")
        except Invalid as e:
            result.invalid.append(str(e))
        del label

    await asyncio.gather(*(kube.delete(k, ns, n) for k, n in plan.deletes))
    await asyncio.gather(*(kube.stop_pod(ns, n) for n in plan.stops))
    # ConfigMap/Service before pods, so pods never start without their config.
    first = [c for c in plan.creates if c["kind"] != "Pod"]
    pods = [c for c in plan.creates if c["kind"] == "Pod"]
    await asyncio.gather(*(guarded(kube.create(c, uid), c["metadata"]["name"]) for c in first))
    await asyncio.gather(*(guarded(kube.create(c, uid), c["metadata"]["name"]) for c in pods))
    await asyncio.gather(*(guarded(kube.apply(c, uid), c["metadata"]["name"]) for c in plan.applies))

    if not plan.status_first:
        await write_status()
    if post_event is not None:
        for ev in plan.events:
            await post_event(ev)
    if plan.delete_self:
        await kube.delete(kind, ns, name)
    return result
