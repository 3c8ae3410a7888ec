"""FineTuneJob planner against docs/api.md's failure semantics and conditions/phase table.

The cluster is simulated by feeding the plan back: created pods appear, deleted pods get a
deletionTimestamp (and vanish on gc()), stopped pods get activeDeadlineSeconds, and plan.status becomes
job.status. Tests then move pods through phases and reconcile again. Pure: no cluster, no network.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tauon.api.common import Condition
from tauon.api.finetunejob import FineTuneJob, FineTuneJobStatus
from tauon.reconcile.finetunejob import Observed, next_attempt_at, phase_of, reconcile
from tauon.reconcile.plan import Plan
from tauon.render.config import OperatorConfig
from tests.manifests import PVC_SPEC, deep_merge, finetunejob

Manifest = dict[str, Any]
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
CFG = OperatorConfig()
CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
EXCLUSIVE = ("Running", "Restarting", "Suspended")


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def job_body(spec: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    return finetunejob(
        "ft",
        namespace="team-a",
        metadata={"uid": "uid-1", "generation": generation, "creationTimestamp": iso(T0)},
        base=deep_merge({**PVC_SPEC, "resources": {"requests": {"cpu": "1"}}}, spec or {}),
    )


def expected_phase(conds: list[Condition]) -> str:
    trues = {c.type for c in conds if c.status == "True"}
    for t in ("Failed", "Succeeded", "Suspended", "Restarting", "Running"):
        if t in trues:
            return t
    return "Pending"


class Sim:
    """A tiny fake cluster around one FineTuneJob."""

    def __init__(
        self,
        spec: dict[str, Any] | None = None,
        cfg: OperatorConfig = CFG,
        pvcs: dict[str, list[str]] | None = None,
    ) -> None:
        self.body = job_body(spec)
        self.job = FineTuneJob.model_validate(self.body)
        self.cfg = cfg
        self.now = T0
        self.pods: dict[str, Manifest] = {}
        self.config_map: Manifest | None = None
        self.service: Manifest | None = None
        self.pod_groups: list[str] = []
        self.pvcs = pvcs or {}
        self.progress: dict[str, Any] | None = None
        self.conflicts: list[str] = []
        self.refused: list[str] = []
        self.forbidden: list[str] = []
        self.quota_exceeded = False
        self.refuse: set[str] = set()  # pod names the API server refuses to create (403)
        self.events: list[tuple[str, str, str]] = []
        self.node_seq = 0

    # ------------------------------------------------------------------------------------ plumbing
    @property
    def st(self) -> FineTuneJobStatus:
        return self.job.status

    def observed(self) -> Observed:
        return Observed(
            pods=[copy.deepcopy(p) for p in self.pods.values()],
            config_map=copy.deepcopy(self.config_map),
            service=copy.deepcopy(self.service),
            pvcs=dict(self.pvcs),
            progress=copy.deepcopy(self.progress),
            conflicts=list(self.conflicts),
            refused=list(self.refused),
            forbidden=list(self.forbidden),
            quota_exceeded=self.quota_exceeded,
        )

    def reconcile(self) -> Plan:
        return reconcile(self.job, self.observed(), self.now, self.cfg)

    def step(self, advance: float = 0, idempotent: bool = True) -> Plan:
        """Reconcile, check the contract's invariants, apply the plan; then (by default) check that a
        second reconcile with the same inputs emits no event (events once per transition)."""
        self.now += timedelta(seconds=advance)
        before = self.job.model_dump(mode="json")
        plan = self.reconcile()
        assert self.job.model_dump(mode="json") == before, "reconcile mutated its input"
        assert plan == self.reconcile(), "same inputs must give the same plan"
        self.apply(plan)
        self.check()
        if idempotent:
            again = self.reconcile()
            assert again.events == [], f"events repeated: {again.events}"
            assert not (set(again.deletes) & set(plan.deletes))
        return plan

    def settle(self, n: int = 3) -> Plan:
        plan = Plan()
        for _ in range(n):
            plan = self.step()
        return plan

    def apply(self, plan: Plan) -> None:
        if plan.status is not None:
            self.job.status = FineTuneJobStatus.model_validate(plan.status)
        for ev in plan.events:
            assert ev.type in ("Normal", "Warning")
            assert CAMEL.match(ev.reason), ev.reason
            self.events.append((ev.type, ev.reason, ev.message))
        for kind, name in plan.deletes:
            assert kind == "Pod"
            pod = self.pods.get(name)
            assert pod is not None, f"deleting unknown pod {name}"
            assert not pod["metadata"].get("deletionTimestamp"), f"deleting {name} twice"
            pod["metadata"]["deletionTimestamp"] = iso(self.now)
        for name in plan.stops:
            self.pods[name]["spec"]["activeDeadlineSeconds"] = 1
        for child in plan.creates:
            kind, name = child["kind"], child["metadata"]["name"]
            if kind == "Pod":
                if name in self.pods or name in self.refuse:
                    continue  # 409: already there; or refused
                pod = copy.deepcopy(child)
                pod["metadata"]["creationTimestamp"] = iso(self.now)
                pod["metadata"]["uid"] = f"pod-uid-{name}"
                pod["status"] = {"phase": "Pending"}
                self.pods[name] = pod
            elif kind == "ConfigMap":
                self.config_map = self.config_map or copy.deepcopy(child)
            elif kind == "Service":
                self.service = self.service or copy.deepcopy(child)
            elif kind == "PodGroup":
                if name not in self.pod_groups:
                    self.pod_groups.append(name)
            else:
                raise AssertionError(f"unexpected child kind {kind}")

    def check(self) -> None:
        """Invariants of docs/api.md's conditions table, after every applied plan."""
        st = self.st
        gen = self.job.metadata.generation
        assert st.observed_generation == gen
        trues = {c.type for c in st.conditions if c.status == "True"}
        assert len(trues & set(EXCLUSIVE)) <= 1, f"mutually exclusive conditions all True: {trues}"
        if trues & {"Succeeded", "Failed"}:
            assert len(trues & {"Succeeded", "Failed"}) == 1
            assert not trues & set(EXCLUSIVE), trues
            assert st.completion_time is not None
        types = [c.type for c in st.conditions]
        assert len(types) == len(set(types)), types
        assert set(types) <= {"Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed"}
        for c in st.conditions:
            assert c.observed_generation == gen, (
                f"{c.type} observedGeneration {c.observed_generation} != {gen}"
            )
            assert c.last_transition_time is not None
            assert CAMEL.match(c.reason), f"{c.type}: reason {c.reason!r}"
        assert st.phase == expected_phase(st.conditions) == phase_of(st)

    # ---------------------------------------------------------------------------------- the cluster
    def set_spec(self, **run_policy: Any) -> None:
        """A runPolicy edit: new generation."""
        body = self.job.model_dump(by_alias=True, mode="json", exclude_none=True)
        body["spec"]["runPolicy"].update(run_policy)
        body["metadata"]["generation"] += 1
        self.job = FineTuneJob.model_validate(body)

    def current(self) -> list[str]:
        return [pod_name(self.st.attempt, i) for i in range(self.job.spec.num_nodes)]

    def pod(self, rank: int, attempt: int | None = None) -> Manifest:
        return self.pods[pod_name(self.st.attempt if attempt is None else attempt, rank)]

    def schedule(self, *ranks: int, at: datetime | None = None) -> None:
        for r in ranks or range(self.job.spec.num_nodes):
            pod = self.pod(r)
            self.node_seq += 1
            pod["spec"]["nodeName"] = f"node-{self.node_seq}"
            pod["status"]["conditions"] = [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": iso(at or self.now)}
            ]

    def start(self, *ranks: int) -> None:
        for r in ranks or range(self.job.spec.num_nodes):
            pod = self.pod(r)
            if not pod["spec"].get("nodeName"):
                self.schedule(r)
            pod["status"]["phase"] = "Running"
            pod["status"]["conditions"] = [
                c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"
            ] + [{"type": "Ready", "status": "True", "lastTransitionTime": iso(self.now)}]
            pod["status"]["containerStatuses"] = [
                {"name": "trainer", "ready": True, "state": {"running": {"startedAt": iso(self.now)}}}
            ]

    def waiting(self, rank: int, reason: str, message: str = "") -> None:
        pod = self.pod(rank)
        pod["status"]["containerStatuses"] = [
            {"name": "trainer", "ready": False, "state": {"waiting": {"reason": reason, "message": message}}}
        ]

    def terminate(
        self,
        rank: int,
        phase: str,
        exit_code: int,
        message: str | dict[str, Any] | None = None,
        finished: datetime | None = None,
        reason: str = "Error",
        pod_reason: str | None = None,
        conditions: list[Manifest] | None = None,
    ) -> None:
        pod = self.pod(rank)
        term: Manifest = {"exitCode": exit_code, "reason": reason, "finishedAt": iso(finished or self.now)}
        if message is not None:
            term["message"] = message if isinstance(message, str) else json.dumps(message)
        pod["status"]["phase"] = phase
        pod["status"]["containerStatuses"] = [
            {"name": "trainer", "ready": False, "state": {"terminated": term}}
        ]
        pod["status"]["conditions"] = [
            c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"
        ] + list(conditions or [])
        if pod_reason:
            pod["status"]["reason"] = pod_reason

    def fail(self, rank: int, exit_code: int = 1, **kw: Any) -> None:
        self.terminate(rank, "Failed", exit_code, **kw)

    def succeed(self, rank: int, message: str | dict[str, Any] | None = None) -> None:
        self.terminate(rank, "Succeeded", 0, message=message, reason="Completed")

    def delete(self, rank: int) -> None:
        self.pod(rank)["metadata"]["deletionTimestamp"] = iso(self.now)

    def remove(self, rank: int) -> None:
        del self.pods[pod_name(self.st.attempt, rank)]

    def gc(self) -> None:
        """Terminating pods finish terminating."""
        self.pods = {n: p for n, p in self.pods.items() if not p["metadata"].get("deletionTimestamp")}

    def wait_backoff(self) -> None:
        """Let the restart backoff run out (the next gang is created after it)."""
        at = next_attempt_at(self.st)
        if at is not None and at > self.now:
            self.now = at

    def run_gang(self) -> None:
        """Create the current attempt's gang, schedule and start it; the job is Running after this."""
        self.step()
        assert set(self.current()) <= set(self.pods), "gang not created"
        self.start()
        self.step()
        assert self.st.phase == "Running", self.st.phase

    # ---------------------------------------------------------------------------------- inspection
    def cond(self, ctype: str) -> Condition | None:
        return next((c for c in self.st.conditions if c.type == ctype), None)

    def is_true(self, ctype: str) -> bool:
        c = self.cond(ctype)
        return c is not None and c.status == "True"


