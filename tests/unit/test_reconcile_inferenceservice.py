"""InferenceService planner: model resolution, children via apply-when-changed, readiness, status, events.

`World` plays the cluster: it stores what the plan applies (bumping generations the way the API server
does), lets a test mark Deployments rolled out, writes the planned status back, and feeds the result into
the next reconcile.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tauon.api.inferenceservice import InferenceService
from tauon.api.names import ANN_SPEC_HASH
from tauon.reconcile.inferenceservice import (
    Observed,
    deployment_rollout,
    job_state,
    needs_apply,
    reconcile,
)
from tauon.reconcile.plan import Plan
from tauon.render.config import OperatorConfig
from tests.manifests import PVC_MINILM, finetunejob, inferenceservice

CFG = OperatorConfig()
T0 = datetime(2025, 1, 1, tzinfo=UTC)
NAME, NS, UID = "sentiment", "ml", "uid-1"
PRED, CAN = f"{NAME}-predictor", f"{NAME}-canary"
Manifest = dict[str, Any]


def isvc_body(**spec: Any) -> Manifest:
    return inferenceservice(
        NAME,
        namespace=NS,
        metadata={"uid": UID, "generation": 1},
        base={"model": {"source": PVC_MINILM}},
        **spec,
    )


def ftj(name: str, phase: str | None = None, storage: str | None = None, failed_msg: str = "") -> Manifest:
    conds: list[Manifest] = []
    if phase == "Succeeded":
        conds = [{"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "done"}]
    elif phase == "Failed":
        conds = [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": failed_msg}
        ]
    return {
        **finetunejob(name, namespace=NS, output={"storage": storage or f"pvc://models/{name}-ft"}),
        "status": {"phase": phase or "Running", "conditions": conds},
    }


class World:
    def __init__(self, body: Manifest, jobs: list[Manifest] | None = None, auto_ready: bool = False):
        self.body = body
        self.jobs = {j["metadata"]["name"]: j for j in jobs or []}
        self.sweeps: dict[str, Manifest] = {}  # FineTuneSweeps by name (tests/unit/test_isvc_sweep_ref.py)
        self.objects: dict[tuple[str, str], Manifest] = {}
        self.conflicts: list[str] = []
        self.refused: list[str] = []
        self.auto_ready = auto_ready
        self.now = T0
        self.cfg = CFG

    # -- cluster side --------------------------------------------------------------------------
    def dep(self, name: str) -> Manifest | None:
        return self.objects.get(("Deployment", name))

    def set_spec(self, **spec: Any) -> None:
        self.body["spec"].update(spec)
        self.body["metadata"]["generation"] += 1

    def roll_out(self, name: str, ready: int | None = None) -> None:
        d = self.objects[("Deployment", name)]
        n = int(d["spec"].get("replicas", 1))
        d["status"] = {
            "observedGeneration": d["metadata"]["generation"],
            "replicas": n,
            "updatedReplicas": n,
            "readyReplicas": n if ready is None else ready,
            "availableReplicas": n if ready is None else ready,
        }

    def _apply(self, child: Manifest) -> None:
        key = (child["kind"], child["metadata"]["name"])
        old = self.objects.get(key)
        new = copy.deepcopy(child)
        if old is None:
            new["metadata"]["generation"] = 1
        else:
            new["metadata"]["generation"] = old["metadata"]["generation"] + (old["spec"] != new["spec"])
            new["status"] = old.get("status", {})
        if child["kind"] == "Deployment" and "replicas" not in child["spec"]:
            # the HPA owns replicas: the API server keeps the current value (or defaults to 1)
            new["spec"]["replicas"] = old["spec"]["replicas"] if old else 1
            if old is not None and old["spec"] == new["spec"]:
                new["metadata"]["generation"] = old["metadata"]["generation"]
        self.objects[key] = new
        if self.auto_ready and child["kind"] == "Deployment":
            self.roll_out(child["metadata"]["name"])

    def observed(self) -> Observed:
        return Observed(
            fine_tune_jobs={k: copy.deepcopy(v) for k, v in self.jobs.items()},
            fine_tune_sweeps={k: copy.deepcopy(v) for k, v in self.sweeps.items()},
            deployments={n: copy.deepcopy(o) for (k, n), o in self.objects.items() if k == "Deployment"},
            service=copy.deepcopy(self.objects.get(("Service", NAME))),
            hpa=copy.deepcopy(self.objects.get(("HorizontalPodAutoscaler", NAME))),
            conflicts=list(self.conflicts),
            refused=list(self.refused),
        )

    # -- operator side -------------------------------------------------------------------------
    def isvc(self) -> InferenceService:
        return InferenceService.model_validate(self.body)

    def step(self, advance: float = 1.0) -> Plan:
        self.now += timedelta(seconds=advance)
        plan = reconcile(self.isvc(), self.observed(), self.now, self.cfg)
        for kind, name in plan.deletes:
            self.objects.pop((kind, name), None)
        for child in plan.applies:
            self._apply(child)
        if plan.status is not None:
            self.body["status"] = plan.status
        return plan

    def converge(self, limit: int = 6) -> list[Plan]:
        plans = []
        for _ in range(limit):
            plan = self.step()
            plans.append(plan)
            if plan.is_empty():
                return plans
        raise AssertionError(f"no convergence in {limit} steps: {plans[-1]}")

    # -- reading status ------------------------------------------------------------------------
    @property
    def status(self) -> Manifest:
        return dict(self.body.get("status") or {})

    def cond(self, ctype: str) -> Manifest | None:
        return next((c for c in self.status.get("conditions", []) if c["type"] == ctype), None)

    def cs(self, ctype: str) -> tuple[str, str] | None:
        c = self.cond(ctype)
        return (c["status"], c["reason"]) if c else None


def events(plans: list[Plan] | Plan) -> list[tuple[str, str]]:
    if isinstance(plans, Plan):
        plans = [plans]
    return [(e.type, e.reason) for p in plans for e in p.events]


def applied(plan: Plan) -> list[str]:
    return [f"{c['kind']}/{c['metadata']['name']}" for c in plan.applies]


# -- direct source -----------------------------------------------------------------------------------


def test_direct_source_first_reconcile() -> None:
    w = World(isvc_body())
    plan = w.step()
    assert applied(plan) == ["Service/sentiment", "Deployment/sentiment-predictor"]
    assert plan.deletes == []
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert w.cs("PredictorReady") == ("False", "Progressing")
    assert w.cs("Ready") == ("False", "Progressing")
    assert "CanaryReady" not in {c["type"] for c in w.status["conditions"]}
    assert w.status["phase"] == "NotReady"
    assert w.status["model"] == {"source": "pvc://models/minilm"}
    assert w.status["url"] == "http://sentiment.ml.svc.cluster.local"
    assert w.status["selector"] == "tauon.dev/inference-service=sentiment"
    assert w.status["observedGeneration"] == 1
    assert events(plan) == [("Normal", "ModelResolved")]
    for c in w.status["conditions"]:
        assert c["observedGeneration"] == 1


def test_ready_after_rollout_then_empty_plan() -> None:
    w = World(isvc_body(replicas=2))
    w.step()
    assert w.step().applies == []  # applied objects carry the same hash: nothing to re-apply
    w.roll_out(PRED)
    plan = w.step()
    assert w.cs("PredictorReady") == ("True", "MinimumReplicasAvailable")
    assert w.cs("Ready") == ("True", "Serving")
    assert w.status["phase"] == "Ready"
    assert (w.status["replicas"], w.status["readyReplicas"]) == (2, 2)
    assert events(plan) == [("Normal", "Ready")]
    # converged: zero writes, no events, however often it runs
    for _ in range(3):
        assert w.step(advance=60).is_empty()


def test_custom_cluster_domain() -> None:
    w = World(isvc_body())
    w.cfg = OperatorConfig(cluster_domain="corp.internal")
    w.step()
    assert w.status["url"] == "http://sentiment.ml.svc.corp.internal"


def test_last_transition_time_moves_only_on_flips() -> None:
    w = World(isvc_body())
    w.step()
    t_model = w.cond("ModelReady")["lastTransitionTime"]  # type: ignore[index]
    w.step(advance=30)
    w.roll_out(PRED)
    w.step(advance=30)
    assert w.cond("ModelReady")["lastTransitionTime"] == t_model  # type: ignore[index]
    assert w.cond("Ready")["lastTransitionTime"] != t_model  # type: ignore[index]


# -- fineTuneJobRef ---------------------------------------------------------------------------------------


REF = {"fineTuneJobRef": {"name": "ft"}, "task": "sequence-classification"}


def test_waiting_for_missing_job() -> None:
    w = World(isvc_body(model=REF))
    plan = w.step()
    assert plan.applies == [] and plan.deletes == []
    assert w.cs("ModelReady") == ("False", "WaitingForFineTuneJob")
    assert "does not exist" in w.cond("ModelReady")["message"]  # type: ignore[index]
    assert w.cs("PredictorReady") == ("False", "WaitingForModel")
    assert w.cs("Ready") == ("False", "WaitingForFineTuneJob")
    assert w.status["phase"] == "Pending"
    assert events(plan) == []
    assert w.step().is_empty()


@pytest.mark.parametrize("phase", ["Pending", "Running", "Restarting", "Suspended"])
def test_waiting_for_unfinished_job(phase: str) -> None:
    w = World(isvc_body(model=REF), [ftj("ft", phase)])
    plan = w.step()
    assert plan.applies == []
    assert w.cs("ModelReady") == ("False", "WaitingForFineTuneJob")
    assert phase in w.cond("ModelReady")["message"]  # type: ignore[index]
    assert w.status["phase"] == "Pending"
    assert "source" not in w.status.get("model", {})


def test_job_failed() -> None:
    w = World(isvc_body(model=REF), [ftj("ft", "Running")])
    w.step()
    w.jobs["ft"] = ftj("ft", "Failed", failed_msg="pod ft-r3-node-0 failed")
    plan = w.step()
    assert plan.applies == []
    assert w.cs("ModelReady") == ("False", "FineTuneJobFailed")
    assert "BackoffLimitExceeded" in w.cond("ModelReady")["message"]  # type: ignore[index]
    assert w.status["phase"] == "Failed"
    assert events(plan) == [("Warning", "FineTuneJobFailed")]
    assert w.step().is_empty()  # the event is sent once


def test_job_succeeded_deployment_appears_and_becomes_ready() -> None:
    w = World(isvc_body(model=REF), [ftj("ft", "Running")])
    w.step()
    w.jobs["ft"] = ftj("ft", "Succeeded", storage="pvc://models/ft-out/")
    plan = w.step()
    assert applied(plan) == ["Service/sentiment", "Deployment/sentiment-predictor"]
    assert w.status["model"] == {
        "source": "pvc://models/ft-out/model",
        "fineTuneJob": "ft",
        "task": "sequence-classification",
    }
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert events(plan) == [("Normal", "ModelResolved")]
    dep = w.dep(PRED)
    assert dep is not None
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--model", "/mnt/tauon/pvc/models/ft-out/model"]
    assert w.status["phase"] == "NotReady"
    w.roll_out(PRED)
    plan = w.step()
    assert w.status["phase"] == "Ready"
    assert events(plan) == [("Normal", "Ready")]
    assert w.step().is_empty()


def test_model_kept_after_job_deletion() -> None:
    w = World(isvc_body(model=REF), [ftj("ft", "Succeeded")], auto_ready=True)
    w.converge()
    assert w.status["phase"] == "Ready"
    del w.jobs["ft"]
    plans = w.converge()
    assert all(p.applies == [] and p.deletes == [] for p in plans)
    assert w.status["model"] == {
        "source": "pvc://models/ft-ft/model",
        "fineTuneJob": "ft",
        "task": "sequence-classification",
    }
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert w.status["phase"] == "Ready"
    assert events(plans) == []


def test_new_ref_keeps_old_model_serving_until_resolved() -> None:
    w = World(isvc_body(model=REF), [ftj("ft", "Succeeded")], auto_ready=True)
    w.converge()
    w.jobs["ft2"] = ftj("ft2", "Running")
    w.set_spec(model={"fineTuneJobRef": {"name": "ft2"}}, replicas=2)
    plan = w.step()
    # still serving ft's model, but spec changes such as replicas are applied
    assert applied(plan) == ["Deployment/sentiment-predictor"]
    dep = w.dep(PRED)
    assert dep is not None and dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][1] == "/mnt/tauon/pvc/models/ft-ft/model"
    assert w.status["model"] == {
        "source": "pvc://models/ft-ft/model",
        "fineTuneJob": "ft",
        "task": "sequence-classification",
    }
    assert w.cs("ModelReady") == ("False", "WaitingForFineTuneJob")
    assert w.status["phase"] == "Pending"
    w.jobs["ft2"] = ftj("ft2", "Succeeded")
    plans = w.converge()
    assert w.status["model"] == {"source": "pvc://models/ft2-ft/model", "fineTuneJob": "ft2"}
    assert w.status["phase"] == "Ready"
    assert ("Normal", "ModelResolved") in events(plans)


def test_switching_direct_source_emits_model_resolved() -> None:
    w = World(isvc_body(), auto_ready=True)
    w.converge()
    w.set_spec(model={"source": "hf://org/other"})
    plans = w.converge()
    assert events(plans)[0] == ("Normal", "ModelResolved")
    assert w.status["model"] == {"source": "hf://org/other"}
    assert w.status["phase"] == "Ready"


# -- InvalidSpec -----------------------------------------------------------------------------------------


def test_file_source_without_host_paths_fails() -> None:
    w = World(isvc_body(model={"source": "file:///data/model"}))
    plan = w.step()
    assert plan.applies == []
    assert w.cs("ModelReady") == ("False", "InvalidSpec")
    assert "--allow-host-paths" in w.cond("ModelReady")["message"]  # type: ignore[index]
    assert w.status["phase"] == "Failed"
    assert events(plan) == [("Warning", "InvalidSpec")]
    assert w.step().is_empty()


def test_file_source_with_host_paths() -> None:
    w = World(isvc_body(model={"source": "file:///data/model"}), auto_ready=True)
    w.cfg = OperatorConfig(allow_host_paths=True)
    w.converge()
    assert w.status["phase"] == "Ready"


# -- replicas ----------------------------------------------------------------------------------------------


def test_kubectl_scale_changes_deployment_replicas() -> None:
    w = World(isvc_body(replicas=1), auto_ready=False)
    w.step()
    w.roll_out(PRED)
    w.converge()
    assert w.status["phase"] == "Ready"
    w.set_spec(replicas=3)  # what `kubectl scale tis/sentiment --replicas=3` does
    plan = w.step()
    assert applied(plan) == ["Deployment/sentiment-predictor"]
    assert plan.applies[0]["spec"]["replicas"] == 3
    assert w.cs("PredictorReady") == ("False", "Progressing")
    assert w.status["phase"] == "NotReady"
    assert w.status["observedGeneration"] == 2
    w.roll_out(PRED, ready=2)
    w.step()
    assert w.cs("PredictorReady") == ("False", "Progressing")
    assert "2/3" in w.cond("PredictorReady")["message"]  # type: ignore[index]
    w.roll_out(PRED)
    w.step()
    assert w.status["phase"] == "Ready"
    assert (w.status["replicas"], w.status["readyReplicas"]) == (3, 3)
    assert w.step().is_empty()


def test_scale_to_zero() -> None:
    w = World(isvc_body(replicas=0), auto_ready=True)
    w.converge()
    dep = w.dep(PRED)
    assert dep is not None and dep["spec"]["replicas"] == 0
    assert w.cs("PredictorReady") == ("True", "MinimumReplicasAvailable")
    assert w.status["replicas"] == 0


def test_deployment_scaled_behind_our_back_is_restored() -> None:
    w = World(isvc_body(replicas=2), auto_ready=True)
    w.converge()
    w.objects[("Deployment", PRED)]["spec"]["replicas"] = 5
    plan = w.step()
    assert applied(plan) == ["Deployment/sentiment-predictor"]
    assert w.objects[("Deployment", PRED)]["spec"]["replicas"] == 2


def test_deployment_without_hash_is_reapplied() -> None:
    w = World(isvc_body(), auto_ready=True)
    w.converge()
    del w.objects[("Deployment", PRED)]["metadata"]["annotations"][ANN_SPEC_HASH]
    assert applied(w.step()) == ["Deployment/sentiment-predictor"]


# -- autoscaling -------------------------------------------------------------------------------------------


def test_autoscaling_hpa_and_no_replicas() -> None:
    w = World(isvc_body(replicas=7, autoscaling={"minReplicas": 2, "maxReplicas": 5}), auto_ready=True)
    plan = w.step()
    assert applied(plan) == [
        "Service/sentiment",
        "Deployment/sentiment-predictor",
        "HorizontalPodAutoscaler/sentiment",
    ]
    assert "replicas" not in plan.applies[1]["spec"]
    hpa = plan.applies[2]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["scaleTargetRef"]["name"] == PRED
    w.converge()
    # the HPA scales the Deployment: not a reason to re-apply
    w.objects[("Deployment", PRED)]["spec"]["replicas"] = 4
    w.roll_out(PRED)
    w.step()
    assert w.step().is_empty()
    assert w.status["replicas"] == 4
    assert w.status["phase"] == "Ready"


def test_autoscaling_removed_deletes_hpa() -> None:
    w = World(isvc_body(autoscaling={"minReplicas": 2, "maxReplicas": 5}), auto_ready=True)
    w.converge()
    w.set_spec(autoscaling=None, replicas=3)
    plan = w.step()
    assert plan.deletes == [("HorizontalPodAutoscaler", NAME)]
    assert applied(plan) == ["Deployment/sentiment-predictor"]
    assert plan.applies[0]["spec"]["replicas"] == 3
    w.converge()
    assert ("HorizontalPodAutoscaler", NAME) not in w.objects


# -- canary -----------------------------------------------------------------------------------------------


def test_canary_second_deployment_with_share() -> None:
    canary = {"model": {"source": "pvc://models/v2"}, "trafficPercent": 10}
    w = World(isvc_body(replicas=10, canary=canary))
    plan = w.step()
    assert applied(plan) == [
        "Service/sentiment",
        "Deployment/sentiment-predictor",
        "Deployment/sentiment-canary",
    ]
    assert (plan.applies[1]["spec"]["replicas"], plan.applies[2]["spec"]["replicas"]) == (9, 1)
    assert w.status["canary"] == {"replicas": 1, "effectiveTrafficPercent": 10}
    assert w.cs("CanaryReady") == ("False", "Progressing")
    w.roll_out(PRED)
    w.step()
    assert w.cs("Ready") == ("False", "Progressing")  # the canary is not ready yet
    w.roll_out(CAN)
    plan = w.step()
    assert w.cs("CanaryReady") == ("True", "MinimumReplicasAvailable")
    assert w.status["phase"] == "Ready"
    assert (w.status["replicas"], w.status["readyReplicas"]) == (10, 10)
    assert events(plan) == [("Normal", "Ready")]
    assert w.step().is_empty()


def test_canary_share_reported_for_small_totals() -> None:
    w = World(isvc_body(replicas=3, canary={"model": {"source": "hf://o/v2"}, "trafficPercent": 10}))
    w.step()
    assert w.status["canary"] == {"replicas": 1, "effectiveTrafficPercent": 33}


def test_canary_waiting_for_its_job_predictor_takes_all() -> None:
    canary = {"model": {"fineTuneJobRef": {"name": "v2"}}, "trafficPercent": 50}
    w = World(isvc_body(replicas=4, canary=canary), [ftj("v2", "Running")], auto_ready=True)
    plans = w.converge()
    assert w.dep(CAN) is None
    dep = w.dep(PRED)
    assert dep is not None and dep["spec"]["replicas"] == 4
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert w.cs("CanaryReady") == ("False", "WaitingForFineTuneJob")
    assert w.cs("Ready") == ("False", "WaitingForFineTuneJob")
    assert w.status["phase"] == "NotReady"
    assert w.status["canary"] == {"replicas": 0, "effectiveTrafficPercent": 0}
    assert events(plans) == [("Normal", "ModelResolved")]
    w.jobs["v2"] = ftj("v2", "Succeeded")
    w.converge()
    assert (w.dep(PRED)["spec"]["replicas"], w.dep(CAN)["spec"]["replicas"]) == (2, 2)  # type: ignore[index]
    assert w.status["canary"] == {"replicas": 2, "effectiveTrafficPercent": 50}
    assert w.status["phase"] == "Ready"
    # the canary's job is deleted: its model is remembered on the canary Deployment
    del w.jobs["v2"]
    plans = w.converge()
    assert all(p.applies == [] and p.deletes == [] for p in plans)
    assert w.cs("CanaryReady") == ("True", "MinimumReplicasAvailable")
    assert w.status["phase"] == "Ready"


def test_canary_job_failed_keeps_predictor_serving() -> None:
    canary = {"model": {"fineTuneJobRef": {"name": "v2"}}, "trafficPercent": 10}
    w = World(isvc_body(replicas=2, canary=canary), [ftj("v2", "Failed")], auto_ready=True)
    plans = w.converge()
    assert w.dep(CAN) is None
    assert w.cs("CanaryReady") == ("False", "FineTuneJobFailed")
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert w.status["phase"] == "NotReady"
    assert ("Warning", "FineTuneJobFailed") in events(plans)
    assert events(plans).count(("Warning", "FineTuneJobFailed")) == 1


def test_canary_removed_deletes_deployment_and_condition() -> None:
    canary = {"model": {"source": "hf://o/v2"}, "trafficPercent": 50}
    w = World(isvc_body(replicas=2, canary=canary), auto_ready=True)
    w.converge()
    assert w.dep(CAN) is not None
    w.set_spec(canary=None)
    plan = w.step()
    assert plan.deletes == [("Deployment", CAN)]
    assert applied(plan) == ["Deployment/sentiment-predictor"]
    assert plan.applies[0]["spec"]["replicas"] == 2
    w.converge()
    assert "CanaryReady" not in {c["type"] for c in w.status["conditions"]}
    assert w.status["canary"] == {"replicas": 0, "effectiveTrafficPercent": 0}
    assert w.status["phase"] == "Ready"


def test_canary_with_autoscaling() -> None:
    canary = {"model": {"source": "hf://o/v2"}, "trafficPercent": 10}
    w = World(isvc_body(autoscaling={"minReplicas": 2, "maxReplicas": 10}, canary=canary), auto_ready=True)
    plan = w.step()
    by = {f"{c['kind']}/{c['metadata']['name']}": c for c in plan.applies}
    assert "replicas" not in by["Deployment/sentiment-predictor"]["spec"]
    assert by["Deployment/sentiment-canary"]["spec"]["replicas"] == 1
    assert by["HorizontalPodAutoscaler/sentiment"]["spec"]["minReplicas"] == 1
    w.converge()
    assert w.status["canary"] == {"replicas": 1, "effectiveTrafficPercent": 50}
    # the HPA scales the predictor to 9: the canary's real share drops
    w.objects[("Deployment", PRED)]["spec"]["replicas"] = 9
    w.roll_out(PRED)
    w.step()
    assert w.status["canary"] == {"replicas": 1, "effectiveTrafficPercent": 10}
    assert w.status["replicas"] == 10
    assert w.step().is_empty()


def test_canary_invalid_source() -> None:
    canary = {"model": {"source": "file:///v2"}, "trafficPercent": 10}
    w = World(isvc_body(replicas=2, canary=canary), auto_ready=True)
    plans = w.converge()
    assert w.dep(CAN) is None
    assert w.cs("CanaryReady") == ("False", "InvalidSpec")
    assert w.status["phase"] == "NotReady"
    assert ("Warning", "InvalidSpec") in events(plans)


# -- conflicts -------------------------------------------------------------------------------------------


def test_conflict_blocks_all_writes() -> None:
    w = World(isvc_body())
    w.conflicts = [f"Deployment/{PRED}"]
    plan = w.step()
    assert plan.applies == [] and plan.deletes == []
    assert w.cs("Ready") == ("False", "ResourceConflict")
    assert PRED in w.cond("Ready")["message"]  # type: ignore[index]
    assert w.cs("PredictorReady") == ("False", "ResourceConflict")
    assert events(plan) == [("Normal", "ModelResolved"), ("Warning", "ResourceConflict")]
    assert w.step().is_empty()
    w.conflicts = []
    plan = w.step()
    assert applied(plan) == ["Service/sentiment", "Deployment/sentiment-predictor"]
    assert w.cs("Ready") == ("False", "Progressing")


def test_conflict_on_service_keeps_children_untouched() -> None:
    w = World(isvc_body(), auto_ready=True)
    w.converge()
    w.conflicts = [NAME]
    w.set_spec(replicas=3)
    plan = w.step()
    assert plan.applies == []
    assert w.cs("Ready") == ("False", "ResourceConflict")
    assert w.status["phase"] == "NotReady"


# -- helpers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, ("Pending", "")),
        ({"phase": "Running"}, ("Running", "")),
        ({"phase": "Succeeded"}, ("Succeeded", "")),
        (
            {
                "phase": "Running",
                "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}],
            },
            ("Succeeded", "Succeeded"),
        ),
        (
            {
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "PermanentError", "message": "bad"}
                ]
            },
            ("Failed", "PermanentError: bad"),
        ),
        ({"phase": "Running", "conditions": [{"type": "Failed", "status": "False"}]}, ("Running", "")),
    ],
)
def test_job_state(status: Manifest, expected: tuple[str, str]) -> None:
    assert job_state({"status": status}) == expected


def _dep(gen: int, spec_replicas: int, **st: int) -> Manifest:
    return {"metadata": {"generation": gen}, "spec": {"replicas": spec_replicas}, "status": st}


@pytest.mark.parametrize(
    ("dep", "updating", "expected"),
    [
        (None, False, (False, "Progressing")),
        (
            _dep(1, 2, observedGeneration=1, replicas=2, readyReplicas=2, updatedReplicas=2),
            True,
            (False, "Progressing"),
        ),
        (
            _dep(1, 2, observedGeneration=1, replicas=2, readyReplicas=2, updatedReplicas=2),
            False,
            (True, "MinimumReplicasAvailable"),
        ),
        (
            _dep(2, 2, observedGeneration=1, replicas=2, readyReplicas=2, updatedReplicas=2),
            False,
            (False, "Progressing"),
        ),
        (
            _dep(1, 2, observedGeneration=1, replicas=2, readyReplicas=1, updatedReplicas=2),
            False,
            (False, "Progressing"),
        ),
        # rolling update: a surge pod of the new version, old pods still counted
        (
            _dep(2, 2, observedGeneration=2, replicas=3, readyReplicas=2, updatedReplicas=1),
            False,
            (False, "Progressing"),
        ),
        (_dep(1, 0, observedGeneration=1), False, (True, "MinimumReplicasAvailable")),
    ],
)
def test_deployment_rollout(dep: Manifest | None, updating: bool, expected: tuple[bool, str]) -> None:
    r = deployment_rollout("d", dep, updating)
    assert (r.ready, r.reason) == expected


def test_deployment_progress_deadline_exceeded() -> None:
    dep = _dep(1, 1, observedGeneration=1, replicas=1, readyReplicas=0, updatedReplicas=1)
    dep["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": "timed out",
        }
    ]
    r = deployment_rollout("d", dep, False)
    assert (r.ready, r.reason) == (False, "ProgressDeadlineExceeded")
    assert "timed out" in r.message


def test_needs_apply() -> None:
    desired = {"metadata": {"annotations": {ANN_SPEC_HASH: "h1"}}, "spec": {"replicas": 2}}
    assert needs_apply(desired, None)
    assert not needs_apply(
        desired, {"metadata": {"annotations": {ANN_SPEC_HASH: "h1"}}, "spec": {"replicas": 2}}
    )
    assert needs_apply(desired, {"metadata": {"annotations": {ANN_SPEC_HASH: "h0"}}, "spec": {"replicas": 2}})
    assert needs_apply(desired, {"metadata": {"annotations": {ANN_SPEC_HASH: "h1"}}, "spec": {"replicas": 3}})
    hpa_owned = {"metadata": {"annotations": {ANN_SPEC_HASH: "h1"}}, "spec": {}}
    assert not needs_apply(
        hpa_owned, {"metadata": {"annotations": {ANN_SPEC_HASH: "h1"}}, "spec": {"replicas": 7}}
    )


def test_same_inputs_same_plan() -> None:
    w = World(isvc_body(replicas=3, canary={"model": {"source": "hf://o/v2"}, "trafficPercent": 30}))
    a = reconcile(w.isvc(), w.observed(), T0, CFG)
    b = reconcile(w.isvc(), w.observed(), T0, CFG)
    assert a == b


# -- API server refusals, shared context (issue 13, issue 10) -------------------------------------------


def test_refused_child_fails_invalid_spec_with_one_event() -> None:
    w = World(isvc_body())
    w.step()
    w.refused = [
        f"Deployment sentiment-predictor: spec.template.metadata.labels: Invalid value {i}" for i in range(40)
    ]
    plan = w.step()
    assert w.status["phase"] == "Failed"
    assert w.cs("ModelReady") == ("False", "InvalidSpec")
    assert w.cs("Ready") == ("False", "InvalidSpec")
    assert events(plan) == [("Warning", "InvalidSpec")]
    assert plan.applies == [], "a refused spec is not re-applied every pass"
    assert "and 39 more refused" in w.cond("ModelReady")["message"]  # type: ignore[index]
    assert len(w.cond("ModelReady")["message"].encode()) <= 1024  # type: ignore[index]
    for _ in range(3):
        assert w.step(advance=5).is_empty()


def test_refusal_cleared_by_a_new_spec() -> None:
    w = World(isvc_body())
    w.step()
    w.refused = ["Deployment sentiment-predictor: bad"]
    w.step()
    w.refused = []  # the handler layer drops refusals of an older generation
    w.set_spec(replicas=2)
    plan = w.step()
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert "Deployment/sentiment-predictor" in applied(plan)


def test_both_planners_share_one_context() -> None:
    from tauon.reconcile import finetunejob as F
    from tauon.reconcile import inferenceservice as I
    from tauon.reconcile.context import Context

    assert F.Ctx.__origin__ is Context and I.Ctx.__origin__ is Context  # type: ignore[attr-defined]


# -- runtime and OpenAI status (the served task reaches the renderer and the status) ---------------------


def llm_job(name: str = "ft", phase: str = "Succeeded") -> Manifest:
    job = ftj(name, phase)
    job["spec"]["model"] = {"source": "hf://org/tiny-llama", "task": "causal-lm"}
    return job


LLM_REF = {"fineTuneJobRef": {"name": "ft"}}  # no task: the job's is served


def test_job_task_reaches_renderer_and_status() -> None:
    w = World(isvc_body(model=LLM_REF), [llm_job()], auto_ready=True)
    plans = w.converge()
    assert w.status["model"] == {
        "source": "pvc://models/ft-ft/model",
        "fineTuneJob": "ft",
        "task": "causal-lm",
    }
    args = w.dep(PRED)["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[index]
    assert args[args.index("--task") + 1] == "causal-lm"
    assert w.status["resolved"] == {"runtime": "tauon"}  # no GPUs: auto -> tauon
    assert w.status["openai"] == {"baseURL": "http://sentiment.ml.svc.cluster.local/v1", "model": NAME}
    assert plans[-1].is_empty()
    assert w.step(advance=60).is_empty()  # converged: zero writes


def test_task_kept_after_job_deletion() -> None:
    w = World(isvc_body(model=LLM_REF), [llm_job()], auto_ready=True)
    w.converge()
    del w.jobs["ft"]
    plans = w.converge()
    assert all(p.applies == [] and p.events == [] for p in plans)
    assert w.status["model"]["task"] == "causal-lm"
    assert w.status["openai"]["model"] == NAME


def test_gpus_and_causal_lm_resolve_to_vllm() -> None:
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    w = World(isvc_body(model=LLM_REF, resources=gpu), [llm_job()], auto_ready=True)
    w.converge()
    assert w.status["resolved"] == {"runtime": "vllm"}
    assert w.status["openai"]["baseURL"].endswith("/v1")


def test_gpus_and_causal_lm_in_s3_resolve_to_tauon_which_downloads_it() -> None:
    """vLLM cannot read s3:// models: auto picks the tauon runtime (status and Deployment agree)."""
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    job = llm_job()
    job["spec"]["output"]["storage"] = "s3://models/ft"
    w = World(isvc_body(model=LLM_REF, resources=gpu), [job], auto_ready=True)
    w.converge()
    assert w.status["model"]["source"] == "s3://models/ft/model"
    assert w.status["resolved"] == {"runtime": "tauon"}
    dep = w.dep(PRED)
    assert dep is not None and dep["metadata"]["annotations"]["tauon.dev/runtime"] == "tauon"
    assert w.status["openai"]["baseURL"].endswith("/v1")


