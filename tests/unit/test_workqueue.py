"""The per-object work queue: serialisation, coalescing, concurrency across objects, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from tauon.handlers.workqueue import WorkQueue


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.active: dict[tuple[str, str], int] = {}
        self.max_active: dict[tuple[str, str], int] = {}
        self.gate = asyncio.Event()
        self.fail_next = 0

    async def __call__(self, ns: str, name: str) -> None:
        key = (ns, name)
        self.calls.append(key)
        self.active[key] = self.active.get(key, 0) + 1
        self.max_active[key] = max(self.max_active.get(key, 0), self.active[key])
        try:
            await self.gate.wait()
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("boom")
        finally:
            self.active[key] -= 1


async def test_burst_of_triggers_coalesces_into_one_extra_pass() -> None:
    rec, results = Recorder(), []
    q = WorkQueue(lambda c, ok, s: results.append((c, ok)))
    q.register("ftj", rec)
    for _ in range(5):  # before the pass starts: that pass covers them
        q.trigger("ftj", "ns", "a")
    await asyncio.sleep(0)
    assert rec.calls == [("ns", "a")]
    for _ in range(50):  # while it runs: one more pass
        q.trigger("ftj", "ns", "a")
    assert q.busy() == 1
    rec.gate.set()
    await q.drain()
    assert rec.calls == [("ns", "a"), ("ns", "a")], "one pass, plus one for the triggers during it"
    assert rec.max_active[("ns", "a")] == 1, "never two reconciles of one object at once"
    assert results == [("ftj", True), ("ftj", True)]
    assert q.busy() == 0


async def test_single_trigger_runs_once() -> None:
    rec = Recorder()
    rec.gate.set()
    q = WorkQueue()
    q.register("ftj", rec)
    q.trigger("ftj", "ns", "a")
    await q.drain()
    assert rec.calls == [("ns", "a")]


async def test_objects_reconcile_concurrently() -> None:
    rec = Recorder()
    q = WorkQueue()
    q.register("ftj", rec)
    q.register("isvc", rec)
    q.trigger("ftj", "ns", "a")
    q.trigger("ftj", "ns", "b")
    q.trigger("isvc", "ns", "a")  # same name, other controller: its own key
    await asyncio.sleep(0)
    assert q.busy() == 3 and len(rec.calls) == 3
    rec.gate.set()
    await q.drain()


async def test_failure_is_reported_and_does_not_stop_the_queue() -> None:
    rec, results = Recorder(), []
    rec.fail_next = 1
    rec.gate.set()
    q = WorkQueue(lambda c, ok, s: results.append(ok))
    q.register("ftj", rec)
    q.trigger("ftj", "ns", "a")
    await q.drain()
    q.trigger("ftj", "ns", "a")
    await q.drain()
    assert results == [False, True]


async def test_unknown_controller_is_an_error() -> None:
    q = WorkQueue()
    with pytest.raises(KeyError):
        q.trigger("nope", "ns", "a")


async def test_stop_cancels_running_reconciles() -> None:
    rec = Recorder()
    q = WorkQueue()
    q.register("ftj", rec)
    q.trigger("ftj", "ns", "a")
    await asyncio.sleep(0)
    await q.stop()
    assert q.busy() == 0


async def test_a_stuck_reconcile_is_cancelled_at_its_deadline() -> None:
    rec, results = Recorder(), []  # the gate is never opened: the reconcile hangs
    q = WorkQueue(lambda c, ok, s: results.append(ok), deadline=0.2)
    q.register("ftj", rec)
    q.trigger("ftj", "ns", "a")
    await asyncio.wait_for(q.drain(), timeout=30)
    assert results == [False] and q.busy() == 0 and q.stuck_for() == 0.0


async def test_stuck_for_reports_a_pass_beyond_its_deadline() -> None:
    q = WorkQueue(deadline=0.1)
    seen: list[float] = []

    async def blocking(ns: str, name: str) -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocks the loop: the deadline cannot cancel it, liveness must notice
        seen.append(q.stuck_for())

    q.register("ftj", blocking)
    q.trigger("ftj", "ns", "a")
    await q.drain()
    assert seen and seen[0] > 0.1
    assert q.stuck_for() == 0.0


async def test_delayed_trigger_gathers_a_burst_into_one_pass() -> None:
    rec = Recorder()
    rec.gate.set()
    q = WorkQueue()
    q.register("ftj", rec)
    q.trigger("ftj", "ns", "a", delay=0.2)  # a pod event: wait for its siblings
    await asyncio.sleep(0.05)
    assert rec.calls == [] and q.busy() == 1, "nothing runs during the delay"
    for _ in range(3):  # the rest of the gang's events, within the delay
        q.trigger("ftj", "ns", "a", delay=0.2)
    q.trigger("ftj", "ns", "a")  # an undelayed trigger meanwhile joins the same pass
    await q.drain()
    assert rec.calls == [("ns", "a")], "the burst made one pass"
    q.trigger("ftj", "ns", "b")  # without a delay a pass starts at once
    await asyncio.sleep(0)
    assert rec.calls[-1] == ("ns", "b")
    await q.drain()