def pod_name(attempt: int, rank: int) -> str:
    return f"ft-r{attempt}-node-{rank}"


def created_pods(plan: Plan) -> list[str]:
    return [c["metadata"]["name"] for c in plan.creates if c["kind"] == "Pod"]


def deleted_pods(plan: Plan) -> list[str]:
    return sorted(n for k, n in plan.deletes if k == "Pod")


def reasons(plan: Plan) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in plan.events]


# ------------------------------------------------------------------------------------------ creation


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_first_reconcile_creates_the_gang(nodes: int) -> None:
    sim = Sim({"numNodes": nodes})
    plan = sim.step()
    assert [c["kind"] for c in plan.creates] == ["ConfigMap", "Service"] + ["Pod"] * nodes
    assert created_pods(plan) == [pod_name(0, i) for i in range(nodes)]
    assert not plan.deletes and not plan.stops and not plan.delete_self
    assert plan.status_first is False
    assert plan.events == []
    st = sim.st
    assert st.phase == "Pending"
    assert st.attempt == 0 and st.restarts == 0
    assert st.resolved.image == CFG.default_image
    assert st.resolved.nproc_per_node == 1 and st.resolved.backend == "gloo"
    assert st.start_time == T0
    created = sim.cond("Created")
    assert created is not None and created.status == "False" and created.reason == "Creating"
    assert not sim.is_true("Running")


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_gang_created_scheduled_running_then_converged(nodes: int) -> None:
    sim = Sim({"numNodes": nodes})
    sim.step()
    # pods visible, not scheduled: nothing to create, Created=True
    plan = sim.step(5)
    assert plan.creates == []
    created = sim.cond("Created")
    assert created is not None and created.status == "True" and created.reason == "PodsCreated"
    assert sim.st.created_attempt == 0
    assert sim.st.pods.active == nodes and sim.st.pods.ready == 0
    assert sim.st.phase == "Pending"
    assert sim.step(1).is_empty()

    sim.schedule()
    sim.step(1)
    assert sim.cond("Created").reason == "GangScheduled"  # type: ignore[union-attr]
    assert sim.st.phase == "Pending"

    sim.start()
    plan = sim.step(10)
    assert sim.st.phase == "Running"
    running = sim.cond("Running")
    assert running is not None and running.status == "True" and running.reason == "AllPodsRunning"
    assert running.last_transition_time == sim.now
    assert reasons(plan) == [("Normal", "Running")]
    assert plan.observations["running_after_seconds"] == pytest.approx(17.0)
    assert sim.st.pods.active == nodes and sim.st.pods.ready == nodes
    # converged: zero writes
    for _ in range(3):
        assert sim.step(30).is_empty()


def test_partial_observation_recreates_only_missing_pods() -> None:
    sim = Sim({"numNodes": 3})
    plan = sim.reconcile()
    sim.apply(plan)
    sim.remove(1)  # the informer has not seen this one yet (or its create failed)
    plan = sim.step()
    assert [c["kind"] for c in plan.creates] == ["Pod"]
    assert created_pods(plan) == [pod_name(0, 1)]
    assert sim.st.created_attempt is None
    sim.step()
    assert sim.st.created_attempt == 0


def test_config_map_and_service_recreated_when_missing() -> None:
    sim = Sim()
    sim.run_gang()
    sim.service = None
    plan = sim.step()
    assert [c["kind"] for c in plan.creates] == ["Service"]
    assert plan.deletes == [] and plan.events == []
    sim.config_map = None
    assert [c["kind"] for c in sim.step().creates] == ["ConfigMap"]
    assert sim.step().is_empty()


def test_volcano_pod_group_created_per_attempt() -> None:
    sim = Sim(cfg=OperatorConfig(gang_scheduler="volcano"))
    plan = sim.step()
    assert [c["kind"] for c in plan.creates] == ["ConfigMap", "Service", "PodGroup", "Pod", "Pod"]
    sim.start()
    sim.step()
    assert sim.step().is_empty()
    sim.fail(0)
    sim.step()
    plan = sim.step()
    assert "ft-r1" in [c["metadata"]["name"] for c in plan.creates if c["kind"] == "PodGroup"]


