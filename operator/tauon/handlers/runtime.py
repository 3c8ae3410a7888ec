"""Operator runtime shared by the handlers: config, API client, per-object serialisation with coalescing,
the indexes captured from Kopf, and the one operator-level periodic task (no per-object timers: they
would add finalizers, and deletion must never hang when the operator is gone)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from tauon import metrics
from tauon.kube.apply import apply_plan
from tauon.kube.client import Kube, owned_by
from tauon.reconcile.plan import Event, Plan
from tauon.render.config import OperatorConfig

log = logging.getLogger("tauon.operator")
Key = tuple[str, str, str]  # (controller, namespace, name)


@dataclass
class Runtime:
    cfg: OperatorConfig = field(default_factory=OperatorConfig)
    kube: Kube | None = None
    period_seconds: float = 5.0
    progress_period_seconds: float = 10.0
    indexes: dict[str, Any] = field(default_factory=dict)  # Kopf indexes by name (live views)
    conflicts: dict[Key, list[str]] = field(default_factory=dict)
    refused: dict[Key, list[str]] = field(default_factory=dict)
    progress: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # objects as our own status writes returned them: fresher than the watch until it catches up
    written: dict[Key, dict[str, Any]] = field(default_factory=dict)
    reconcilers: dict[str, Callable[[str, str], Awaitable[None]]] = field(default_factory=dict)
    _running: set[Key] = field(default_factory=set)
    _dirty: set[Key] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    periodic: asyncio.Task[None] | None = None

    def remember(self, **indexes: Any) -> None:
        for name, idx in indexes.items():
            if name.endswith("_idx"):
                self.indexes[name] = idx

    def trigger(self, controller: str, namespace: str, name: str) -> None:
        """Reconcile soon; bursts of triggers for one object collapse into at most one extra pass."""
        key = (controller, namespace, name)
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Key) -> None:
        controller, ns, name = key
        try:
            while True:
                self._dirty.discard(key)
                t0 = time.perf_counter()
                try:
                    await self.reconcilers[controller](ns, name)
                    metrics.RECONCILE_TOTAL.labels(controller, "success").inc()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    metrics.RECONCILE_TOTAL.labels(controller, "error").inc()
                    metrics.RECONCILE_ERRORS.labels(controller).inc()
                    log.exception("reconcile %s %s/%s failed; will retry", controller, ns, name)
                finally:
                    metrics.RECONCILE_TIME.labels(controller).observe(time.perf_counter() - t0)
                if key not in self._dirty:
                    break
        finally:
            self._running.discard(key)

    async def apply(self, controller: str, kind: str, body: dict[str, Any], plan: Plan) -> None:
        """Apply a non-empty plan for one object; remember what the API server said for the next pass."""
        assert self.kube is not None
        meta = body["metadata"]
        key = (controller, meta["namespace"], meta["name"])
        for verb, n in (
            ("create", len(plan.creates)),
            ("apply", len(plan.applies)),
            ("delete", len(plan.deletes) + int(plan.delete_self)),
            ("patch", len(plan.stops) + int(plan.status is not None)),
        ):
            if n:
                metrics.API_WRITES.labels(controller, verb).inc(n)

        async def post(ev: Event) -> None:
            kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)

        result = await apply_plan(self.kube, kind, body, plan, post)
        if result.written is not None:
            self.written[key] = result.written
        again = False
        if result.conflicts and result.conflicts != self.conflicts.get(key):
            self.conflicts[key] = result.conflicts
            again = True
        if result.invalid and result.invalid != self.refused.get(key):
            self.refused[key] = result.invalid
            again = True
        if again:
            self.trigger(*key)

    async def current_conflicts(self, key: Key, uid: str) -> list[str]:
        """Remembered conflicts that still hold (re-read only while there are any): once the user removes
        or hands over the foreign object, the next pass creates ours."""
        known = self.conflicts.get(key)
        if not known:
            return []
        assert self.kube is not None
        still = []
        for ref in known:
            kind, _, name = ref.partition("/")
            obj = await self.kube.get(kind, key[1], name) if name else None
            if obj is not None and not owned_by(obj, uid):
                still.append(ref)
        if still:
            self.conflicts[key] = still
        else:
            self.conflicts.pop(key, None)
        return still

    def bodies(self, index_name: str, key: tuple[str, str]) -> list[dict[str, Any]]:
        """Copies of what a Kopf index holds for (namespace, name)."""
        idx = self.indexes.get(index_name)
        if idx is None or key not in idx:
            return []
        return [dict(v) for v in idx[key]]

    def keys(self, index_name: str) -> list[tuple[str, str]]:
        idx = self.indexes.get(index_name)
        return list(idx) if idx is not None else []

    def phase_counts(self, index_name: str) -> dict[tuple[str, str], int]:
        """(namespace, phase) -> number of objects, for the phase gauges."""
        counts: dict[tuple[str, str], int] = {}
        for key in self.keys(index_name):
            for body in self.bodies(index_name, key):
                phase = (body.get("status") or {}).get("phase") or "Pending"
                counts[(key[0], phase)] = counts.get((key[0], phase), 0) + 1
        return counts

    def freshest(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        mine = self.written.get(key)
        if mine is None or mine["metadata"].get("uid") != body["metadata"].get("uid"):
            self.written.pop(key, None)
            return body
        if _rv(mine) > _rv(body):
            return mine
        self.written.pop(key, None)
        return body

    async def stop(self) -> None:
        if self.periodic is not None:
            self.periodic.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(
            *self._tasks, *([self.periodic] if self.periodic else []), return_exceptions=True
        )
        if self.kube is not None:
            await self.kube.close()


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:  # resourceVersion is opaque; etcd's are integers, fall back to the watch
        return 0


RT = Runtime()
