"""Periodic evaluations and pruning on the operator side (issue 24): spec.hyperparameters.evalEverySteps
(admission), status.progress.evaluations (bounded, merged across attempts), status.resolved.compile, and
a FineTuneJob ended by its sweep through the tauon.dev/prune annotation. Pure: the planner in the Sim of
test_reconcile_finetunejob (no cluster)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from tauon.api.crds import finetunejob_crd
from tauon.api.finetunejob import Evaluation, FineTuneJob, FineTuneJobStatus
from tauon.api.finetunesweep import FineTuneSweep
from tauon.api.names import ANN_PRUNE
from tauon.reconcile import finetunejob as F
from tauon.reconcile.context import MAX_MESSAGE
from tauon.reconcile.finetunejob import (
    bounded_evaluations,
    bounded_progress,
    merge_evaluations,
    prune_message,
    take_resolved,
    thin_evaluations,
)
from tauon.render.config import OperatorConfig
from tauon.render.finetunejob import job_config
from tests.manifests import PVC_SPEC, deep_merge, finetunejob
from tests.unit.test_reconcile_finetunejob import Sim, deleted_pods, iso, reasons

# --- the API ---------------------------------------------------------------------------------------


def job_with(**spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(finetunejob("ft", base=deep_merge(PVC_SPEC, spec)))


def test_eval_every_steps_defaults_to_unset_and_reaches_job_json() -> None:
    assert job_with().spec.hyperparameters.eval_every_steps is None
    job = job_with(hyperparameters={"evalEverySteps": 50})
    assert job.spec.hyperparameters.eval_every_steps == 50
    hp = job_config(job, OperatorConfig())["hyperparameters"]
    assert isinstance(hp, dict) and hp["evalEverySteps"] == 50
    hp = job_config(job_with(), OperatorConfig())["hyperparameters"]
    assert isinstance(hp, dict) and hp["evalEverySteps"] is None  # the trainer reads null as unset


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, "ten"])
def test_eval_every_steps_out_of_range_is_refused(bad: Any) -> None:
    with pytest.raises(ValidationError) as e:
        job_with(hyperparameters={"evalEverySteps": bad})
    assert "evalEverySteps" in str(e.value) or "eval_every_steps" in str(e.value)


def test_eval_every_steps_needs_a_validation_split() -> None:
    with pytest.raises(ValidationError, match=r"evalEverySteps needs spec.dataset.validationSplit > 0"):
        job_with(hyperparameters={"evalEverySteps": 10}, dataset={"validationSplit": 0})
    job_with(dataset={"validationSplit": 0})  # without periodic evaluation a split of 0 is fine
    job_with(hyperparameters={"evalEverySteps": 10}, dataset={"validationSplit": 0.05})


def test_a_sweep_template_with_eval_every_steps_and_no_split_is_refused() -> None:
    template = deep_merge(
        PVC_SPEC, {"hyperparameters": {"evalEverySteps": 5}, "dataset": {"validationSplit": 0}}
    )
    body = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "s"},
        "spec": {
            "template": {"spec": template},
            "parameters": [{"name": "learningRate", "type": "float", "min": 1e-5, "max": 1e-3}],
            "objective": {"metric": "trainLoss"},
        },
    }
    with pytest.raises(ValidationError, match="evalEverySteps needs"):
        FineTuneSweep.model_validate(body)


def _rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_crd_has_the_admission_rule_and_documented_status_fields() -> None:
    schema = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    rule = next(r for r in _rules(spec) if "evalEverySteps" in r)
    assert "self.dataset.validationSplit > 0.0" in rule
    hp = spec["properties"]["hyperparameters"]["properties"]["evalEverySteps"]
    assert hp["type"] == "integer" and hp["minimum"] == 1 and hp["description"]
    status = schema["properties"]["status"]["properties"]
    evals = status["progress"]["properties"]["evaluations"]
    assert evals["type"] == "array" and evals["description"]
    item = evals["items"]["properties"]
    assert set(item) == {"step", "trainLoss", "evalLoss", "evalAccuracy"}
    assert all(v.get("description") for v in item.values())  # kubectl explain
    compile_ = status["resolved"]["properties"]["compile"]
    assert compile_["type"] == "boolean" and "compiled" in compile_["description"]


# --- bounding and merging the history ------------------------------------------------------------------


def ev(step: int, loss: float | None = 1.0) -> dict[str, Any]:
    return {"step": step, "trainLoss": loss, "evalLoss": loss, "evalAccuracy": None}


def steps(points: list[Evaluation] | None) -> list[int]:
    return [p.step for p in points or []]


def test_bounded_evaluations_keeps_good_points_sorted_and_unique() -> None:
    out = bounded_evaluations([ev(20, 0.5), ev(10, 0.7), {"step": 10, "evalLoss": 0.6}])
    assert steps(out) == [10, 20]
    assert out is not None and out[0].eval_loss == 0.6 and out[0].train_loss is None  # last one wins
    assert out[1] == Evaluation(step=20, train_loss=0.5, eval_loss=0.5, eval_accuracy=None)
    assert bounded_evaluations([{"step": 3, "evalAccuracy": 1}])[0].eval_accuracy == 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    "bad",
    [
        "not an object",
        None,
        {},
        {"step": "3"},
        {"step": True},
        {"step": -1},
        {"step": 2**60},
        {"step": 1.5},
        {"step": 3, "evalLoss": float("nan")},
        {"step": 3, "trainLoss": float("inf")},
        {"step": 3, "evalAccuracy": 1e300},
        {"step": 3, "evalLoss": 10**400},
        {"step": 3, "evalLoss": "low"},
        {"step": 3, "evalLoss": False},
    ],
)
def test_bounded_evaluations_drops_unusable_points(bad: Any) -> None:
    assert steps(bounded_evaluations([ev(1), bad, ev(2)])) == [1, 2]


@pytest.mark.parametrize("report", [None, "x", 3, {"step": 1}])
def test_bounded_evaluations_without_a_list_is_none(report: Any) -> None:
    assert bounded_evaluations(report) is None


def test_bounded_evaluations_caps_the_history() -> None:
    out = bounded_evaluations([ev(s) for s in range(1, 251)])
    assert out is not None and len(out) <= 100
    assert steps(out)[0] == 1 and steps(out)[-1] == 250 and steps(out) == sorted(steps(out))
    assert steps(bounded_evaluations([ev(s) for s in range(10**6)]))[-1] < 10**6  # at most 400 read


def test_thin_evaluations_matches_the_trainer_rule() -> None:
    points = [Evaluation(step=s) for s in range(101)]
    assert steps(thin_evaluations(points)) == list(range(0, 50, 2)) + list(range(50, 101))
    with pytest.raises(ValueError):
        thin_evaluations(points, 1)


def test_merge_keeps_older_steps_and_newer_values_win() -> None:
    old = bounded_evaluations([ev(10, 0.9), ev(20, 0.8), ev(30, 0.7)])
    new = bounded_evaluations([ev(30, 0.65), ev(40, 0.6)])  # an attempt resumed from step 20's checkpoint
    merged = merge_evaluations(old, new)
    assert steps(merged) == [10, 20, 30, 40]
    assert merged is not None and merged[2].eval_loss == 0.65
    assert merge_evaluations(None, None) is None
    assert merge_evaluations(old, None) == old
    assert merge_evaluations(None, new) == new
    assert merge_evaluations([], None) == []


def test_merge_stays_bounded() -> None:
    old = bounded_evaluations([ev(s) for s in range(0, 200, 2)])
    new = bounded_evaluations([ev(s) for s in range(1, 200, 2)])
    merged = merge_evaluations(old, new)
    assert merged is not None and len(merged) <= 100
    assert steps(merged)[0] == 0 and steps(merged)[-1] == 199


def test_a_progress_report_with_garbage_evaluations_still_counts() -> None:
    p = bounded_progress({"step": 3, "totalSteps": 10, "evaluations": [ev(2), {"step": "x"}]})
    assert p is not None and p.step == 3 and steps(p.evaluations) == [2]
    p = bounded_progress({"step": 3, "totalSteps": 10, "evaluations": "lots"})
    assert p is not None and p.evaluations is None
    assert bounded_progress({"step": float("nan"), "evaluations": [ev(1)]}) is None


# --- the planner: status.progress.evaluations ------------------------------------------------------------


def report(sim: Sim, step: int, evaluations: list[dict[str, Any]] | None) -> None:
    sim.progress = {"step": step, "totalSteps": 100, "updatedAt": iso(sim.now)}
    if evaluations is not None:
        sim.progress["evaluations"] = evaluations


def test_evaluations_reach_status_and_survive_a_restart() -> None:
    sim = Sim()
    sim.run_gang()
    report(sim, 25, [ev(10, 0.9), ev(20, 0.8)])
    sim.step(1)
    assert steps(sim.st.progress.evaluations) == [10, 20]
    assert sim.step(1).is_empty()  # the same report: nothing to write
    # rank 0 fails; the next attempt resumes at its step-15 checkpoint and reports only its own points
    sim.fail(0)
    sim.step(1)
    sim.gc()
    sim.wait_backoff()
    sim.run_gang()
    assert sim.st.attempt == 1
    report(sim, 30, [ev(20, 0.75), ev(30, 0.7)])
    sim.step(1)
    merged = sim.st.progress.evaluations
    assert steps(merged) == [10, 20, 30]
    assert merged is not None and merged[1].eval_loss == 0.75  # newer values win for the same step
    # a report without evaluations keeps the history
    report(sim, 31, None)
    sim.step(1)
    assert sim.st.progress.step == 31 and steps(sim.st.progress.evaluations) == [10, 20, 30]
    # an older report (a slow fetch) changes nothing, evaluations included
    sim.progress = {"step": 5, "updatedAt": iso(sim.now - timedelta(minutes=5)), "evaluations": [ev(1)]}
    assert sim.step(1).is_empty()
    assert steps(sim.st.progress.evaluations) == [10, 20, 30]


def test_status_without_periodic_evaluation_has_no_evaluations_key() -> None:
    sim = Sim()
    sim.run_gang()
    report(sim, 5, None)
    plan = sim.step(1)
    assert plan.status is not None and "evaluations" not in plan.status["progress"]


def test_status_evaluations_are_camel_case_and_round_trip() -> None:
    sim = Sim()
    sim.run_gang()
    report(sim, 5, [ev(5, 0.5)])
    plan = sim.step(1)
    assert plan.status is not None
    assert plan.status["progress"]["evaluations"] == [{"step": 5, "trainLoss": 0.5, "evalLoss": 0.5}]
    assert FineTuneJobStatus.model_validate(plan.status).progress.evaluations == sim.st.progress.evaluations


# --- status.resolved.compile ----------------------------------------------------------------------------


def test_resolved_compile_written_once() -> None:
    st = FineTuneJobStatus()
    take_resolved(st, {"strategy": "ddp", "compile": True})
    assert st.resolved.compile is True
    take_resolved(st, {"strategy": "fsdp", "compile": False})
    assert st.resolved.compile is True and st.resolved.strategy == "ddp"
    st = FineTuneJobStatus()
    take_resolved(st, {"compile": False})  # without a strategy too
    assert st.resolved.compile is False and st.resolved.strategy is None


@pytest.mark.parametrize("bad", ["true", 1, None, [True]])
def test_resolved_compile_must_be_a_bool(bad: Any) -> None:
    st = FineTuneJobStatus()
    take_resolved(st, {"strategy": "ddp", "compile": bad})
    assert st.resolved.compile is None


def test_resolved_compile_from_progress_and_termination_message() -> None:
    sim = Sim()
    sim.run_gang()
    sim.progress = {"step": 1, "updatedAt": iso(sim.now), "resolved": {"strategy": "ddp", "compile": False}}
    sim.step(1)
    assert sim.st.resolved.compile is False
    sim2 = Sim()
    sim2.run_gang()
    sim2.succeed(1)
    sim2.succeed(0, {"metrics": {"trainLoss": 0.1}, "resolved": {"strategy": "ddp", "compile": True}})
    sim2.step(1)
    assert sim2.st.phase == "Succeeded" and sim2.st.resolved.compile is True


# --- pruning ----------------------------------------------------------------------------------------------


def prune(sim: Sim, why: str = "median rule: evalLoss 0.9 at step 50 is worse than the median 0.6") -> None:
    sim.job.metadata.annotations[ANN_PRUNE] = why


def test_prune_ends_a_running_job() -> None:
    sim = Sim({"numNodes": 2})
    sim.run_gang()
    prune(sim)
    plan = sim.step(1)
    assert deleted_pods(plan) == ["ft-r0-node-0", "ft-r0-node-1"]
    assert plan.creates == [] and plan.status_first
    assert sim.st.phase == "Failed" and sim.st.completion_time == sim.now
    failed = sim.cond("Failed")
    assert failed is not None and failed.reason == "Pruned"
    assert failed.message == (
        "pruned by its FineTuneSweep: median rule: evalLoss 0.9 at step 50 is worse than the median 0.6"
    )
    assert not sim.is_true("Running")
    assert reasons(plan) == [("Normal", "Pruned")]
    assert sim.st.restarts == 0 and sim.st.attempt == 0 and sim.st.pods.active == 0
    # afterwards: a finished job; nothing is restarted, re-deleted or announced again
    sim.gc()
    for _ in range(3):
        plan = sim.step(30)
        assert plan.creates == [] and plan.deletes == [] and plan.events == []
    assert sim.st.phase == "Failed" and sim.st.attempt == 0


def test_prune_wins_over_a_restart() -> None:
    sim = Sim()
    sim.run_gang()
    sim.fail(0)  # a retryable failure in the same pass: no new attempt for a pruned trial
    prune(sim)
    plan = sim.step(1)
    assert sim.st.phase == "Failed" and sim.cond("Failed").reason == "Pruned"  # type: ignore[union-attr]
    assert sim.st.restarts == 0 and sim.st.attempt == 0 and plan.creates == []
    assert ("Warning", "Restarting") not in reasons(plan)


def test_prune_before_any_pod_exists_creates_nothing() -> None:
    sim = Sim()
    prune(sim)
    plan = sim.step()
    assert plan.creates == [] and sim.pods == {}
    assert sim.st.phase == "Failed" and sim.cond("Failed").reason == "Pruned"  # type: ignore[union-attr]


def test_prune_a_suspended_job() -> None:
    sim = Sim()
    sim.run_gang()
    sim.set_spec(suspend=True)
    sim.step(1)
    sim.gc()
    assert sim.st.phase == "Suspended"
    prune(sim)
    sim.step(1)
    assert sim.st.phase == "Failed" and not sim.is_true("Suspended")
    sim.set_spec(suspend=False)  # resuming a pruned trial starts nothing
    plan = sim.step(1)
    assert plan.creates == [] and sim.st.phase == "Failed"


@pytest.mark.parametrize("finish", ["Succeeded", "Failed"])
def test_a_finished_job_ignores_the_annotation(finish: str) -> None:
    sim = Sim({"runPolicy": {"backoffLimit": 0}})
    sim.run_gang()
    if finish == "Succeeded":
        sim.succeed(1)
        sim.succeed(0, {"metrics": {"trainLoss": 0.1}})
    else:
        sim.fail(0)
    sim.step(1)
    assert sim.st.phase == finish
    before = sim.cond(finish)
    prune(sim)
    plan = sim.step(1)
    assert plan.events == [] and sim.st.phase == finish and sim.cond(finish) == before
    assert sim.cond("Failed") is None or sim.cond("Failed").reason != "Pruned"  # type: ignore[union-attr]


def test_prune_message_empty_and_long_values() -> None:
    assert prune_message("") == prune_message("  ") == "pruned by its FineTuneSweep"
    assert prune_message(" asha rung 2 ") == "pruned by its FineTuneSweep: asha rung 2"
    sim = Sim()
    sim.run_gang()
    prune(sim, "x" * 10_000)
    plan = sim.step(1)
    failed = sim.cond("Failed")
    assert failed is not None and len(failed.message.encode()) <= MAX_MESSAGE
    assert all(len(e.message.encode()) <= MAX_MESSAGE for e in plan.events)


def test_prune_step_is_named_and_placed_before_suspend_and_failures() -> None:
    names = [s.__name__ for s in F.STEPS]
    assert names.index("step_finished") < names.index("step_prune")
    assert names.index("step_cleanup_and_progress") < names.index("step_prune")  # the last report is kept
    assert names.index("step_prune") < names.index("step_suspend") < names.index("step_deadline")
    assert names.index("step_prune") < names.index("step_gang_failure")


def test_the_last_report_before_pruning_is_kept() -> None:
    sim = Sim()
    sim.run_gang()
    report(sim, 50, [ev(25, 0.9), ev(50, 0.95)])
    prune(sim)
    sim.step(1)
    assert sim.st.phase == "Failed" and steps(sim.st.progress.evaluations) == [25, 50]