def test_resolved_values_are_frozen() -> None:
    gpu = {"resources": {"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}}
    sim = Sim(gpu)
    sim.run_gang()
    assert sim.st.resolved.model_dump(include={"image", "nproc_per_node", "backend"}) == {
        "image": CFG.default_image,
        "nproc_per_node": 4,
        "backend": "nccl",
    }
    # the operator is upgraded with a new default image; a restart keeps the frozen one
    sim.cfg = OperatorConfig(default_image="reg/new:2")
    assert sim.step().is_empty()
    sim.fail(1)
    sim.step()
    plan = sim.step()
    pods = [c for c in plan.creates if c["kind"] == "Pod"]
    assert pods and all(p["spec"]["containers"][0]["image"] == CFG.default_image for p in pods)


# ---------------------------------------------------------------------------------------- restarts


def test_pod_failure_restarts_the_whole_gang() -> None:
    sim = Sim({"numNodes": 3})
    sim.run_gang()
    running_since = sim.cond("Running").last_transition_time  # type: ignore[union-attr]
    sim.now += timedelta(seconds=100)
    sim.fail(2, exit_code=1, reason="Error", finished=sim.now - timedelta(seconds=3))
    sim.fail(1, exit_code=1, reason="Error", finished=sim.now - timedelta(seconds=5))
    plan = sim.step()
    assert plan.status_first is True
    assert deleted_pods(plan) == sorted(pod_name(0, i) for i in range(3))
    assert plan.creates == [] and plan.stops == []
    assert plan.observations["restart"] == "failure"
    assert reasons(plan) == [("Warning", "Restarting")]
    st = sim.st
    assert (st.attempt, st.restarts, st.restarts_count_towards_limit) == (1, 1, 1)
    assert st.phase == "Restarting"
    restarting = sim.cond("Restarting")
    assert restarting is not None and restarting.status == "True" and restarting.reason == "PodFailed"
    assert sim.cond("Running").status == "False"  # type: ignore[union-attr]
    # the earliest failure by finishedAt classifies the gang
    assert st.last_failure is not None
    assert st.last_failure.pod == pod_name(0, 1)
    assert st.last_failure.exit_code == 1
    assert st.last_failure.reason == "Error"
    assert st.last_failure.time == sim.now - timedelta(seconds=5)
    assert pod_name(0, 1) in plan.events[0].message

    # next reconcile: the new attempt is created without waiting for the old pods to go away
    plan = sim.step()
    assert created_pods(plan) == [pod_name(1, i) for i in range(3)]
    assert plan.deletes == [] and plan.events == []
    assert sim.st.phase == "Restarting"
    assert sim.st.pods.active == 0  # the new pods are not observed yet
    sim.step()
    assert sim.st.pods.active == 3
    sim.gc()
    sim.start()
    plan = sim.step(20)
    assert sim.st.phase == "Running"
    assert reasons(plan) == [("Normal", "Running")]
    assert sim.cond("Restarting").status == "False"  # type: ignore[union-attr]
    assert sim.cond("Created").reason == "GangRecreated"  # type: ignore[union-attr]
    assert sim.cond("Running").last_transition_time == sim.now != running_since  # type: ignore[union-attr]
    assert "running_after_seconds" not in plan.observations  # only for the first start
    assert sim.step().is_empty()


def test_earliest_failure_ties_break_by_pod_name() -> None:
    sim = Sim({"numNodes": 2})
    sim.run_gang()
    sim.fail(1, exit_code=3)
    sim.fail(0, exit_code=7)
    sim.step()
    assert sim.st.last_failure is not None and sim.st.last_failure.pod == pod_name(0, 0)
    assert sim.st.last_failure.exit_code == 7


def test_oom_kill_is_retryable() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(0, exit_code=137, reason="OOMKilled")
    sim.step()
    assert sim.st.restarts_count_towards_limit == 1
    assert sim.st.last_failure.reason == "OOMKilled"  # type: ignore[union-attr]
    assert sim.is_true("Restarting")


def test_retryable_termination_message_is_retried() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(1, message={"retryable": True, "reason": "NCCLTimeout", "message": "watchdog"})
    sim.step()
    assert sim.is_true("Restarting") and not sim.is_true("Failed")
    assert sim.st.last_failure.reason == "NCCLTimeout"  # type: ignore[union-attr]


def test_failure_before_running_restarts_too() -> None:
    sim = Sim()
    sim.step()
    sim.schedule()
    sim.fail(0)
    sim.step()
    assert sim.st.attempt == 1 and sim.st.restarts_count_towards_limit == 1


def test_stale_pods_are_deleted_once() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(0)
    sim.step()
    # the old pods' deletion was lost (e.g. the operator restarted before applying it)
    for p in sim.pods.values():
        p["metadata"].pop("deletionTimestamp", None)
    plan = sim.step()
    assert deleted_pods(plan) == [pod_name(0, 0), pod_name(0, 1)]
    assert created_pods(plan) == [pod_name(1, 0), pod_name(1, 1)]
    assert plan.events == []


def test_restart_of_a_new_attempt_before_it_ran() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(0)
    sim.step()
    sim.step()
    sim.gc()
    sim.schedule()
    sim.fail(1)
    plan = sim.step()
    assert reasons(plan) == [("Warning", "Restarting")]  # each restart is announced
    assert (sim.st.attempt, sim.st.restarts) == (2, 2)
    assert sim.is_true("Restarting")


# ------------------------------------------------------------------------------------- disruptions


def test_deleted_pod_restarts_without_counting() -> None:
    sim = Sim()
    sim.run_gang()
    sim.delete(1)  # someone else deletes a running pod
    plan = sim.step()
    st = sim.st
    assert (st.attempt, st.restarts, st.restarts_count_towards_limit) == (1, 1, 0)
    assert plan.observations["restart"] == "disruption"
    assert sim.cond("Restarting").reason == "PodDisrupted"  # type: ignore[union-attr]
    assert deleted_pods(plan) == [pod_name(0, 0)]  # the deleting one is not deleted again
    assert st.last_failure is not None and st.last_failure.pod == pod_name(0, 1)
    assert st.last_failure.reason == "PodDeleted"


def test_deleted_pod_that_then_fails_is_still_a_disruption() -> None:
    # kubelet kills a deleted pod (SIGTERM): phase Failed, exit 143, finishedAt after deletion
    sim = Sim()
    sim.run_gang()
    sim.delete(1)
    sim.fail(1, exit_code=143, finished=sim.now + timedelta(seconds=2))
    sim.step(3)
    assert (sim.st.restarts, sim.st.restarts_count_towards_limit) == (1, 0)


def test_failure_before_deletion_still_counts() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(1, exit_code=1, finished=sim.now)
    sim.now += timedelta(seconds=5)
    sim.delete(1)  # cleaned up by someone after it had already failed on its own
    sim.step()
    assert (sim.st.restarts, sim.st.restarts_count_towards_limit) == (1, 1)


def test_node_loss_taint_eviction_is_a_disruption() -> None:
    sim = Sim()
    sim.run_gang()
    pod = sim.pod(0)
    pod["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
    )
    sim.delete(0)
    plan = sim.step()
    assert plan.observations["restart"] == "disruption"
    assert sim.st.restarts_count_towards_limit == 0
    assert "DeletionByTaintManager" in (sim.st.last_failure.message or "")  # type: ignore[union-attr]


def test_missing_pod_after_gang_created_restarts_without_counting() -> None:
    sim = Sim()
    sim.run_gang()
    sim.remove(0)  # node lost, pod force-deleted
    plan = sim.step()
    st = sim.st
    assert (st.attempt, st.restarts, st.restarts_count_towards_limit) == (1, 1, 0)
    assert plan.observations["restart"] == "disruption"
    assert deleted_pods(plan) == [pod_name(0, 1)]
    assert st.last_failure.pod == pod_name(0, 0)  # type: ignore[union-attr]


def test_missing_pod_before_gang_created_is_just_recreated() -> None:
    sim = Sim({"numNodes": 3})
    sim.apply(sim.reconcile())
    sim.remove(2)  # the gang was never fully observed: no restart
    plan = sim.step()
    assert created_pods(plan) == [pod_name(0, 2)]
    assert sim.st.restarts == 0 and sim.st.attempt == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]},
        {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]},
        {"pod_reason": "Evicted"},
        {"pod_reason": "NodeShutdown"},
    ],
)
def test_disruption_does_not_count_toward_backoff_limit(kw: dict[str, Any]) -> None:
    sim = Sim({"runPolicy": {"backoffLimit": 0}})
    sim.run_gang()
    sim.fail(0, exit_code=137, **kw)
    plan = sim.step()
    assert not sim.is_true("Failed")
    assert (sim.st.restarts, sim.st.restarts_count_towards_limit) == (1, 0)
    assert plan.observations["restart"] == "disruption"


def test_disruption_target_false_counts() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(0, conditions=[{"type": "DisruptionTarget", "status": "False"}])
    sim.step()
    assert sim.st.restarts_count_towards_limit == 1


def test_disruptions_never_exhaust_the_backoff_limit() -> None:
    sim = Sim({"runPolicy": {"backoffLimit": 1}})
    for _ in range(5):
        sim.run_gang()
        sim.delete(0)
        sim.step()
        sim.step()
        sim.gc()
        sim.wait_backoff()
    assert (sim.st.restarts, sim.st.restarts_count_towards_limit, sim.st.attempt) == (5, 0, 5)
    assert not sim.is_true("Failed")


# -------------------------------------------------------------------------------- permanent errors


def test_non_retryable_termination_message_fails_permanently() -> None:
    sim = Sim({"numNodes": 3, "runPolicy": {"backoffLimit": 5}})
    sim.run_gang()
    sim.fail(
        1,
        exit_code=1,
        message={"retryable": False, "reason": "BadDataset", "message": "label 7 out of range"},
    )
    plan = sim.step()
    assert sim.st.phase == "Failed"
    failed = sim.cond("Failed")
    assert failed is not None and failed.status == "True" and failed.reason == "PermanentError"
    assert pod_name(0, 1) in failed.message and "BadDataset" in failed.message
    assert "label 7 out of range" in failed.message
    assert reasons(plan) == [("Warning", "PermanentError")]
    # survivors are stopped, never deleted, so their logs stay readable
    assert sorted(plan.stops) == [pod_name(0, 0), pod_name(0, 2)]
    assert plan.deletes == [] and plan.creates == []
    assert sim.st.restarts == 0 and sim.st.attempt == 0
    assert sim.st.completion_time == sim.now
    lf = sim.st.last_failure
    assert lf is not None and (lf.pod, lf.reason, lf.exit_code) == (pod_name(0, 1), "BadDataset", 1)
    assert lf.message == "label 7 out of range"
    assert not sim.is_true("Running")
    # stopped pods keep their stop; later reconciles write nothing
    assert sim.step(5).is_empty()
    sim.fail(0, exit_code=137, reason="DeadlineExceeded")
    sim.fail(2, exit_code=137, reason="DeadlineExceeded")
    plan = sim.step(5)
    assert plan.deletes == [] and plan.stops == [] and plan.events == [] and plan.creates == []
    assert sim.st.pods.failed == 3
    assert sim.step(5000).is_empty()
    assert len(sim.pods) == 3


