"""Leader election: the pure decision, and two electors sharing one in-memory Lease store with a
simulated clock (optimistic concurrency by resourceVersion, as the API server does it). The real
API server with two operator processes: tests/cluster/test_chaos.py::test_two_operators_one_leader."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from tauon.handlers.leader import (
    LEASE_SECONDS,
    RENEW_DEADLINE_SECONDS,
    Elector,
    Seen,
    decide,
    desired,
)
from tauon.kube.client import Stale

Manifest = dict[str, Any]


def lease(holder: str | None, renew: str = "t1", rv: str = "1") -> Manifest:
    return {
        "metadata": {"name": "l", "namespace": "ns", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "renewTime": renew, "leaseDurationSeconds": LEASE_SECONDS},
    }


def test_decide() -> None:
    assert decide(None, "a", None, 0) == "create"
    assert decide(lease("a"), "a", None, 0) == "renew"
    assert decide(lease(None), "a", None, 0) == "acquire"
    # another holder: first sighting starts the clock; unchanged for the lease duration -> take over
    assert decide(lease("b"), "a", None, 100) == "wait"
    seen = Seen("b", "t1", LEASE_SECONDS, 100)
    assert decide(lease("b"), "a", seen, 100 + LEASE_SECONDS - 0.1) == "wait"
    assert decide(lease("b"), "a", seen, 100 + LEASE_SECONDS) == "acquire"
    # renewed meanwhile: the clock restarts
    assert decide(lease("b", renew="t2"), "a", seen, 100 + LEASE_SECONDS) == "wait"


def test_desired_counts_transitions() -> None:
    from datetime import UTC, datetime

    now = datetime(2025, 1, 1, tzinfo=UTC)
    body = desired(lease("b", rv="7"), "a", "acquire", now, "ns", "l")
    assert body["metadata"]["resourceVersion"] == "7"
    assert body["spec"]["holderIdentity"] == "a" and body["spec"]["leaseTransitions"] == 1
    assert body["spec"]["renewTime"] == "2025-01-01T00:00:00.000000Z"
    renew = desired(body | {"metadata": {"resourceVersion": "8"}}, "a", "renew", now, "ns", "l")
    assert renew["spec"]["leaseTransitions"] == 1


class Store:
    """One Lease with resourceVersion preconditions; `down` simulates an unreachable API server."""

    def __init__(self) -> None:
        self.obj: Manifest | None = None
        self.rv = 0
        self.down: set[str] = set()

    def client(self, who: str) -> Any:
        store = self

        class Client:
            async def get(self, kind: str, ns: str, name: str) -> Manifest | None:
                if who in store.down:
                    raise TimeoutError("unreachable")
                return copy.deepcopy(store.obj)

            async def create_exclusive(self, body: Manifest) -> Manifest:
                if who in store.down:
                    raise TimeoutError("unreachable")
                if store.obj is not None:
                    raise Stale("Lease", "l")
                return store.put(body)

            async def replace(self, body: Manifest) -> Manifest:
                if who in store.down:
                    raise TimeoutError("unreachable")
                if store.obj is None or body["metadata"].get("resourceVersion") != str(self.rv_now()):
                    raise Stale("Lease", "l")
                return store.put(body)

            def rv_now(self) -> int:
                return store.rv

        return Client()

    def put(self, body: Manifest) -> Manifest:
        self.rv += 1
        self.obj = copy.deepcopy(body)
        self.obj["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.obj)


def test_two_electors_never_lead_together() -> None:
    store = Store()
    clock = [0.0]
    a = Elector(store.client("a"), "ns", "l", me="a", clock=lambda: clock[0])  # type: ignore[arg-type]
    b = Elector(store.client("b"), "ns", "l", me="b", clock=lambda: clock[0])  # type: ignore[arg-type]
    history: list[tuple[float, bool, bool]] = []

    async def tick(seconds: float, *who: Elector) -> None:
        end = clock[0] + seconds
        while clock[0] < end:
            for e in who:
                try:
                    await e.once()
                except TimeoutError:
                    pass
            clock[0] += 1.0
            history.append((clock[0], a.leading(), b.leading()))

    async def scenario() -> None:
        await tick(20, a, b)
        assert a.leading() and not b.leading()  # a created the lease first
        store.down.add("a")  # a is cut off from the API server: it stops leading at its deadline
        await tick(40, a, b)
        assert b.leading() and not a.leading()
        store.down.clear()
        await tick(20, a, b)
        assert b.leading() and not a.leading()  # a does not grab it back while b renews
        await b.release()
        await tick(3, a)
        assert a.leading()

    asyncio.run(scenario())
    assert not any(x and y for _, x, y in history), "two leaders at once"
    cut = next(t for t, x, _ in history if t > 20 and not x)
    assert cut - 20 <= RENEW_DEADLINE_SECONDS + 1


def test_a_slow_get_does_not_backdate_the_observation() -> None:
    """A follower's GET sent at t=1 is answered at t=10 with a record the leader renewed at t=9 (valid
    until 19). Stamped with the send time (t=1), the follower would take over at t=16 while the leader
    still leads; stamped when the answer arrives (t=10, as client-go does), it waits until t=25."""
    store = Store()
    clock = [0.0]
    a = Elector(store.client("a"), "ns", "l", me="a", clock=lambda: clock[0])  # type: ignore[arg-type]
    fast = store.client("b")

    class SlowClient:
        slow = True

        async def get(self, kind: str, ns: str, name: str) -> Manifest | None:
            if self.slow:
                self.slow = False
                clock[0] = 9.0
                await a.once()  # the leader renews while the follower's GET is in flight
                store.down.add("a")  # then it is cut off: it leads until 9 + RENEW_DEADLINE_SECONDS
                clock[0] = 10.0
            return await fast.get(kind, ns, name)  # type: ignore[no-any-return]

        def __getattr__(self, attr: str) -> Any:
            return getattr(fast, attr)

    b = Elector(SlowClient(), "ns", "l", me="b", clock=lambda: clock[0])  # type: ignore[arg-type]
    both: list[float] = []

    async def scenario() -> None:
        await a.once()  # t=0: a creates the lease
        clock[0] = 1.0
        await b.once()  # sent at 1, answered at 10
        while clock[0] < 40:
            clock[0] += 1.0
            for e in (a, b):
                try:
                    await e.once()
                except TimeoutError:
                    pass
            if a.leading() and b.leading():
                both.append(clock[0])

    asyncio.run(scenario())
    assert not both, f"two leaders at t={both}"
    assert b.leading()
