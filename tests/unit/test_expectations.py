"""Create expectations (tauon.handlers.expectations): the store itself, the planner's use of the pending
set, and the runtime recording expectations around a plan's creates (against the in-process fake API
server of test_kube_apply)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from tauon.handlers.expectations import Expectations
from tauon.handlers.runtime import Runtime
from tauon.kube.client import Kube
from tauon.reconcile.finetunejob import reconcile
from tauon.reconcile.plan import Plan
from tests.unit.test_kube_apply import NS, FakeApiServer, api, child  # noqa: F401 - api is a fixture
from tests.unit.test_reconcile_finetunejob import Sim, created_pods, pod_name

OWNER = ("finetunejob", "ns", "ft")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- the store ---------------------------------------------------------------------------------------------


def test_expected_children_are_pending_until_observed() -> None:
    ex = Expectations()
    ex.expect(OWNER, "u1", [("Pod", "a"), ("Pod", "b"), ("ConfigMap", "cm")])
    assert ex.pending(OWNER, "u1") == {("Pod", "a"), ("Pod", "b"), ("ConfigMap", "cm")}
    ex.observe(OWNER, ("Pod", "a"))  # its watch event arrived
    assert ex.pending(OWNER, "u1") == {("Pod", "b"), ("ConfigMap", "cm")}
    # what the index already holds counts as observed too (an event processed before the expectation)
    assert ex.pending(OWNER, "u1", seen=[("ConfigMap", "cm")]) == {("Pod", "b")}
    ex.observe(OWNER, ("Pod", "b"))
    assert ex.pending(OWNER, "u1") == frozenset()
    assert ex.count() == 0, "an owner with nothing pending keeps no entry"


def test_expectations_expire() -> None:
    clock = Clock()
    ex = Expectations(ttl=300, clock=clock)
    ex.expect(OWNER, "u1", [("Pod", "a")])
    clock.t += 299
    ex.expect(OWNER, "u1", [("Pod", "b")])
    assert ex.pending(OWNER, "u1") == {("Pod", "a"), ("Pod", "b")}
    clock.t += 1  # a's watch event never came: it is created again if still missing
    assert ex.pending(OWNER, "u1") == {("Pod", "b")}
    clock.t += 300
    assert ex.pending(OWNER, "u1") == frozenset()
    assert ex.count() == 0


def test_a_new_owner_of_the_same_name_inherits_nothing() -> None:
    ex = Expectations()
    ex.expect(OWNER, "old-uid", [("Pod", "a")])
    assert ex.pending(OWNER, "new-uid") == frozenset()
    assert ex.pending(OWNER, "old-uid") == frozenset(), "dropped, not kept aside"


def test_failed_creates_are_lowered_and_forget_drops_the_owner() -> None:
    ex = Expectations()
    other = ("finetunejob", "ns", "other")
    ex.expect(OWNER, "u1", [("Pod", "a"), ("Pod", "b")])
    ex.expect(other, "u2", [("Pod", "x")])
    ex.lower(OWNER, [("Pod", "b")])
    assert ex.pending(OWNER, "u1") == {("Pod", "a")}
    ex.forget(OWNER)
    assert ex.pending(OWNER, "u1") == frozenset()
    assert ex.pending(other, "u2") == {("Pod", "x")}, "other owners keep theirs"
    ex.observe(OWNER, ("Pod", "never-expected"))  # events of children nobody expects are fine
    ex.expect(OWNER, "u1", [])
    assert ex.count() == 1


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        Expectations(ttl=0)


# -- the planner's view ------------------------------------------------------------------------------------


def test_children_on_their_way_are_not_created_again() -> None:
    sim = Sim({"numNodes": 3})
    first = sim.reconcile()
    assert created_pods(first) == [pod_name(0, r) for r in range(3)]
    sim.apply(first)
    sim.remove(1)  # the index has not seen pod 1 yet
    sim.config_map = None  # nor the ConfigMap
    on_the_way = frozenset({("Pod", pod_name(0, 1)), ("ConfigMap", first.creates[0]["metadata"]["name"])})
    assert first.creates[0]["kind"] == "ConfigMap"
    obs = dataclasses.replace(sim.observed(), creating=on_the_way)
    plan = reconcile(sim.job, obs, sim.now, sim.cfg)
    assert plan.creates == [], "expected children are not created again"
    assert plan.status is not None and plan.status["pods"]["active"] == 2, "counts come from what is seen"
    assert sim.st.created_attempt is None
    # without the expectation (operator restarted, or it expired) the missing pod is created again
    plan = reconcile(sim.job, sim.observed(), sim.now, sim.cfg)
    assert sorted((c["kind"], c["metadata"]["name"]) for c in plan.creates) == sorted(on_the_way)


def test_a_missing_pod_of_a_created_gang_is_still_a_failure_while_expected() -> None:
    """Expectations only stop creates: once the gang was seen whole, a pod that disappears restarts it
    even if a stale expectation names it."""
    sim = Sim({"numNodes": 2})
    sim.run_gang()
    sim.remove(1)
    obs = dataclasses.replace(sim.observed(), creating=frozenset({("Pod", pod_name(0, 1))}))
    plan = reconcile(sim.job, obs, sim.now, sim.cfg)
    assert plan.status is not None and plan.status["attempt"] == 1
    assert plan.status_first


# -- the runtime records and lowers them ---------------------------------------------------------------


JOB: dict[str, Any] = {"metadata": {"name": "ft", "namespace": NS, "uid": "job-uid", "resourceVersion": "7"}}


async def test_runtime_expects_what_it_created_and_lowers_what_failed(
    api: tuple[FakeApiServer, Kube],  # noqa: F811 - the fixture
) -> None:
    fake, kube = api
    fake.rules[("POST", f"/api/v1/namespaces/{NS}/pods")] = (403, {"message": "exceeded quota: q"})
    rt = Runtime(kube=kube)
    passes: list[tuple[str, str]] = []

    async def replan(ns: str, name: str) -> None:
        passes.append((ns, name))

    rt.queue.register("finetunejob", replan)  # the 403 asks for another pass
    plan = Plan(creates=[child("ConfigMap", "ft-config"), child("Pod", "ft-r0-node-0")])
    plan.creates.append({**child("PodGroup", "ft"), "apiVersion": "scheduling.volcano.sh/v1beta1"})
    owner = ("finetunejob", NS, "ft")
    result = await rt.apply(*owner[:1], "FineTuneJob", JOB, plan, frozenset({"Pod", "ConfigMap"}))
    # non-pod children are created concurrently: completion order is not part of the contract
    assert sorted(result.created) == [("ConfigMap", "ft-config"), ("PodGroup", "ft")]
    assert rt.expectations.pending(owner, "job-uid") == {("ConfigMap", "ft-config")}, (
        "the forbidden pod is not expected; unwatched kinds never are"
    )
    await rt.queue.drain()
    assert passes == [(NS, "ft")]
    rt.forget(owner)
    assert rt.expectations.count() == 0


async def test_runtime_lowers_expectations_when_the_apply_fails(
    api: tuple[FakeApiServer, Kube],  # noqa: F811 - the fixture
) -> None:
    fake, kube = api
    fake.hang = True  # every request black-holed: the client times out
    rt = Runtime(kube=kube)
    plan = Plan(creates=[child("Pod", "ft-r0-node-0")], status={"phase": "Pending"}, status_first=True)
    with pytest.raises(asyncio.TimeoutError):
        await rt.apply("finetunejob", "FineTuneJob", JOB, plan, frozenset({"Pod"}))
    assert rt.expectations.count() == 0


async def test_passes_missing_the_claim_cache_together_share_one_read(
    api: tuple[FakeApiServer, Kube],  # noqa: F811 - the fixture
) -> None:
    fake, kube = api
    path = f"/api/v1/namespaces/{NS}/persistentvolumeclaims/data"
    fake.rules[("GET", path)] = (200, {"spec": {"accessModes": ["ReadWriteMany"]}})
    answers = await asyncio.gather(*(kube.pvc_access_modes(NS, "data") for _ in range(20)))
    assert answers == [["ReadWriteMany"]] * 20
    assert fake.calls("GET") == [f"GET {path}"]
    answers[0].append("mutated")
    assert await kube.pvc_access_modes(NS, "data") == ["ReadWriteMany"], "callers get copies"


# -- bounded concurrency of passes (a burst must not hold thousands of rendered gangs) ----------------------


async def test_at_most_max_concurrent_passes_run_and_the_rest_wait() -> None:
    from tauon.handlers.workqueue import WorkQueue

    gate, running, done = asyncio.Event(), [0], []
    peak = [0]

    async def reconcile_one(ns: str, name: str) -> None:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await gate.wait()
        running[0] -= 1
        done.append(name)

    q = WorkQueue(max_concurrent=2)
    q.register("ftj", reconcile_one)
    for i in range(5):
        q.trigger("ftj", "ns", f"j{i}")
    for _ in range(5):
        await asyncio.sleep(0)
    assert running[0] == 2 and q.busy() == 5, "three wait for a slot, still known to the queue"
    q.trigger("ftj", "ns", "j4")  # a waiting object's trigger coalesces, it does not queue twice
    gate.set()
    await q.drain()
    assert sorted(done) == [f"j{i}" for i in range(5)] and peak[0] == 2
    with pytest.raises(ValueError, match="max_concurrent"):
        WorkQueue(max_concurrent=0)