def test_permanent_error_wins_over_an_earlier_retryable_failure() -> None:
    sim = Sim({"numNodes": 3})
    sim.run_gang()
    sim.fail(0, exit_code=1, finished=sim.now - timedelta(seconds=5))
    sim.fail(2, message={"retryable": False, "reason": "ModelNotFound", "message": "no config.json"})
    sim.step()
    assert sim.cond("Failed").reason == "PermanentError"  # type: ignore[union-attr]
    assert pod_name(0, 2) in sim.cond("Failed").message  # type: ignore[union-attr]
    assert sim.st.last_failure.pod == pod_name(0, 2)  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"retryable": "false"}', "{}"])
def test_malformed_termination_messages_are_retryable(raw: str) -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(0, message=raw)
    sim.step()
    assert sim.is_true("Restarting") and not sim.is_true("Failed")


# ----------------------------------------------------------------------------------- backoff limit


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_backoff_limit_exhaustion(limit: int) -> None:
    sim = Sim({"numNodes": 2, "runPolicy": {"backoffLimit": limit}})
    for i in range(limit):
        sim.run_gang()
        sim.fail(1, exit_code=2)
        sim.step()
        assert sim.st.restarts_count_towards_limit == i + 1
        assert not sim.is_true("Failed")
        sim.step()
        sim.gc()
        sim.wait_backoff()
    sim.run_gang()
    sim.fail(1, exit_code=2)
    plan = sim.step()
    assert sim.st.phase == "Failed"
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "BackoffLimitExceeded"
    assert pod_name(limit, 1) in failed.message
    assert reasons(plan) == [("Warning", "BackoffLimitExceeded")]
    assert plan.stops == [pod_name(limit, 0)]
    assert plan.deletes == []
    assert (sim.st.attempt, sim.st.restarts, sim.st.restarts_count_towards_limit) == (limit, limit, limit)
    assert sim.st.last_failure.exit_code == 2  # type: ignore[union-attr]
    assert sim.step(60).is_empty()


def test_disruptions_and_failures_mixed() -> None:
    sim = Sim({"runPolicy": {"backoffLimit": 1}})
    sim.run_gang()
    sim.fail(0)
    sim.step()
    sim.step()
    sim.gc()
    sim.run_gang()
    sim.delete(1)  # disruption: allowed even though the limit is used up
    sim.step()
    assert not sim.is_true("Failed") and sim.st.restarts == 2
    sim.step()
    sim.gc()
    sim.wait_backoff()
    sim.run_gang()
    sim.fail(0)
    sim.step()
    assert sim.cond("Failed").reason == "BackoffLimitExceeded"  # type: ignore[union-attr]
    assert (sim.st.restarts, sim.st.restarts_count_towards_limit) == (2, 1)


# ---------------------------------------------------------------------------------------- timeouts


def test_startup_timeout_names_the_waiting_reason() -> None:
    sim = Sim({"runPolicy": {"startupTimeoutSeconds": 600}})
    sim.step()
    sim.schedule()
    sim.waiting(1, "ErrImagePull", "manifest unknown")
    sim.step(10)
    assert sim.st.phase == "Pending"
    sim.start(0)
    sim.step(10)
    assert sim.step(579).is_empty()  # 599 s after scheduling
    plan = sim.step(1)
    assert sim.st.phase == "Failed"
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "StartupTimeout"
    assert "ErrImagePull" in failed.message and pod_name(0, 1) in failed.message
    assert "manifest unknown" in failed.message
    assert reasons(plan) == [("Warning", "StartupTimeout")]
    assert sorted(plan.stops) == [pod_name(0, 0), pod_name(0, 1)]
    assert plan.deletes == []
    assert sim.step(10).is_empty()


def test_startup_timeout_without_waiting_error() -> None:
    sim = Sim({"runPolicy": {"startupTimeoutSeconds": 30}})
    sim.step()
    sim.schedule()
    sim.step(31)
    assert sim.cond("Failed").reason == "StartupTimeout"  # type: ignore[union-attr]


def test_startup_timeout_counts_from_when_the_gang_was_fully_scheduled() -> None:
    # rank 0 is placed at once; rank 1 waits 700 s for room (within the schedule timeout)
    sim = Sim({"runPolicy": {"scheduleTimeoutSeconds": 800, "startupTimeoutSeconds": 600}})
    sim.step()
    sim.schedule(0)
    sim.start(0)
    sim.step(1)
    sim.step(700)
    assert sim.cond("Created").reason == "PodsCreated"  # type: ignore[union-attr]
    sim.schedule(1)  # pulling its image now: phase Pending
    sim.step(1)
    assert not sim.is_true("Failed"), sim.cond("Failed")
    assert sim.cond("Created").reason == "GangScheduled"  # type: ignore[union-attr]
    sim.waiting(1, "ImagePullBackOff", "back-off")
    sim.step(598)
    assert not sim.is_true("Failed")
    sim.step(2)
    assert sim.cond("Failed").reason == "StartupTimeout"  # type: ignore[union-attr]


def test_schedule_timeout_warns_once_and_keeps_waiting() -> None:
    """Nothing scheduled holds nothing: the gang keeps waiting (a partial one is released, below)."""
    sim = Sim({"numNodes": 4, "runPolicy": {"scheduleTimeoutSeconds": 300}})
    sim.step()
    sim.step(1)
    assert sim.step(298).is_empty()
    plan = sim.step(1)  # 300 s after the pods were created
    assert reasons(plan) == [("Warning", "Unschedulable")]
    assert "0/4" in plan.events[0].message
    created = sim.cond("Created")
    assert created is not None and created.status == "True" and created.reason == "Unschedulable"
    assert created.last_transition_time == T0 + timedelta(seconds=1)  # status did not flip
    assert sim.st.phase == "Pending"
    assert not sim.is_true("Failed")
    for _ in range(5):
        plan = sim.step(600)
        assert plan.events == [] and not sim.is_true("Failed")
        assert plan.is_empty()
    sim.schedule()
    sim.step(1)
    assert sim.cond("Created").reason == "GangScheduled"  # type: ignore[union-attr]
    sim.start()
    sim.step(1)
    assert sim.st.phase == "Running"


def test_active_deadline() -> None:
    sim = Sim({"runPolicy": {"activeDeadlineSeconds": 3600}})
    sim.run_gang()
    assert sim.step(3500).is_empty()
    plan = sim.step(100)
    assert sim.st.phase == "Failed"
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "DeadlineExceeded"
    assert "3600" in failed.message
    assert reasons(plan) == [("Warning", "DeadlineExceeded")]
    assert sorted(plan.stops) == [pod_name(0, 0), pod_name(0, 1)]
    assert plan.deletes == []
    assert sim.st.completion_time == sim.now
    assert not sim.is_true("Running")
    assert sim.step(10).is_empty()


def test_active_deadline_counts_restarts() -> None:
    sim = Sim({"runPolicy": {"activeDeadlineSeconds": 100}})
    sim.run_gang()
    sim.fail(0)
    sim.step(60)
    sim.step()
    sim.gc()
    sim.start()
    sim.step(39)
    assert sim.st.phase == "Running"
    sim.step(1)
    assert sim.cond("Failed").reason == "DeadlineExceeded"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------- suspend/resume