def test_vllm_without_a_gpu_fails_with_invalid_spec_instead_of_crash_looping() -> None:
    w = World(isvc_body(model={"source": "pvc://models/llm", "task": "causal-lm"}, runtime="vllm"))
    w.converge()
    assert w.cs("ModelReady") == ("False", "InvalidSpec")
    assert "request nvidia.com/gpu" in (w.cond("ModelReady") or {})["message"]
    assert w.status["phase"] == "Failed" and w.dep(PRED) is None


def test_classifier_has_no_openai_status() -> None:
    w = World(isvc_body(model={"source": "pvc://models/minilm", "task": "sequence-classification"}))
    w.converge()
    assert w.status["resolved"] == {"runtime": "tauon"}
    assert "openai" not in w.status or w.status["openai"] == {}
    assert w.status["model"]["task"] == "sequence-classification"


def test_explicit_vllm_sets_openai_without_a_known_task() -> None:
    w = World(isvc_body(runtime="vllm", resources={"limits": {"nvidia.com/gpu": "1"}}))
    w.converge()
    assert w.status["resolved"] == {"runtime": "vllm"}
    assert w.status["openai"] == {"baseURL": "http://sentiment.ml.svc.cluster.local/v1", "model": NAME}


def test_openai_cleared_when_task_changes() -> None:
    w = World(isvc_body(model={"source": "pvc://models/llm", "task": "causal-lm"}))
    w.converge()
    assert w.status["openai"]["model"] == NAME
    w.set_spec(model={"source": "pvc://models/minilm", "task": "sequence-classification"})
    w.converge()
    assert not (w.status.get("openai") or {})


def test_canary_task_remembered_on_its_deployment() -> None:
    canary = {"model": {"fineTuneJobRef": {"name": "ft2"}}, "trafficPercent": 50}
    w = World(
        isvc_body(model=LLM_REF, replicas=2, canary=canary), [llm_job(), llm_job("ft2")], auto_ready=True
    )
    w.converge()
    can = w.dep(CAN)
    assert can is not None
    assert can["metadata"]["annotations"]["tauon.dev/model-task"] == "causal-lm"
    del w.jobs["ft2"]
    plans = w.converge()
    assert all(p.applies == [] for p in plans)  # the remembered location (with its task) renders the same
