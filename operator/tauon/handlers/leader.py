"""Leader election over a coordination.k8s.io/v1 Lease, so two operator replicas never both write.

Enabled by TAUON_LEADER_ELECTION_NAMESPACE (the Helm chart sets it to the release namespace); the Lease is
TAUON_LEADER_ELECTION_NAME (default `tauon-operator`) and the identity POD_NAME (else host-pid-random).
Without it the operator runs alone and always leads (a single replica, local runs).

Timing (the client-go defaults): the lease lasts LEASE_SECONDS (15 s); the leader renews every RENEW_SECONDS
(5 s) and counts itself leader only until RENEW_DEADLINE_SECONDS (10 s) after it SENT its last successful
renewal; a follower takes over only when the lease record has not changed for LEASE_SECONDS by its own
monotonic clock since it first saw it (the moment its GET was answered, never when it was sent: a slow GET
must not backdate a renewal it returns; no wall-clock comparison between machines). The 5 s gap is the
margin against both holding it. Writes are optimistic (resourceVersion): of two candidates, one wins.

The decision is pure (`decide`); `Elector` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from tauon.api.names import Manifest
from tauon.kube.client import Kube, Stale

log = logging.getLogger("tauon.leader")
LEASE_SECONDS = 15
RENEW_SECONDS = 5.0
RENEW_DEADLINE_SECONDS = 10.0
RETRY_SECONDS = 2.0
NAMESPACE_ENV = "TAUON_LEADER_ELECTION_NAMESPACE"
NAME_ENV = "TAUON_LEADER_ELECTION_NAME"
DEFAULT_NAME = "tauon-operator"
Action = Literal["create", "acquire", "renew", "wait"]


@dataclass(frozen=True)
class Seen:
    """A lease record as a follower saw it, and when (its monotonic clock)."""

    holder: str | None
    renew_time: str | None
    duration: int
    at: float


def holder_of(lease: Manifest | None) -> tuple[str | None, str | None, int]:
    spec = (lease or {}).get("spec") or {}
    return (
        spec.get("holderIdentity") or None,
        spec.get("renewTime"),
        int(spec.get("leaseDurationSeconds") or 0),
    )


def decide(lease: Manifest | None, me: str, seen: Seen | None, now: float) -> Action:
    """What to do with the lease now. `seen` is the record observed earlier (unchanged records age)."""
    if lease is None:
        return "create"
    holder, renew, duration = holder_of(lease)
    if holder == me:
        return "renew"
    if holder is None:
        return "acquire"  # released
    if seen is None or (seen.holder, seen.renew_time) != (holder, renew):
        return "wait"  # a new record: start its clock
    return "acquire" if now - seen.at >= max(duration, 1) else "wait"


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def desired(
    lease: Manifest | None, me: str, action: Action, now: datetime, namespace: str, name: str
) -> Manifest:
    """The Lease to write for `action` (create / acquire / renew), with the resourceVersion read."""
    spec = dict((lease or {}).get("spec") or {})
    spec.update(holderIdentity=me, leaseDurationSeconds=LEASE_SECONDS, renewTime=_micro(now))
    if action in ("create", "acquire"):
        spec["acquireTime"] = _micro(now)
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (action == "acquire")
    meta: Manifest = {"name": name, "namespace": namespace}
    if lease is not None:
        meta["resourceVersion"] = lease["metadata"]["resourceVersion"]
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


def identity() -> str:
    pod = os.environ.get("POD_NAME")
    return pod or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Elector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str = DEFAULT_NAME,
        me: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_elected: Callable[[], None] | None = None,
    ) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.me = me or identity()
        self.clock = clock
        self.on_elected = on_elected
        self._valid_until = 0.0
        self._seen: Seen | None = None

    def leading(self) -> bool:
        return self.clock() < self._valid_until

    async def once(self) -> None:
        sent = self.clock()
        lease = await self.kube.get("Lease", self.namespace, self.name)
        # A record is observed when the answer arrives, not when the GET was sent (as client-go stamps
        # it): the holder may have renewed while a slow GET was in flight, and a record stamped with the
        # send time would age by the GET's latency too early. Our own deadline counts from `sent`.
        received = self.clock()
        action = decide(lease, self.me, self._seen, received)
        if action == "wait":
            holder, renew, duration = holder_of(lease)
            if self._seen is None or (self._seen.holder, self._seen.renew_time) != (holder, renew):
                self._seen = Seen(holder, renew, duration, received)
            self._lose(f"held by {holder}")
            return
        was = self.leading()
        body = desired(lease, self.me, action, datetime.now(UTC), self.namespace, self.name)
        try:
            if action == "create":
                await self.kube.create_exclusive(body)
            else:
                await self.kube.replace(body)
        except Stale:  # another candidate wrote first
            self._lose("another candidate won")
            return
        self._valid_until = sent + RENEW_DEADLINE_SECONDS
        self._seen = None
        if not was:
            log.warning("leader election: %s leads (Lease %s/%s)", self.me, self.namespace, self.name)
            if self.on_elected is not None:
                self.on_elected()

    def _lose(self, why: str) -> None:
        if self._valid_until:
            log.warning("leader election: %s no longer leads (%s)", self.me, why)
        self._valid_until = 0.0

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # API server unreachable: keep leading only until the deadline
                log.warning("leader election: lease %s/%s not renewed: %s", self.namespace, self.name, e)
            await asyncio.sleep(RENEW_SECONDS if self.leading() else RETRY_SECONDS)

    async def release(self) -> None:
        """On shutdown: give the lease up so a follower takes over at once."""
        if not self.leading():
            return
        self._valid_until = 0.0
        lease = await self.kube.get("Lease", self.namespace, self.name)
        if lease is None or holder_of(lease)[0] != self.me:
            return
        spec = dict(lease.get("spec") or {})
        spec.update(holderIdentity=None, leaseDurationSeconds=1)
        body = {**lease, "spec": spec}
        try:
            await self.kube.replace(body)
        except Stale:
            pass


def from_env(kube: Kube, on_elected: Callable[[], None] | None = None) -> Elector | None:
    ns = os.environ.get(NAMESPACE_ENV, "")
    if not ns:
        return None
    return Elector(kube, ns, os.environ.get(NAME_ENV) or DEFAULT_NAME, on_elected=on_elected)