def test_suspend_deletes_pods_and_resume_starts_a_new_attempt() -> None:
    sim = Sim({"numNodes": 2, "runPolicy": {"activeDeadlineSeconds": 1000}})
    sim.run_gang()
    sim.fail(0)
    sim.step()
    sim.step()
    sim.gc()
    sim.start()
    sim.step(100)
    assert sim.st.attempt == 1 and sim.st.phase == "Running"
    restarts = (sim.st.restarts, sim.st.restarts_count_towards_limit)

    sim.set_spec(suspend=True)
    plan = sim.step(10)
    assert deleted_pods(plan) == [pod_name(1, 0), pod_name(1, 1)]
    assert reasons(plan) == [("Normal", "Suspended")]
    assert sim.st.phase == "Suspended"
    assert sim.is_true("Suspended") and not sim.is_true("Running") and not sim.is_true("Restarting")
    assert sim.st.pods.active == 0
    plan = sim.step(10)  # pods still terminating
    assert plan.deletes == [] and plan.events == [] and plan.creates == []
    sim.gc()
    assert sim.step(10).is_empty()
    # the deadline does not run out while suspended
    assert sim.step(5000).is_empty()

    sim.set_spec(suspend=False)
    plan = sim.step(10)
    assert reasons(plan) == [("Normal", "Resumed")]
    assert plan.status_first is True
    assert plan.creates == []
    assert sim.st.attempt == 2
    assert (sim.st.restarts, sim.st.restarts_count_towards_limit) == restarts
    assert sim.st.start_time == sim.now
    suspended = sim.cond("Suspended")
    assert suspended is not None and suspended.status == "False" and suspended.reason == "Resumed"
    assert sim.st.phase == "Pending"
    resumed_at = sim.now
    plan = sim.step()
    assert created_pods(plan) == [pod_name(2, 0), pod_name(2, 1)]
    sim.start()
    sim.step(1)
    assert sim.st.phase == "Running"
    # deadline counted from the resume
    sim.step((resumed_at + timedelta(seconds=999) - sim.now).total_seconds())
    assert sim.st.phase == "Running"
    sim.step(1)
    assert sim.cond("Failed").reason == "DeadlineExceeded"  # type: ignore[union-attr]


def test_created_suspended_creates_nothing() -> None:
    sim = Sim({"runPolicy": {"suspend": True}})
    plan = sim.step()
    assert plan.creates == [] and plan.deletes == []
    assert sim.st.phase == "Suspended"
    assert reasons(plan) == [("Normal", "Suspended")]
    assert sim.step(100).is_empty()
    sim.set_spec(suspend=False)
    sim.step()
    assert sim.st.attempt == 1
    plan = sim.step()
    assert created_pods(plan) == [pod_name(1, 0), pod_name(1, 1)]
    sim.start()
    sim.step()
    assert sim.st.phase == "Running"


def test_resume_while_old_pods_still_terminate() -> None:
    sim = Sim()
    sim.run_gang()
    sim.set_spec(suspend=True)
    sim.step()
    sim.set_spec(suspend=False)
    sim.step()  # the old pods are still Terminating: a new attempt never waits for them
    plan = sim.step()
    assert created_pods(plan) == [pod_name(1, 0), pod_name(1, 1)]
    assert plan.deletes == []
    sim.start()
    sim.step()
    assert sim.st.phase == "Running" and sim.st.restarts == 0


def test_suspend_is_ignored_once_terminal() -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.succeed(0)
    sim.step()
    sim.set_spec(suspend=True)
    plan = sim.step()
    assert plan.deletes == [] and plan.events == []
    assert sim.st.phase == "Succeeded" and not sim.is_true("Suspended")


def test_suspend_while_restarting() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(1)
    sim.step()
    assert sim.st.phase == "Restarting"
    sim.set_spec(suspend=True)
    plan = sim.step()
    assert sim.st.phase == "Suspended"
    assert not sim.is_true("Restarting")
    assert plan.creates == []


# -------------------------------------------------------------------------------------- success, TTL


def test_success_reports_model_and_metrics() -> None:
    sim = Sim({"numNodes": 3})
    sim.run_gang()
    sim.progress = {"step": 90, "totalSteps": 120, "epoch": 2.5, "loss": 0.3, "updatedAt": iso(sim.now)}
    sim.step(1)
    sim.succeed(1)
    sim.succeed(2)
    plan = sim.step(1)
    assert sim.st.phase == "Running"  # not every rank is done
    assert plan.events == []
    metrics = {"evalAccuracy": 0.91, "evalLoss": 0.25, "trainLoss": 0.2}
    sim.succeed(0, message={"metrics": metrics})
    plan = sim.step(1)
    assert sim.st.phase == "Succeeded"
    assert sim.is_true("Succeeded") and not sim.is_true("Running") and not sim.is_true("Failed")
    assert reasons(plan) == [("Normal", "Succeeded")]
    assert sim.st.output.model == "pvc://results/sentiment-ft/model"
    assert sim.st.output.metrics == metrics
    assert sim.st.completion_time == sim.now
    assert sim.st.pods.succeeded == 3 and sim.st.pods.active == 0
    assert sim.st.progress.percent == 100 and sim.st.progress.step == 120
    assert plan.deletes == [] and plan.stops == []
    assert sim.step(100).is_empty()


def test_success_without_metrics() -> None:
    # (a trailing slash in spec.output.storage is an empty path segment, refused by admission now)
    sim = Sim({"numNodes": 1, "output": {"storage": "pvc://results/run1"}})
    sim.run_gang()
    sim.succeed(0, message="plain text, not JSON")
    sim.step()
    assert sim.st.output.model == "pvc://results/run1/model"
    assert sim.st.output.metrics == {}


@pytest.mark.parametrize("finish", ["succeed", "fail"])
def test_ttl_after_finished(finish: str) -> None:
    sim = Sim({"numNodes": 1, "runPolicy": {"ttlSecondsAfterFinished": 100, "backoffLimit": 0}})
    sim.run_gang()
    if finish == "succeed":
        sim.succeed(0)
    else:
        sim.fail(0)
    plan = sim.step(50)
    done = sim.now
    assert plan.delete_self is False
    assert sim.st.completion_time == done
    assert sim.step(99).is_empty()
    plan = sim.step(1)
    assert plan.delete_self is True
    assert plan.status is None and plan.events == []
    assert sim.step(1000).delete_self is True


def test_no_ttl_never_deletes() -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.succeed(0)
    sim.step()
    assert sim.step(10**8).is_empty()


def test_ttl_zero_deletes_on_the_next_reconcile() -> None:
    sim = Sim({"numNodes": 1, "runPolicy": {"ttlSecondsAfterFinished": 0}})
    sim.run_gang()
    sim.succeed(0)
    assert sim.step().delete_self is False
    assert sim.step().delete_self is True


def test_terminal_job_deletes_leftover_stale_pods_only() -> None:
    sim = Sim({"numNodes": 2})
    sim.run_gang()
    sim.fail(0)
    sim.step()
    sim.step()
    sim.start()
    # attempt 0's deletes were lost: rank 0 finished (Failed), rank 1 still running
    for p in sim.pods.values():
        p["metadata"].pop("deletionTimestamp", None)
    sim.succeed(0)
    sim.succeed(1)
    plan = sim.step()
    assert sim.st.phase == "Succeeded"
    assert deleted_pods(plan) == [pod_name(0, 0), pod_name(0, 1)]
    # lost again; once terminal only unfinished stale pods are deleted (finished ones keep their logs)
    for p in sim.pods.values():
        p["metadata"].pop("deletionTimestamp", None)
    plan = sim.step()
    assert deleted_pods(plan) == [pod_name(0, 1)]
    assert plan.stops == [] and plan.status is None
    assert sim.step().is_empty()


# ----------------------------------------------------------------------------------------- progress


def test_progress_updates_and_ignores_older_reports() -> None:
    sim = Sim()
    sim.run_gang()
    sim.progress = {
        "step": 25,
        "totalSteps": 200,
        "epoch": 0.4,
        "loss": 0.61,
        "samplesPerSecond": 120.5,
        "etaSeconds": 300,
        "updatedAt": iso(sim.now),
    }
    plan = sim.step(1)
    assert plan.status is not None and plan.events == []
    p = sim.st.progress
    assert (p.step, p.total_steps, p.percent, p.loss, p.eta_seconds) == (25, 200, 12, 0.61, 300)
    assert p.updated_at == sim.now - timedelta(seconds=1)
    assert sim.step(1).is_empty()  # the same report again: nothing to write
    # an older report (a slower fetch racing a newer one) is ignored
    sim.progress = {"step": 10, "totalSteps": 200, "updatedAt": iso(sim.now - timedelta(seconds=60))}
    assert sim.step(1).is_empty()
    assert sim.st.progress.step == 25
    sim.progress = {"step": 50, "totalSteps": 200, "percent": 26.4, "updatedAt": iso(sim.now)}
    sim.step(1)
    assert (sim.st.progress.step, sim.st.progress.percent) == (
        50,
        25,
    )  # percent is computed from step/totalSteps, never copied
    # garbage is ignored, not a crash
    sim.progress = {"step": "many", "updatedAt": "yesterday"}
    assert sim.step(1).is_empty()
    assert sim.st.progress.step == 50


