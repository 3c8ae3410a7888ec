"""Operator runtime shared by the handlers: config, API client, the indexes captured from Kopf, the work
queue, and what the operator remembers between passes (conflicts, refusals, progress, its own status
writes). There is one operator-level periodic task and no per-object timers: those would add finalizers,
and deletion must never hang when the operator is gone."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tauon import metrics
from tauon.api.names import API_VERSION
from tauon.handlers.expectations import Expectations
from tauon.handlers.indexes import Indexes
from tauon.handlers.leader import Elector
from tauon.handlers.workqueue import WorkQueue
from tauon.kube.apply import ApplyResult, apply_plan
from tauon.kube.client import Kube, NamespaceTerminating, owned_by
from tauon.reconcile.plan import Event, Plan
from tauon.render.config import OperatorConfig

log = logging.getLogger("tauon.operator")
Key = tuple[str, str, str]  # (controller, namespace, name)


def _observe(controller: str, ok: bool, seconds: float) -> None:
    metrics.RECONCILE_TOTAL.labels(controller, "success" if ok else "error").inc()
    if not ok:
        metrics.RECONCILE_ERRORS.labels(controller).inc()
    metrics.RECONCILE_TIME.labels(controller).observe(seconds)


@dataclass
class Runtime:
    cfg: OperatorConfig = field(default_factory=OperatorConfig)
    kube: Kube | None = None
    period_seconds: float = 5.0
    progress_period_seconds: float = 10.0
    # a pod event waits this long before its job's pass: a gang's pods change together (created,
    # scheduled, started), and their events then make one pass and one status write, not one each
    child_coalesce_seconds: float = 0.3
    # dev only (the process-backed node): read /progress at the address a pod annotation names
    trust_metrics_address: bool = False
    indexes: Indexes = field(default_factory=Indexes)
    queue: WorkQueue = field(default_factory=lambda: WorkQueue(_observe))
    conflicts: dict[Key, list[str]] = field(default_factory=dict)
    refused: dict[Key, list[str]] = field(default_factory=dict)
    refused_generation: dict[Key, int] = field(default_factory=dict)  # the generation they refused
    forbidden: dict[Key, list[str]] = field(default_factory=dict)  # creates refused with 403
    quota_exceeded: set[Key] = field(default_factory=set)
    progress: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # creates sent whose watch events have not arrived yet (tauon.handlers.expectations)
    expectations: Expectations = field(default_factory=Expectations)
    # objects as our own status writes returned them: fresher than the watch until it catches up
    written: dict[Key, dict[str, Any]] = field(default_factory=dict)
    periodic: asyncio.Task[None] | None = None
    # namespace -> monotonic time the API server said it is being deleted (checked again after a while)
    terminating: dict[str, float] = field(default_factory=dict)
    terminating_recheck_seconds: float = 60.0
    # uids of objects found gone while an index still held them (ghosts after a watch re-list)
    gone: set[str] = field(default_factory=set)
    # leader election (None: this operator runs alone and always leads)
    elector: Elector | None = None
    elector_task: asyncio.Task[None] | None = None

    def leading(self) -> bool:
        """Whether this operator may write now (holds the Lease, or runs without election)."""
        return self.elector is None or self.elector.leading()

    def trigger(self, controller: str, namespace: str, name: str, delay: float = 0.0) -> None:
        self.queue.trigger(controller, namespace, name, delay)

    async def apply(
        self,
        controller: str,
        kind: str,
        body: dict[str, Any],
        plan: Plan,
        expect: frozenset[str] = frozenset(),
    ) -> ApplyResult:
        """Apply a non-empty plan for one object; remember what the API server said for the next pass.
        Creates of the kinds in `expect` (watched children) are expected until their watch events come."""
        assert self.kube is not None
        meta = body["metadata"]
        key = (controller, meta["namespace"], meta["name"])
        expected = [(c["kind"], c["metadata"]["name"]) for c in plan.creates if c["kind"] in expect]
        self.expectations.expect(key, meta["uid"], expected)
        try:
            result = await self._apply(key, kind, body, plan)
        except BaseException:
            self.expectations.lower(key, expected)  # unknown outcome: the next pass looks again
            raise
        created = set(result.created)
        self.expectations.lower(key, [c for c in expected if c not in created])
        return result

    async def _apply(self, key: Key, kind: str, body: dict[str, Any], plan: Plan) -> ApplyResult:
        assert self.kube is not None
        meta = body["metadata"]
        controller = key[0]
        for verb, n in (
            ("create", len(plan.creates)),
            ("apply", len(plan.applies)),
            ("delete", len(plan.deletes) + int(plan.delete_self)),
            ("patch", len(plan.stops) + len(plan.patches) + int(plan.status is not None)),
        ):
            if n:
                metrics.API_WRITES.labels(controller, verb).inc(n)

        involved = {"apiVersion": API_VERSION, "kind": kind, **body}
        terminating = False

        async def post(ev: Event) -> None:
            # Our own client, not kopf.event: that needs Kopf's per-handler context, which reconciles run
            # from the work queue or the periodic pass do not have. An Event is best effort: a failure is
            # logged and never fails the reconcile that already did its work.
            nonlocal terminating
            if terminating:
                return
            assert self.kube is not None
            try:
                await self.kube.post_event(involved, ev.type, ev.reason, ev.message)
            except NamespaceTerminating:
                terminating = True
            except Exception as e:
                log.warning("%s %s/%s: event %s not posted: %s", kind, *key[1:], ev.reason, e)

        result = await apply_plan(self.kube, kind, body, plan, post)
        if terminating:
            result.namespace_terminating = True
        if result.namespace_terminating:
            self.terminating[meta["namespace"]] = time.monotonic()
            log.info("namespace %s is being deleted: not reconciling there", meta["namespace"])
        if result.gone:
            self.gone.add(meta["uid"])
            log.info("%s %s/%s no longer exists: ignoring what the index still holds", kind, *key[1:])
        if result.stale:  # planned from an old version: the watch delivers the new one and triggers
            log.debug("%s %s/%s changed while planning; re-planning from the new version", kind, *key[1:])
        if result.written is not None:
            self.written[key] = result.written
        again = False
        if result.conflicts and result.conflicts != self.conflicts.get(key):
            self.conflicts[key] = result.conflicts
            again = True
        if result.invalid and result.invalid != self.refused.get(key):
            self.refused[key] = result.invalid
            self.refused_generation[key] = int(meta.get("generation") or 0)
            again = True
        again = self._remember_forbidden(key, plan, result) or again
        if again:
            self.trigger(*key)
        return result

    def _remember_forbidden(self, key: Key, plan: Plan, result: ApplyResult) -> bool:
        """403s on create are kept until a pass creates without one; True when they are new."""
        if not result.forbidden:
            if plan.creates and result.skipped_pods == 0:
                self.forbidden.pop(key, None)
                self.quota_exceeded.discard(key)
            return False
        messages = [str(e) for e in result.forbidden]
        if any(e.quota for e in result.forbidden):
            self.quota_exceeded.add(key)
        if messages == self.forbidden.get(key):
            return False
        self.forbidden[key] = messages
        return True

    def refusals(self, key: Key, generation: int) -> list[str]:
        """What the API server refused (422) for this generation of the object (a new spec retries)."""
        if self.refused_generation.get(key, generation) != generation:
            self.refused.pop(key, None)
            self.refused_generation.pop(key, None)
        return self.refused.get(key, [])

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

    def own_write(self, key: Key, body: Any) -> bool:
        """Whether a watched body is the version our last status write of that object produced."""
        mine = self.written.get(key)
        if mine is None or body is None:
            return False
        rv = (body.get("metadata") or {}).get("resourceVersion")
        return bool(rv) and rv == mine["metadata"].get("resourceVersion")

    def freshest(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        mine = self.written.get(key)
        if mine is None or mine["metadata"].get("uid") != body["metadata"].get("uid"):
            self.written.pop(key, None)
            return body
        if _rv(mine) > _rv(body):
            return mine
        self.written.pop(key, None)
        return body

    def namespace_terminating(self, namespace: str) -> bool:
        """Whether a create there was refused lately because the namespace is being deleted."""
        since = self.terminating.get(namespace)
        if since is None:
            return False
        if time.monotonic() - since >= self.terminating_recheck_seconds:
            del self.terminating[namespace]  # try again: it may be gone and re-created
            return False
        return True

    def forget(self, key: Key) -> None:
        """The object is gone: drop what was remembered about it."""
        self.conflicts.pop(key, None)
        self.refused.pop(key, None)
        self.refused_generation.pop(key, None)
        self.forbidden.pop(key, None)
        self.quota_exceeded.discard(key)
        self.written.pop(key, None)
        self.progress.pop((key[1], key[2]), None)
        self.expectations.forget(key)

    async def stop(self) -> None:
        if self.periodic is not None:
            self.periodic.cancel()
        if self.elector_task is not None:
            self.elector_task.cancel()
            await asyncio.gather(self.elector_task, return_exceptions=True)
        await self.queue.stop()
        if self.periodic is not None:
            await asyncio.gather(self.periodic, return_exceptions=True)
        if self.elector is not None:
            try:
                await self.elector.release()
            except Exception as e:  # shutting down: the lease then expires on its own
                log.warning("leader election: lease not released: %s", e)
        if self.kube is not None:
            await self.kube.close()


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:  # resourceVersion is opaque; etcd's are integers, fall back to the watch
        return 0


RT = Runtime()
