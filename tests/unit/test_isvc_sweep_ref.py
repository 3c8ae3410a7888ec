"""InferenceService `spec.model.fineTuneSweepRef`: the API (exactly one of fineTuneJobRef, fineTuneSweepRef
and source, in pydantic and in CEL), the pure planner (waits for the sweep, serves its best trial's model,
fails with it) and the handler's sweep references. The planner runs in the `World` of
test_reconcile_inferenceservice.py, which plays the cluster."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tauon.api.crds import inferenceservice_crd
from tauon.api.inferenceservice import EXACTLY_ONE_MODEL, InferenceService
from tauon.api.names import ANN_FINE_TUNE_JOB, ANN_FINE_TUNE_SWEEP, ANN_MODEL_SOURCE, ANN_MODEL_TASK
from tauon.handlers import indexes as ix
from tauon.handlers import inferenceservice as handler
from tauon.handlers.runtime import RT
from tauon.reconcile.inferenceservice import resolve_sweep, sweep_best
from tauon.render.inferenceservice import ModelLocation, location_from_annotations
from tests.manifests import PVC_SPEC, manifest
from tests.unit.test_reconcile_inferenceservice import CAN, NS, PRED, World, events, isvc_body

Manifest = dict[str, Any]
SWEEP_REF = {"fineTuneSweepRef": {"name": "sw"}}
BEST_MODEL = "pvc://results/sentiment-ft/sw-t2/model"


def sweep(
    name: str = "sw",
    phase: str = "Running",
    best: Manifest | None = None,
    task: str = "sequence-classification",
    failed_msg: str = "",
) -> Manifest:
    """A FineTuneSweep body as the sweep controller leaves it: conditions, phase and status.best."""
    conds: list[Manifest] = []
    if phase == "Succeeded":
        conds = [{"type": "Succeeded", "status": "True", "reason": "AllTrialsFinished", "message": "done"}]
    elif phase == "Failed":
        conds = [{"type": "Failed", "status": "True", "reason": "NoSuccessfulTrial", "message": failed_msg}]
    template = {"spec": {**PVC_SPEC, "model": {**PVC_SPEC["model"], "task": task}}}
    body = manifest(
        "FineTuneSweep",
        name,
        namespace=NS,
        template=template,
        parameters=[{"name": "learningRate", "type": "categorical", "values": [1e-4, 3e-4, 1e-3]}],
        objective={"metric": "evalAccuracy", "goal": "maximize"},
    )
    body["status"] = {"phase": phase, "conditions": conds}
    if best is not None:
        body["status"]["best"] = best
    return body


def best(trial: str = "sw-t2", model: str | None = BEST_MODEL, objective: float = 0.9) -> Manifest:
    out: Manifest = {"trial": trial, "parameters": {"learningRate": 3e-4}, "objective": objective}
    if model is not None:
        out["model"] = model
    return out


def world(model: Manifest | None = None, **spec: Any) -> World:
    return World(isvc_body(model=model or SWEEP_REF, **spec))


def message(w: World, ctype: str) -> str:
    c = w.cond(ctype)
    assert c is not None, ctype
    return str(c["message"])


# -- API ---------------------------------------------------------------------------------------------------


def test_a_sweep_ref_alone_is_a_valid_model() -> None:
    svc = InferenceService.model_validate(isvc_body(model=SWEEP_REF))
    assert svc.spec.model.fine_tune_sweep_ref is not None
    assert svc.spec.model.fine_tune_sweep_ref.name == "sw"
    assert svc.spec.model.fine_tune_job_ref is None and svc.spec.model.source is None


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"task": "causal-lm"},
        {**SWEEP_REF, "fineTuneJobRef": {"name": "ft"}},
        {**SWEEP_REF, "source": "hf://org/m"},
        {"fineTuneJobRef": {"name": "ft"}, "source": "hf://org/m"},
    ],
)
def test_exactly_one_of_job_ref_sweep_ref_and_source(model: Manifest) -> None:
    with pytest.raises(ValidationError, match="exactly one of model.fineTuneJobRef, model.fineTuneSweepRef"):
        InferenceService.model_validate(isvc_body(model=model))


def test_the_canary_model_takes_a_sweep_ref_and_the_same_rule() -> None:
    svc = InferenceService.model_validate(isvc_body(canary={"model": SWEEP_REF, "trafficPercent": 10}))
    assert svc.spec.canary is not None and svc.spec.canary.model.fine_tune_sweep_ref is not None
    with pytest.raises(ValidationError) as e:
        InferenceService.model_validate(
            isvc_body(canary={"model": {**SWEEP_REF, "source": "hf://o/m"}, "trafficPercent": 10})
        )
    assert e.value.errors()[0]["loc"][:3] == ("spec", "canary", "model")


def _schema(path: list[str]) -> Manifest:
    node: Manifest = inferenceservice_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for key in path:
        node = node["properties"][key]
    return node


@pytest.mark.parametrize("path", [["spec", "model"], ["spec", "canary", "model"]])
def test_crd_has_the_field_and_the_cel_rule(path: list[str]) -> None:
    node = _schema(path)
    assert "A FineTuneSweep" in node["properties"]["fineTuneSweepRef"]["description"]
    assert node["properties"]["fineTuneSweepRef"]["required"] == ["name"]
    rules = {v["message"]: v["rule"] for v in node["x-kubernetes-validations"]}
    rule = rules[EXACTLY_ONE_MODEL]
    for f in ("fineTuneJobRef", "fineTuneSweepRef", "source"):
        assert f"has(self.{f})" in rule
    assert rule.endswith("== 1")


# -- planner: waiting, failing, resolving ----------------------------------------------------------------


def test_waits_for_a_missing_sweep() -> None:
    w = world()
    plan = w.step()
    assert plan.applies == [] and plan.deletes == [] and events(plan) == []
    assert w.cs("ModelReady") == ("False", "WaitingForFineTuneSweep")
    assert message(w, "ModelReady") == "FineTuneSweep sw does not exist yet; waiting for it"
    assert w.cs("PredictorReady") == ("False", "WaitingForModel")
    assert w.cs("Ready") == ("False", "WaitingForFineTuneSweep")
    assert w.status["phase"] == "Pending"
    assert w.step().is_empty()


@pytest.mark.parametrize("phase", ["Pending", "Running"])
def test_waits_while_the_sweep_runs_even_with_a_best_so_far(phase: str) -> None:
    w = world()
    w.sweeps["sw"] = sweep(phase=phase, best=best(objective=0.75))
    plan = w.step()
    assert plan.applies == []
    assert w.cs("ModelReady") == ("False", "WaitingForFineTuneSweep")
    assert message(w, "ModelReady") == (
        f"FineTuneSweep sw is {phase} (best so far sw-t2, evalAccuracy 0.75); waiting for it to succeed"
    )
    assert w.status["phase"] == "Pending" and "source" not in w.status.get("model", {})
    assert w.step().is_empty()


def test_waits_for_a_succeeded_sweep_without_a_best_model() -> None:
    w = world()
    w.sweeps["sw"] = sweep(phase="Succeeded", best=best(model=None))
    assert w.step().applies == []
    assert w.cs("ModelReady") == ("False", "WaitingForFineTuneSweep")
    assert "status.best.model" in message(w, "ModelReady")


def test_a_failed_sweep_fails_the_service_once() -> None:
    w = world()
    w.sweeps["sw"] = sweep(phase="Running")
    w.step()
    w.sweeps["sw"] = sweep(phase="Failed", failed_msg="all 4 trials failed")
    plan = w.step()
    assert plan.applies == []
    assert w.cs("ModelReady") == ("False", "FineTuneSweepFailed")
    assert message(w, "ModelReady") == "FineTuneSweep sw failed (NoSuccessfulTrial: all 4 trials failed)"
    assert w.status["phase"] == "Failed"
    assert events(plan) == [("Warning", "FineTuneSweepFailed")]
    assert w.step().is_empty()


def test_a_succeeded_sweep_serves_its_best_trial() -> None:
    w = world()
    w.sweeps["sw"] = sweep(phase="Running", best=best(trial="sw-t0", objective=0.6))
    w.step()
    w.sweeps["sw"] = sweep(phase="Succeeded", best=best())
    plan = w.step()
    assert [c["kind"] for c in plan.applies] == ["Service", "Deployment"]
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert message(w, "ModelReady") == (
        f"model {BEST_MODEL} from FineTuneSweep sw (best trial sw-t2, evalAccuracy 0.9)"
    )
    assert w.status["model"] == {
        "source": BEST_MODEL,
        "fineTuneJob": "sw-t2",
        "fineTuneSweep": "sw",
        "task": "sequence-classification",  # the sweep template's task
    }
    assert events(plan) == [("Normal", "ModelResolved")]
    dep = w.dep(PRED)
    assert dep is not None
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][:2] == [
        "--model",
        "/mnt/tauon/pvc/results/sentiment-ft/sw-t2/model",
    ]
    ann = dep["metadata"]["annotations"]
    assert (ann[ANN_MODEL_SOURCE], ann[ANN_FINE_TUNE_JOB], ann[ANN_FINE_TUNE_SWEEP]) == (
        BEST_MODEL,
        "sw-t2",
        "sw",
    )
    assert ann[ANN_MODEL_TASK] == "sequence-classification"
    w.roll_out(PRED)
    w.step()
    assert w.status["phase"] == "Ready" and w.cs("Ready") == ("True", "Serving")
    assert w.step().is_empty()


def test_the_model_is_kept_when_the_sweep_is_deleted() -> None:
    w = world()
    w.auto_ready = True
    w.sweeps["sw"] = sweep(phase="Succeeded", best=best())
    w.converge()
    model = w.status["model"]
    del w.sweeps["sw"]
    plans = w.converge()
    assert all(p.applies == [] and p.deletes == [] for p in plans) and events(plans) == []
    assert w.status["model"] == model
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    assert "the sweep no longer exists" in message(w, "ModelReady")
    assert w.status["phase"] == "Ready"


def test_a_causal_lm_template_makes_an_openai_service_and_spec_task_wins() -> None:
    w = world()
    w.sweeps["sw"] = sweep(phase="Succeeded", best=best(), task="causal-lm")
    w.step()
    assert w.status["model"]["task"] == "causal-lm"
    assert w.status["openai"]["model"] == "sentiment"
    w2 = world(model={**SWEEP_REF, "task": "sequence-classification"})
    w2.sweeps["sw"] = sweep(phase="Succeeded", best=best(), task="causal-lm")
    w2.step()
    assert w2.status["model"]["task"] == "sequence-classification"
    assert "openai" not in w2.status or not w2.status["openai"].get("model")


def test_switching_from_a_job_to_a_sweep_serves_the_old_model_until_the_sweep_succeeds() -> None:
    w = world(model={"source": "pvc://models/old"})
    w.auto_ready = True
    w.converge()
    w.sweeps["sw"] = sweep(phase="Running")
    w.set_spec(model=SWEEP_REF)
    w.converge()
    assert w.status["model"] == {"source": "pvc://models/old"}
    assert w.cs("ModelReady") == ("False", "WaitingForFineTuneSweep")
    w.sweeps["sw"] = sweep(phase="Succeeded", best=best())
    plans = w.converge()
    assert ("Normal", "ModelResolved") in events(plans)
    assert w.status["model"]["fineTuneSweep"] == "sw" and w.status["phase"] == "Ready"


def test_a_canary_from_a_sweep_waits_then_gets_its_share_and_survives_the_sweep() -> None:
    w = world(model={"source": "pvc://models/v1"}, replicas=4)
    w.body["spec"]["canary"] = {"model": SWEEP_REF, "trafficPercent": 50}
    w.auto_ready = True
    w.sweeps["sw"] = sweep(phase="Running")
    w.converge()
    assert w.dep(CAN) is None
    assert w.cs("CanaryReady") == ("False", "WaitingForFineTuneSweep")
    assert w.cs("ModelReady") == ("True", "ModelResolved")
    w.sweeps["sw"] = sweep(phase="Succeeded", best=best())
    w.converge()
    can = w.dep(CAN)
    assert can is not None and can["spec"]["replicas"] == 2
    assert can["metadata"]["annotations"][ANN_FINE_TUNE_SWEEP] == "sw"
    assert w.status["phase"] == "Ready"
    del w.sweeps["sw"]
    plans = w.converge()
    assert all(p.applies == [] and p.deletes == [] for p in plans)
    assert w.cs("CanaryReady") == ("True", "MinimumReplicasAvailable")


def test_a_failed_canary_sweep_keeps_the_predictor_serving() -> None:
    w = world(model={"source": "pvc://models/v1"}, replicas=2)
    w.body["spec"]["canary"] = {"model": SWEEP_REF, "trafficPercent": 10}
    w.auto_ready = True
    w.sweeps["sw"] = sweep(phase="Failed")
    plans = w.converge()
    assert w.dep(CAN) is None
    assert w.cs("CanaryReady") == ("False", "FineTuneSweepFailed")
    assert w.status["phase"] == "NotReady"
    assert events(plans).count(("Warning", "FineTuneSweepFailed")) == 1


# -- pure helpers ----------------------------------------------------------------------------------------


def test_sweep_best_reads_status_best_and_the_template_task() -> None:
    assert sweep_best(sweep(phase="Succeeded", best=best())) == ModelLocation(
        BEST_MODEL, "sw-t2", "sequence-classification", "sw"
    )
    assert sweep_best(sweep(phase="Succeeded")) is None
    assert sweep_best(sweep(phase="Succeeded", best=best(model=None))) is None
    assert sweep_best(sweep(phase="Succeeded", best={"model": BEST_MODEL})) is None  # no trial


def test_resolve_sweep_remembers_only_its_own_sweep() -> None:
    mine = ModelLocation(BEST_MODEL, "sw-t2", None, "sw")
    assert resolve_sweep("sw", None, mine).state == "ready"
    other = ModelLocation(BEST_MODEL, "sw-t2", None, "other")
    res = resolve_sweep("sw", None, other)
    assert (res.state, res.reason) == ("waiting", "WaitingForFineTuneSweep")
    job_only = ModelLocation(BEST_MODEL, "sw-t2")
    assert resolve_sweep("sw", None, job_only).state == "waiting"


def test_deployment_annotations_round_trip_the_sweep() -> None:
    ann = {ANN_MODEL_SOURCE: BEST_MODEL, ANN_FINE_TUNE_JOB: "sw-t2", ANN_FINE_TUNE_SWEEP: "sw"}
    assert location_from_annotations(ann) == ModelLocation(BEST_MODEL, "sw-t2", None, "sw")


# -- handler: which services a sweep's events re-plan ------------------------------------------------------


def test_references_by_field() -> None:
    body = isvc_body(
        model=SWEEP_REF, canary={"model": {"fineTuneJobRef": {"name": "ft"}}, "trafficPercent": 5}
    )
    assert handler.references(body, handler.SWEEP_REF) == {"sw"}
    assert handler.references(body) == {"ft"}
    body = isvc_body(canary={"model": {"fineTuneSweepRef": {"name": "sw2"}}, "trafficPercent": 5})
    assert handler.references(body, handler.SWEEP_REF) == {"sw2"}


def test_a_sweep_event_triggers_the_services_that_reference_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def svc(name: str, ns: str, model: Manifest) -> Manifest:
        b = isvc_body(model=model)
        b["metadata"].update(name=name, namespace=ns)
        return b

    services = {
        (NS, "a"): [svc("a", NS, SWEEP_REF)],
        (NS, "b"): [svc("b", NS, {"fineTuneJobRef": {"name": "sw"}})],  # a job of the same name
        ("other", "c"): [svc("c", "other", SWEEP_REF)],  # another namespace
        (NS, "d"): [svc("d", NS, {"source": "hf://o/m"})],
    }
    sweeps = {(NS, "sw"): [sweep(best=best())]}
    indexes = ix.Indexes()
    indexes.capture({ix.ISVC: services, ix.FTS: sweeps})
    triggered: list[tuple[str, str, str]] = []
    monkeypatch.setattr(RT, "indexes", indexes)
    monkeypatch.setattr(RT, "trigger", lambda c, ns, n, delay=0.0: triggered.append((c, ns, n)))
    handler.on_sweep_change(NS, "sw")
    assert triggered == [(handler.CONTROLLER, NS, "a")]
    triggered.clear()
    handler.on_job_change(NS, "sw")
    assert triggered == [(handler.CONTROLLER, NS, "b")]
    found = handler._referenced(ix.FTS, NS, {"sw", "missing"})
    assert list(found) == ["sw"] and found["sw"]["status"]["best"]["trial"] == "sw-t2"