def test_progress_ignored_once_terminal() -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.succeed(0)
    sim.step()
    sim.progress = {"step": 1, "totalSteps": 10, "updatedAt": iso(sim.now + timedelta(days=1))}
    assert sim.step().is_empty()


# ------------------------------------------------------------------------------------- invalid spec


@pytest.mark.parametrize(
    ("pvcs", "claim", "field"),
    [
        ({"results": ["ReadWriteOnce"]}, "results", "spec.output.storage"),
        ({"results": ["ReadOnlyMany"]}, "results", "spec.output.storage"),
        ({"results": ["ReadWriteMany"], "models": ["ReadWriteOnce"]}, "models", "source"),
        ({"results": ["ReadWriteMany"], "data": ["ReadWriteOncePod"]}, "data", "source"),
        ({"data": []}, "data", "source"),
    ],
)
def test_pvc_access_modes_for_multi_node(pvcs: dict[str, list[str]], claim: str, field: str) -> None:
    sim = Sim({"numNodes": 2}, pvcs=pvcs)
    plan = sim.step()
    assert sim.st.phase == "Failed"
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "InvalidSpec"
    assert f"PersistentVolumeClaim {claim} " in failed.message and field in failed.message
    assert plan.creates == []
    assert reasons(plan) == [("Warning", "InvalidSpec")]
    assert sim.step(10).is_empty()


@pytest.mark.parametrize(
    "pvcs",
    [
        {"results": ["ReadWriteMany"], "models": ["ReadOnlyMany"], "data": ["ReadWriteMany"]},
        {"results": ["ReadWriteMany", "ReadWriteOnce"]},
        {},  # unknown claims: pods wait for them like any pod would
    ],
)
def test_pvc_access_modes_ok(pvcs: dict[str, list[str]]) -> None:
    sim = Sim({"numNodes": 2}, pvcs=pvcs)
    plan = sim.step()
    assert len(created_pods(plan)) == 2
    assert not sim.is_true("Failed")


def test_single_node_may_use_read_write_once() -> None:
    sim = Sim({"numNodes": 1}, pvcs={"results": ["ReadWriteOnce"], "models": ["ReadWriteOnce"]})
    assert len(created_pods(sim.step())) == 1


def test_output_claim_shared_with_source_needs_rwx() -> None:
    sim = Sim({"output": {"storage": "pvc://models/out"}}, pvcs={"models": ["ReadOnlyMany"]})
    sim.step()
    failed = sim.cond("Failed")
    assert failed is not None and "models" in failed.message and "ReadWriteMany" in failed.message


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (
            {
                "nprocPerNode": 3,
                "resources": {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}},
            },
            "spec.nprocPerNode",
        ),
        ({"dataset": {"source": "file:///data/x.jsonl"}}, "spec.dataset.source"),
        ({"output": {"storage": "file://./runs/x"}}, "spec.output.storage"),
    ],
)
def test_invalid_spec_fails_without_creating_anything(spec: dict[str, Any], needle: str) -> None:
    sim = Sim(spec)
    plan = sim.step()
    assert plan.creates == []
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "InvalidSpec" and needle in failed.message
    assert sim.st.phase == "Failed"
    assert sim.st.completion_time == sim.now
    assert sim.step(5).is_empty()


def test_refused_child_is_invalid_spec() -> None:
    sim = Sim()
    observed = sim.observed()
    observed.refused = ["Pod ft-r0-node-0: spec.containers[0].resources: Invalid value"]
    plan = reconcile(sim.job, observed, sim.now, sim.cfg)
    sim.apply(plan)
    sim.check()
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "InvalidSpec" and "ft-r0-node-0" in failed.message


# ------------------------------------------------------------------------------------------ conflict


def test_resource_conflict() -> None:
    sim = Sim()
    sim.conflicts = ["Service ft-nodes"]
    plan = sim.step()
    assert plan.creates == []
    created = sim.cond("Created")
    assert created is not None and created.status == "False" and created.reason == "ResourceConflict"
    assert "ft-nodes" in created.message
    assert reasons(plan) == [("Warning", "ResourceConflict")]
    assert sim.st.phase == "Pending"
    assert sim.step(60).is_empty()
    sim.conflicts = []  # the user removed the foreign object
    plan = sim.step()
    assert len(created_pods(plan)) == 2


# ------------------------------------------------------------------------------- condition mechanics


def test_last_transition_time_moves_only_when_status_flips() -> None:
    sim = Sim()
    sim.step()
    created = sim.cond("Created")
    assert created is not None and created.status == "False" and created.last_transition_time == T0
    sim.step(5)  # reason Creating -> PodsCreated, status False -> True
    assert sim.cond("Created").last_transition_time == T0 + timedelta(seconds=5)  # type: ignore[union-attr]
    sim.schedule()
    sim.step(5)  # reason PodsCreated -> GangScheduled, still True
    created = sim.cond("Created")
    assert created is not None and created.reason == "GangScheduled"
    assert created.last_transition_time == T0 + timedelta(seconds=5)
    sim.start()
    sim.step(5)
    ltt = sim.cond("Running").last_transition_time  # type: ignore[union-attr]
    sim.step(500)
    assert sim.cond("Running").last_transition_time == ltt  # type: ignore[union-attr]


def test_observed_generation_on_every_condition_after_an_edit() -> None:
    sim = Sim()
    sim.run_gang()
    sim.set_spec(suspend=True)
    sim.step()
    sim.gc()
    sim.set_spec(suspend=False)
    sim.step()
    sim.step()
    sim.start()
    sim.step()
    sim.set_spec(backoffLimit=7)  # a generation bump that changes no condition's status
    plan = sim.step()
    assert plan.status is not None
    assert sim.st.observed_generation == 4
    assert {c.type: c.observed_generation for c in sim.st.conditions} == {
        "Created": 4,
        "Running": 4,
        "Suspended": 4,
        "Restarting": 4,
    }
    assert sim.step().is_empty()


def test_observed_generation_on_a_finished_job_edit() -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.succeed(0)
    sim.step()
    sim.set_spec(ttlSecondsAfterFinished=3600)
    plan = sim.step()
    assert plan.status is not None and plan.events == []
    assert sim.st.observed_generation == 2


def test_status_round_trips_without_spurious_writes() -> None:
    """Whatever the plan writes, reading it back and reconciling again writes nothing new."""
    sim = Sim({"numNodes": 2, "runPolicy": {"backoffLimit": 2}})
    sim.run_gang()
    sim.fail(0, message={"retryable": True, "reason": "x" * 3000, "message": "y" * 5000})
    sim.step()
    assert len(sim.st.last_failure.message or "") <= 1024  # type: ignore[union-attr]
    sim.step()
    sim.gc()
    sim.start()
    sim.step()
    assert sim.step().is_empty()


def test_full_lifecycle_events() -> None:
    sim = Sim({"numNodes": 2, "runPolicy": {"backoffLimit": 2}})
    sim.run_gang()
    sim.fail(1)
    sim.step()
    sim.step()
    sim.gc()
    sim.start()
    sim.step()
    sim.succeed(0, message={"metrics": {"evalAccuracy": 1.0}})
    sim.succeed(1)
    sim.step()
    sim.step()
    assert [(t, r) for t, r, _ in sim.events] == [
        ("Normal", "Running"),
        ("Warning", "Restarting"),
        ("Normal", "Running"),
        ("Normal", "Succeeded"),
    ]
    assert sim.st.restarts == 1
    assert sim.events[-1][2] == "training finished after 1 restart(s)"


def test_status_shape_is_camel_case() -> None:
    sim = Sim()
    plan = sim.step()
    assert plan.status is not None
    assert {"phase", "conditions", "observedGeneration", "attempt", "restartsCountTowardsLimit"} <= set(
        plan.status
    )
    assert "nprocPerNode" in plan.status["resolved"]
    assert plan.status["startTime"] == "2025-01-01T12:00:00Z"


def test_progress_with_fractional_percent_from_trainer_is_accepted():
    """The trainer reports percent as a float (57.14); status.progress.percent is an integer we compute."""
    import datetime as dt

    from tauon.api.finetunejob import FineTuneJob
    from tauon.reconcile.finetunejob import Observed, reconcile
    from tauon.render.config import OperatorConfig

    job = FineTuneJob.model_validate(
        {
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {
                "model": {"source": "hf://o/m", "task": "causal-lm"},
                "dataset": {"source": "file:///d.jsonl"},
                "output": {"storage": "file:///out"},
            },
        }
    )
    report = {
        "step": 4,
        "totalSteps": 7,
        "percent": 57.14,
        "epoch": 1,
        "loss": 0.5,
        "samplesPerSecond": 12.5,
        "etaSeconds": 3,
        "updatedAt": "2026-01-01T00:00:05Z",
    }
    now = dt.datetime(2026, 1, 1, 0, 0, 6, tzinfo=dt.UTC)
    plan = reconcile(job, Observed(progress=report), now, OperatorConfig(allow_host_paths=True))
    assert plan.status is not None
    assert plan.status["progress"]["step"] == 4 and plan.status["progress"]["percent"] == 57


# ------------------------------------------------------------------- reliability (issue 13) and steps


def test_policy_steps_are_named_and_ordered() -> None:
    from tauon.reconcile import finetunejob as F

    names = [s.__name__ for s in F.STEPS]
    assert names[0] == "step_finished" and names.index("step_admission") < names.index("step_conflicts")
    assert names.index("step_suspend") < names.index("step_deadline") < names.index("step_gang_failure")
    assert names.index("step_gang_failure") < names.index("step_success") < names.index("step_create")


def test_terminal_failure_writes_status_before_stopping_pods() -> None:
    sim = Sim({"runPolicy": {"backoffLimit": 0}})
    sim.run_gang()
    sim.fail(0)
    plan = sim.step()
    assert sim.is_true("Failed") and plan.stops == [pod_name(0, 1)]
    assert plan.status_first, "a crash between stop and status write would count a restart"


def test_deadline_writes_status_first() -> None:
    sim = Sim({"runPolicy": {"activeDeadlineSeconds": 60}})
    sim.run_gang()
    plan = sim.step(advance=61)
    assert sim.cond("Failed") is not None and sim.cond("Failed").reason == "DeadlineExceeded"  # type: ignore[union-attr]
    assert plan.stops and plan.status_first


def test_many_refusals_are_summarised_and_capped() -> None:
    sim = Sim()
    sim.refused = [f"Pod ft-r0-node-{i}: spec.containers[0].image: " + "x" * 300 for i in range(256)]
    plan = sim.step()
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "InvalidSpec"
    assert "and 255 more refused" in failed.message
    assert len(failed.message.encode()) <= 1024
    assert all(len(e.message.encode()) <= 1024 for e in plan.events)
    assert reasons(plan) == [("Warning", "InvalidSpec")]


def test_long_failure_message_is_capped() -> None:
    sim = Sim({"runPolicy": {"backoffLimit": 0}})
    sim.run_gang()
    sim.fail(0, message='{"retryable": false, "reason": "Bad", "message": "' + "é" * 5000 + '"}')
    sim.step()
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "PermanentError"
    assert len(failed.message.encode()) <= 1024


@pytest.mark.parametrize(
    "bad",
    [
        {"step": 10**400},
        {"step": 3, "totalSteps": 2**80},
        {"loss": float("nan")},
        {"loss": float("inf")},
        {"samplesPerSecond": 1e300},
        {"etaSeconds": -(10**30)},
    ],
)
def test_unbounded_progress_values_are_ignored(bad: dict[str, Any]) -> None:
    sim = Sim()
    sim.run_gang()
    sim.progress = {"step": 1, "totalSteps": 10, "updatedAt": iso(sim.now), **bad}
    plan = sim.step()
    assert sim.st.progress.step == 0
    if plan.status is not None:  # whatever is written must be valid JSON for the API server
        json.dumps(plan.status, allow_nan=False)


def test_forbidden_pod_create_recorded_once() -> None:
    sim = Sim()
    sim.step()  # renders the gang; the API server refuses the pods with 403 (quota)
    sim.pods.clear()
    sim.forbidden = ['Pod ft-r0-node-0: pods "ft-r0-node-0" is forbidden: exceeded quota: q']
    sim.quota_exceeded = True
    plan = sim.step()
    created = sim.cond("Created")
    assert created is not None and (created.status, created.reason) == ("False", "QuotaExceeded")
    assert reasons(plan) == [("Warning", "QuotaExceeded")]
    assert sim.step(advance=5).events == []  # recorded once; the creates are retried quietly
    sim.forbidden, sim.quota_exceeded = [], False
    sim.step()
    assert set(sim.current()) <= set(sim.pods)


def test_forbidden_without_quota_is_create_failed() -> None:
    sim = Sim()
    sim.step()
    sim.pods.clear()
    sim.forbidden = ["Pod ft-r0-node-1: violates PodSecurity restricted"]
    plan = sim.step()
    assert reasons(plan) == [("Warning", "CreateFailed")]


def test_conflict_found_after_creation_started_is_announced() -> None:
    sim = Sim()
    sim.step()  # Created False/Creating
    sim.conflicts = ["ConfigMap/ft-config"]
    plan = sim.step()
    assert reasons(plan) == [("Warning", "ResourceConflict")]


# ----------------------------------------------------------------- status.resolved.strategy (rank 0 reports)


def test_resolved_strategy_from_progress_written_once() -> None:
    sim = Sim({"numNodes": 2})
    sim.run_gang()
    sim.progress = {
        "step": 1,
        "totalSteps": 10,
        "updatedAt": iso(sim.now),
        "resolved": {"strategy": "fsdp", "estimateBytes": 3_000_000_000, "deviceMemoryBytes": 80 * 2**30},
    }
    plan = sim.step(1)
    assert plan.status is not None
    assert plan.status["resolved"]["strategy"] == "fsdp"
    assert plan.status["resolved"]["estimate"] == {
        "stateBytesPerRank": 3_000_000_000,
        "deviceMemoryBytes": 80 * 2**30,
    }
    assert sim.st.progress.step == 1  # the report is still taken as progress
    # a later report (e.g. after a restart at another world size) never overwrites it
    sim.progress = {
        "step": 2,
        "totalSteps": 10,
        "updatedAt": iso(sim.now + timedelta(seconds=5)),
        "resolved": {"strategy": "ddp", "estimateBytes": 5},
    }
    sim.step(5)
    assert sim.st.resolved.strategy == "fsdp"
    assert (
        sim.st.resolved.estimate is not None
        and sim.st.resolved.estimate.state_bytes_per_rank == 3_000_000_000
    )
    assert sim.step(5).is_empty()  # converged: nothing to write


@pytest.mark.parametrize(
    "resolved",
    [
        {"strategy": "zero3", "estimateBytes": 10},
        {"strategy": 1},
        "fsdp",
        None,
        [],
    ],
)
def test_unusable_resolved_reports_are_ignored(resolved: Any) -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.progress = {"step": 3, "totalSteps": 10, "updatedAt": iso(sim.now), "resolved": resolved}
    sim.step(1)
    assert sim.st.resolved.strategy is None and sim.st.resolved.estimate is None
    assert sim.st.progress.step == 3


@pytest.mark.parametrize("bad", [10**30, -5, 0, 1.5, "123", True, float("nan")])
def test_resolved_estimate_values_are_bounded(bad: Any) -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.progress = {
        "step": 3,
        "totalSteps": 10,
        "updatedAt": iso(sim.now),
        "resolved": {"strategy": "ddp", "estimateBytes": bad, "deviceMemoryBytes": bad},
    }
    plan = sim.step(1)
    assert sim.st.resolved.strategy == "ddp"
    assert sim.st.resolved.estimate is None  # nothing usable: no estimate rather than a wrong one
    assert plan.status is not None
    json.dumps(plan.status, allow_nan=False)  # a valid status patch


def test_resolved_strategy_from_termination_message() -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.succeed(
        0, message={"metrics": {"trainLoss": 0.1}, "resolved": {"strategy": "ddp", "estimateBytes": 4096}}
    )
    sim.step(1)
    assert sim.st.phase == "Succeeded"
    assert sim.st.resolved.strategy == "ddp"
    assert sim.st.resolved.estimate is not None
    assert (sim.st.resolved.estimate.state_bytes_per_rank, sim.st.resolved.estimate.device_memory_bytes) == (
        4096,
        None,
    )
    assert sim.step(10).is_empty()


def test_strategy_resolution_never_touches_the_config_map() -> None:
    """The ConfigMap is immutable and shared by every attempt: reports change status only."""
    sim = Sim({"numNodes": 2})
    sim.run_gang()
    cm = copy.deepcopy(sim.config_map)
    sim.progress = {"step": 1, "totalSteps": 4, "updatedAt": iso(sim.now), "resolved": {"strategy": "fsdp"}}
    plan = sim.step(1)
    assert all(c["kind"] != "ConfigMap" for c in plan.creates + plan.applies)
    assert sim.config_map == cm
    assert sim.st.resolved.strategy == "fsdp" and sim.st.resolved.estimate is None


# ------------------------------------------------------------- backoff between attempts, partial gangs


def test_restart_delay_doubles_and_is_capped() -> None:
    from tauon.reconcile.finetunejob import BACKOFF_MAX_SECONDS, restart_delay

    got = [int(restart_delay(n).total_seconds()) for n in range(0, 10)]
    assert got == [0, 0, 10, 20, 40, 80, 160, 300, 300, 300]
    assert restart_delay(10**6).total_seconds() == BACKOFF_MAX_SECONDS


def test_repeated_disruptions_back_off_exponentially() -> None:
    sim = Sim({"numNodes": 2})
    waits = []
    for _ in range(4):
        sim.run_gang()
        sim.delete(0)
        sim.step()  # restart: the old gang is deleted
        sim.gc()
        failed_at = sim.st.last_failure.time  # type: ignore[union-attr]
        at = next_attempt_at(sim.st)
        assert at is not None
        waits.append(int((at - failed_at).total_seconds()))  # type: ignore[operator]
        if at > sim.now:
            plan = sim.step(int((at - sim.now).total_seconds()) - 1)
            assert created_pods(plan) == [] and plan.events == []  # still backing off: no writes
            assert sim.is_true("Restarting")
        sim.wait_backoff()
    assert waits == [0, 10, 20, 40]
    assert (sim.st.restarts, sim.st.restarts_count_towards_limit) == (4, 0)
    assert "backoff" in sim.cond("Restarting").message  # type: ignore[union-attr]


def test_resume_after_a_failure_does_not_wait_for_the_backoff() -> None:
    sim = Sim({"numNodes": 1})
    for _ in range(2):
        sim.run_gang()
        sim.delete(0)
        sim.step()
        sim.gc()
        sim.wait_backoff()
    sim.run_gang()
    sim.delete(0)
    sim.step()
    sim.gc()
    sim.set_spec(suspend=True)
    sim.step(1)
    sim.set_spec(suspend=False)
    sim.step(1)  # resumed: start_time moves past the failure
    assert created_pods(sim.step(1)) == [pod_name(sim.st.attempt, 0)]


@pytest.mark.parametrize(
    ("message", "counts"),
    [
        ('Usage of EmptyDir volume "dshm" exceeds the limit "8Gi". ', True),
        ('Container trainer exceeded its local ephemeral storage limit "1Gi". ', True),
        ("Pod ephemeral local storage usage exceeds the total limit of containers 2Gi. ", True),
        ("The node was low on resource: memory. ", False),
    ],
)
def test_self_caused_evictions_count_toward_the_limit(message: str, counts: bool) -> None:
    sim = Sim({"numNodes": 2, "runPolicy": {"backoffLimit": 3}})
    sim.run_gang()
    sim.fail(0, exit_code=137, pod_reason="Evicted")
    sim.pod(0)["status"]["message"] = message
    sim.step()
    assert sim.st.restarts == 1
    assert sim.st.restarts_count_towards_limit == (1 if counts else 0)


def test_partial_gang_released_after_schedule_timeout() -> None:
    sim = Sim({"numNodes": 4, "runPolicy": {"scheduleTimeoutSeconds": 300, "backoffLimit": 0}})
    sim.step()
    sim.step()
    sim.schedule(0, 1)  # two pods hold their nodes, two cannot be placed
    assert sim.step(299).is_empty()
    plan = sim.step(1)
    assert reasons(plan) == [("Warning", "GangReleased")]
    assert deleted_pods(plan) == sorted(pod_name(0, i) for i in range(4))
    assert plan.status_first is True
    assert plan.observations == {"restart": "unschedulable"}
    assert (sim.st.attempt, sim.st.restarts, sim.st.restarts_count_towards_limit) == (1, 1, 0)
    assert sim.st.last_failure is not None and sim.st.last_failure.reason == "Unschedulable"
    assert sim.st.last_failure.pod == pod_name(0, 2)
    assert sim.cond("Restarting").reason == "GangReleased"  # type: ignore[union-attr]
    assert not sim.is_true("Failed")  # a release never uses up backoffLimit
    sim.gc()
    plan = sim.step(1)  # first release: the next gang is created at once
    assert created_pods(plan) == [pod_name(1, i) for i in range(4)]
    # partial again: released again, and now the next gang waits 10 s
    sim.schedule(0)
    sim.step(300)
    assert sim.st.attempt == 2 and sim.st.restarts == 2
    sim.gc()
    assert created_pods(sim.step(9)) == []
    assert created_pods(sim.step(1)) == [pod_name(2, i) for i in range(4)]


def test_partial_gang_with_forbidden_creates_released_with_quota_reason() -> None:
    sim = Sim({"numNodes": 4, "runPolicy": {"scheduleTimeoutSeconds": 120}})
    sim.refuse = {pod_name(0, 2), pod_name(0, 3)}  # the API server refuses them (403: quota)
    sim.step()
    sim.forbidden = [f"Pod {pod_name(0, 2)}: exceeded quota: gpus", f"Pod {pod_name(0, 3)}: exceeded quota"]
    sim.quota_exceeded = True
    sim.schedule(0, 1)
    plan = sim.step(1)
    assert sim.cond("Created").reason == "QuotaExceeded"  # type: ignore[union-attr]
    assert reasons(plan) == [("Warning", "QuotaExceeded")]
    plan = sim.step(119)
    assert reasons(plan) == [("Warning", "GangReleased")]
    assert deleted_pods(plan) == [pod_name(0, 0), pod_name(0, 1)]
    assert sim.st.last_failure.reason == "QuotaExceeded"  # type: ignore[union-attr]
    assert "QuotaExceeded" in plan.events[0].message and len(plan.events[0].message) <= 1024


def test_a_fully_scheduled_gang_is_never_released() -> None:
    sim = Sim({"numNodes": 2, "runPolicy": {"scheduleTimeoutSeconds": 60, "startupTimeoutSeconds": 6000}})
    sim.step()
    sim.schedule()
    for _ in range(3):
        plan = sim.step(100)
        assert plan.deletes == [] and sim.st.attempt == 0


def test_resolved_dataset_from_progress_written_once_and_bounded() -> None:
    sim = Sim({"numNodes": 2})
    sim.run_gang()
    ds = {"shards": 4, "documents": 200, "tokens": 9_000, "cacheKey": "ab12" * 8, "cacheHit": False}
    sim.progress = {"step": 1, "totalSteps": 10, "updatedAt": iso(sim.now), "resolved": {"dataset": ds}}
    plan = sim.step(1)
    assert plan.status is not None
    assert plan.status["resolved"]["dataset"] == ds
    assert sim.st.resolved.strategy is None  # the dataset alone sets no strategy
    # a later attempt hits the cache the first one wrote: the first report stays
    sim.progress = {
        "step": 2,
        "totalSteps": 10,
        "updatedAt": iso(sim.now + timedelta(seconds=5)),
        "resolved": {"strategy": "ddp", "dataset": {**ds, "cacheHit": True}},
    }
    sim.step(5)
    assert sim.st.resolved.dataset is not None and sim.st.resolved.dataset.cache_hit is False
    assert sim.st.resolved.strategy == "ddp"
    assert sim.step(5).is_empty()


@pytest.mark.parametrize(
    "dataset",
    [
        {"shards": 10**30, "documents": 1},
        {"shards": "4"},
        {"documents": 5},
        "four shards",
    ],
)
def test_unusable_resolved_dataset_reports_are_ignored(dataset: Any) -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    sim.progress = {"step": 3, "totalSteps": 10, "updatedAt": iso(sim.now), "resolved": {"dataset": dataset}}
    sim.step(1)
    assert sim.st.resolved.dataset is None


def test_resolved_dataset_cache_key_must_look_like_a_key() -> None:
    sim = Sim({"numNodes": 1})
    sim.run_gang()
    bad = {"shards": 1, "documents": 2, "tokens": 3, "cacheKey": "<script>", "cacheHit": "yes"}
    sim.progress = {"step": 3, "totalSteps": 10, "updatedAt": iso(sim.now), "resolved": {"dataset": bad}}
    sim.step(1)
    assert sim.st.resolved.dataset is not None
    assert (sim.st.resolved.dataset.cache_key, sim.st.resolved.dataset.cache_hit) == (None, None)
    assert sim.st.resolved.dataset.tokens == 3
