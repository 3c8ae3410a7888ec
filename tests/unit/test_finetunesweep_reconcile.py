"""The FineTuneSweep planner, driven pass by pass against a simulated API server: the plan's creates and
deletes change the set of trial FineTuneJobs, its status replaces the sweep's, and the tests decide when
each trial ends and with which objective."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
from typing import Any

import pytest

from tauon.api.finetunesweep import FineTuneSweep
from tauon.api.names import ANN_PRUNE, ANN_TRIAL_PARAMETERS, LABEL_SWEEP, LABEL_TRIAL
from tauon.reconcile.finetunesweep import Observed, reconcile, sample
from tauon.reconcile.plan import Plan

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

TEMPLATE: dict[str, Any] = {
    "model": {"source": "hf://org/model", "task": "sequence-classification", "numLabels": 2},
    "dataset": {"source": "file:///data/train.jsonl"},
    "method": {"type": "lora"},
    "hyperparameters": {"epochs": 1},
    "output": {"storage": "file:///out/sweep/"},
}


def sweep_body(**spec: Any) -> dict[str, Any]:
    body_spec: dict[str, Any] = {
        "template": {"spec": copy.deepcopy(TEMPLATE)},
        "parameters": [
            {"name": "learningRate", "type": "float", "min": 1e-5, "max": 1e-3, "log": True},
            {"name": "method.lora.rank", "type": "int", "values": [4, 8, 16]},
        ],
        "algorithm": {"type": "tpe", "seed": 1},
        "maxTrials": 5,
        "parallelTrials": 2,
        "maxFailedTrials": 2,
    }
    body_spec.update(spec)
    return {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "sw", "namespace": "ns", "uid": "sweep-uid", "generation": 1},
        "spec": body_spec,
    }


class Sim:
    """The sweep and its trials as the API server would hold them."""

    def __init__(self, body: dict[str, Any]):
        self.body = body
        self.jobs: dict[str, dict[str, Any]] = {}
        self.plans: list[Plan] = []

    def plan(self, creating: list[str] | None = None) -> Plan:
        observed = Observed(trials=copy.deepcopy(list(self.jobs.values())), creating=creating or [])
        return reconcile(FineTuneSweep.model_validate(self.body), observed, NOW)

    def step(self) -> Plan:
        plan = self.plan()
        for c in plan.creates:
            assert c["metadata"]["name"] not in self.jobs, "a trial was created twice"
            self.jobs[c["metadata"]["name"]] = {**copy.deepcopy(c), "status": {"phase": "Pending"}}
        for kind, name in plan.deletes:
            assert kind == "FineTuneJob"
            self.jobs.pop(name)
        for kind, name, patch in plan.patches:
            assert kind == "FineTuneJob" and set(patch) == {"metadata"}
            self.jobs[name]["metadata"]["annotations"].update(patch["metadata"]["annotations"])
        if plan.status is not None:
            self.body["status"] = plan.status
        self.plans.append(plan)
        return plan

    def finish(self, name: str, phase: str = "Succeeded", value: float | None = None) -> None:
        job = self.jobs[name]
        st: dict[str, Any] = {"phase": phase}
        if phase == "Succeeded":
            metrics = {} if value is None else {"evalLoss": value, "evalAccuracy": 1 - value}
            st["output"] = {"model": f"{job['spec']['output']['storage']}/model", "metrics": metrics}
        if phase == "Failed":
            st["conditions"] = [
                {"type": "Failed", "status": "True", "reason": "PermanentError", "message": "x"}
            ]
        job["status"] = st

    def run(self, name: str) -> None:
        self.jobs[name]["status"] = {"phase": "Running", "progress": {"step": 3}}

    def unfinished(self) -> list[str]:
        return sorted(n for n, j in self.jobs.items() if j["status"]["phase"] not in ("Succeeded", "Failed"))

    @property
    def status(self) -> dict[str, Any]:
        return self.body.get("status") or {}

    def condition(self, ctype: str) -> dict[str, Any] | None:
        return next((c for c in self.status.get("conditions", []) if c["type"] == ctype), None)


def params_of(job: dict[str, Any]) -> dict[str, Any]:
    return json.loads(job["metadata"]["annotations"][ANN_TRIAL_PARAMETERS])


# -- creating trials ---------------------------------------------------------------------------------------


def test_first_pass_creates_parallel_trials_owned_labelled_and_parameterised():
    sim = Sim(sweep_body())
    plan = sim.step()
    assert [c["metadata"]["name"] for c in plan.creates] == ["sw-t0", "sw-t1"]
    for k, c in enumerate(plan.creates):
        meta = c["metadata"]
        assert (c["apiVersion"], c["kind"], meta["namespace"]) == ("tauon.dev/v1alpha1", "FineTuneJob", "ns")
        assert meta["labels"][LABEL_SWEEP] == "sw" and meta["labels"][LABEL_TRIAL] == str(k)
        (ref,) = meta["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "FineTuneSweep",
            "sw",
            "sweep-uid",
            True,
        )
        params = params_of(c)
        assert set(params) == {"learningRate", "method.lora.rank"}
        assert 1e-5 <= params["learningRate"] <= 1e-3 and params["method.lora.rank"] in (4, 8, 16)
        assert c["spec"]["hyperparameters"] == {"epochs": 1, "learningRate": params["learningRate"]}
        assert c["spec"]["method"] == {"type": "lora", "lora": {"r": params["method.lora.rank"]}}
        assert c["spec"]["output"]["storage"] == f"file:///out/sweep/sw-t{k}"
        assert c["spec"]["model"] == TEMPLATE["model"]  # the template otherwise as written
    assert params_of(plan.creates[0]) != params_of(plan.creates[1])
    st = sim.status
    assert st["phase"] == "Running" and st["observedGeneration"] == 1
    assert [(t["name"], t["phase"]) for t in st["trials"]] == [("sw-t0", "Pending"), ("sw-t1", "Pending")]
    assert [t["parameters"] for t in st["trials"]] == [params_of(c) for c in plan.creates]
    assert [e.reason for e in plan.events] == ["TrialCreated", "TrialCreated"]


def test_never_more_than_parallel_trials_unfinished_and_max_trials_in_all():
    sim = Sim(sweep_body(maxTrials=7, parallelTrials=3))
    value = itertools.count()
    for _ in range(40):
        sim.step()
        unfinished = sim.unfinished()
        assert len(unfinished) <= 3
        if not unfinished:
            break
        for name in unfinished:
            sim.run(name)
        sim.finish(unfinished[0], value=0.5 + next(value) / 100)  # one trial ends per pass
    assert sorted(sim.jobs) == [f"sw-t{k}" for k in range(7)]
    assert sim.status["phase"] == "Succeeded"
    assert sim.status["finishedTrials"] == 7


def test_no_creates_while_a_create_is_not_observed_yet():
    sim = Sim(sweep_body())
    first = sim.plan()
    # the creates were sent; the watch has not delivered them, and status was not written yet
    plan = sim.plan(creating=["sw-t0", "sw-t1"])
    assert plan.creates == [] and first.creates


def test_replayed_and_restarted_passes_create_the_same_parameters_and_no_duplicates():
    sim = Sim(sweep_body())
    sim.step()
    sim.finish("sw-t0", value=0.3)
    replay = [sim.plan() for _ in range(3)]
    (created,) = {json.dumps(p.creates, sort_keys=True) for p in replay}  # same plan every time
    assert [c["metadata"]["name"] for c in replay[0].creates] == ["sw-t2"]
    # an operator restart that lost status.trials (or a status write that never landed): same plan
    restarted = copy.deepcopy(sim.body)
    restarted.pop("status")
    again = Sim(restarted)
    again.jobs = copy.deepcopy(sim.jobs)
    assert json.dumps(again.plan().creates, sort_keys=True) == created
    sim.step()
    assert sim.plan().creates == []  # parallelTrials unfinished: nothing more


def test_parameters_come_from_the_trial_never_sampled_again():
    sim = Sim(sweep_body())
    sim.step()
    sim.jobs["sw-t0"]["metadata"]["annotations"][ANN_TRIAL_PARAMETERS] = json.dumps(
        {"learningRate": 0.0005, "method.lora.rank": 16}
    )
    plan = sim.step()
    assert plan.creates == []
    assert sim.status["trials"][0]["parameters"] == {"learningRate": 0.0005, "method.lora.rank": 16}


def test_sampling_is_deterministic_per_seed_and_index():
    spec = FineTuneSweep.model_validate(sweep_body()).spec
    assert sample(spec, [], 0) == sample(spec, [], 0)
    assert sample(spec, [], 0) != sample(spec, [], 1)
    other = FineTuneSweep.model_validate(sweep_body(algorithm={"type": "tpe", "seed": 2})).spec
    assert sample(spec, [], 0) != sample(other, [], 0)


def test_random_algorithm_samples_distinct_trials_too():
    sim = Sim(sweep_body(algorithm={"type": "random", "seed": 7}, parallelTrials=4))
    plan = sim.step()
    lrs = [params_of(c)["learningRate"] for c in plan.creates]
    assert len(lrs) == 4 and len(set(lrs)) == 4


# -- failures ---------------------------------------------------------------------------------------------


def test_max_failed_trials_fail_the_sweep_and_stop_its_unfinished_trials():
    sim = Sim(sweep_body(maxFailedTrials=2, maxTrials=5, parallelTrials=2))
    sim.step()
    sim.finish("sw-t0", "Failed")
    plan = sim.step()
    assert [c["metadata"]["name"] for c in plan.creates] == ["sw-t2"]  # one failure: carry on
    assert (
        sim.status["trials"][0]["phase"] == "Failed"
        and "PermanentError" in sim.status["trials"][0]["message"]
    )
    sim.finish("sw-t1", "Failed")
    plan = sim.step()
    assert plan.creates == [] and plan.deletes == [("FineTuneJob", "sw-t2")]
    failed = sim.condition("Failed")
    assert failed is not None and (failed["status"], failed["reason"]) == ("True", "TooManyFailedTrials")
    assert sim.condition("Running")["status"] == "False"  # type: ignore[index]
    assert sim.status["phase"] == "Failed"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "TooManyFailedTrials")]
    assert (
        sim.status["trials"][2]["phase"] == "Failed" and "sweep failed" in sim.status["trials"][2]["message"]
    )
    assert sim.plan().is_empty()  # converged: no writes


def test_a_trial_that_succeeds_without_the_objective_counts_as_failed():
    sim = Sim(sweep_body())
    sim.step()
    sim.finish("sw-t0", value=None)
    sim.step()
    rec = sim.status["trials"][0]
    assert rec["phase"] == "Failed" and "evalLoss" in rec["message"]


def test_a_deleted_unfinished_trial_counts_as_failed_and_its_index_is_not_reused():
    sim = Sim(sweep_body(maxFailedTrials=3))
    sim.step()
    del sim.jobs["sw-t1"]
    plan = sim.step()
    assert [c["metadata"]["name"] for c in plan.creates] == ["sw-t2"]
    assert sim.status["trials"][1]["phase"] == "Failed"


# -- success -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "best"),
    [
        ({"metric": "evalLoss", "goal": "minimize"}, "sw-t1"),
        ({"metric": "evalAccuracy", "goal": "maximize"}, "sw-t1"),
    ],
)
def test_success_records_the_best_trial_by_goal(objective: dict[str, str], best: str):
    sim = Sim(sweep_body(maxTrials=3, parallelTrials=3, objective=objective))
    sim.step()
    for name, loss in (("sw-t0", 0.4), ("sw-t1", 0.2), ("sw-t2", 0.6)):
        sim.finish(name, value=loss)
    plan = sim.step()
    assert sim.status["phase"] == "Succeeded"
    succeeded = sim.condition("Succeeded")
    assert succeeded is not None and succeeded["reason"] == "AllTrialsFinished"
    b = sim.status["best"]
    assert b["trial"] == best
    assert b["objective"] == pytest.approx(0.2 if objective["metric"] == "evalLoss" else 0.8)
    assert b["parameters"] == params_of(sim.jobs[best])
    assert b["model"] == f"file:///out/sweep/{best}/model"
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "AllTrialsFinished")]
    assert sim.plan().is_empty()  # a converged sweep costs no writes


def test_maximize_prefers_the_larger_objective():
    sim = Sim(sweep_body(maxTrials=2, parallelTrials=2, objective={"metric": "evalLoss", "goal": "maximize"}))
    sim.step()
    sim.finish("sw-t0", value=0.4)
    sim.finish("sw-t1", value=0.2)
    sim.step()
    assert sim.status["best"]["trial"] == "sw-t0"


def test_best_so_far_is_reported_while_running():
    sim = Sim(sweep_body())
    sim.step()
    sim.finish("sw-t0", value=0.4)
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["best"]["trial"] == "sw-t0"


def test_no_successful_trial_fails_the_sweep():
    sim = Sim(sweep_body(maxTrials=2, parallelTrials=2, maxFailedTrials=5))
    sim.step()
    sim.finish("sw-t0", value=None)
    sim.finish("sw-t1", value=None)
    sim.step()
    failed = sim.condition("Failed")
    assert failed is not None and failed["reason"] == "NoSuccessfulTrial"


def test_grid_covers_the_grid_once_and_ends_there():
    grid = [
        {"name": "learningRate", "type": "float", "values": [1e-4, 1e-3]},
        {"name": "method.lora.rank", "type": "int", "min": 4, "max": 6},
    ]
    sim = Sim(sweep_body(parameters=grid, algorithm={"type": "grid"}, maxTrials=50, parallelTrials=4))
    for _ in range(20):
        sim.step()
        if not sim.unfinished():
            break
        for name in sim.unfinished():
            sim.finish(name, value=0.1)
    points = sorted((p["learningRate"], p["method.lora.rank"]) for p in map(params_of, sim.jobs.values()))
    assert points == sorted(itertools.product([1e-4, 1e-3], [4, 5, 6]))
    assert len(sim.jobs) == 6 and sim.status["phase"] == "Succeeded"


def test_converged_running_sweep_plans_nothing():
    sim = Sim(sweep_body())
    sim.step()
    sim.run("sw-t0")
    sim.run("sw-t1")
    sim.step()
    assert sim.status["trials"][0]["phase"] == "Running" and sim.status["trials"][0]["step"] == 3
    assert sim.plan().is_empty()


# -- the template, the handler's observation, an unparseable sweep -----------------------------------------


def test_trials_carry_the_template_as_written_not_its_defaults():
    chat = copy.deepcopy(TEMPLATE)
    chat["model"] = {"source": "hf://org/model", "task": "causal-lm"}
    chat["dataset"] = {"source": "file:///data/chat.jsonl", "type": "chat"}
    sim = Sim(sweep_body(template={"spec": chat}))
    (first, _) = sim.step().creates
    # a default textField beside type chat would be refused by the FineTuneJob's own admission
    assert first["spec"]["dataset"] == {"source": "file:///data/chat.jsonl", "type": "chat"}
    assert "runPolicy" not in first["spec"] and "numNodes" not in first["spec"]


async def test_the_handler_observes_the_sweeps_own_trials_and_pending_creates(
    monkeypatch: pytest.MonkeyPatch,
):
    from tauon.handlers import finetunesweep as h
    from tauon.handlers import indexes as ix
    from tauon.handlers.runtime import RT

    sim = Sim(sweep_body())
    first = sim.step()
    ours = {**first.creates[0], "status": {"phase": "Running"}}
    foreign = copy.deepcopy(first.creates[1])
    foreign["metadata"]["ownerReferences"][0]["uid"] = "another-sweep"
    idx = ix.Indexes()
    idx.capture({ix.FTS_TRIALS: {("ns", "sw"): [ours, foreign]}})
    monkeypatch.setattr(RT, "indexes", idx)
    RT.expectations.forget((h.CONTROLLER, "ns", "sw"))
    sweep = FineTuneSweep.model_validate(sim.body)
    plan = await h.plan_sweep(sweep, sim.body, "sweep-uid", NOW)
    # sw-t1 is not ours (and not expected): it counts as gone, failed, and t2 takes its place
    assert [c["metadata"]["name"] for c in plan.creates] == ["sw-t2"]
    RT.expectations.expect((h.CONTROLLER, "ns", "sw"), "sweep-uid", [("FineTuneJob", "sw-t1")])
    try:
        plan = await h.plan_sweep(sweep, sim.body, "sweep-uid", NOW)
        assert plan.creates == []  # an unobserved create: wait for its watch event
    finally:
        RT.expectations.forget((h.CONTROLLER, "ns", "sw"))


def test_an_unparseable_sweep_fails_once():
    from tauon.reconcile.invalid import invalid_spec_plan

    raw = sweep_body()
    plan = invalid_spec_plan("FineTuneSweep", raw, "spec.parameters.0: bad", NOW)
    assert plan.status is not None and plan.status["phase"] == "Failed"
    raw["status"] = plan.status
    assert invalid_spec_plan("FineTuneSweep", raw, "spec.parameters.0: bad", NOW).is_empty()


def test_grid_larger_than_max_trials_stops_at_max_trials():
    grid = [{"name": "method.lora.rank", "type": "int", "min": 1, "max": 9}]
    sim = Sim(sweep_body(parameters=grid, algorithm={"type": "grid"}, maxTrials=3, parallelTrials=3))
    sim.step()
    for name in sim.unfinished():
        sim.finish(name, value=0.1)
    sim.step()
    assert sorted(params_of(j)["method.lora.rank"] for j in sim.jobs.values()) == [1, 2, 3]
    assert sim.status["phase"] == "Succeeded"


def test_raising_parallel_trials_mid_sweep_starts_more():
    sim = Sim(sweep_body(maxTrials=6, parallelTrials=1))
    assert len(sim.step().creates) == 1
    assert sim.plan().creates == []
    sim.body["spec"]["parallelTrials"] = 3
    assert [c["metadata"]["name"] for c in sim.step().creates] == ["sw-t1", "sw-t2"]


def test_a_trial_from_outside_the_search_space_is_kept_but_not_told_to_the_sampler():
    sim = Sim(sweep_body())
    sim.step()
    sim.jobs["sw-t0"]["metadata"]["annotations"][ANN_TRIAL_PARAMETERS] = json.dumps({"learningRate": 5.0})
    sim.finish("sw-t0", value=0.1)
    plan = sim.step()
    assert [c["metadata"]["name"] for c in plan.creates] == ["sw-t2"]
    assert sim.status["best"]["trial"] == "sw-t0"


# -- early stopping ----------------------------------------------------------------------------------------

EVAL_TEMPLATE = {**TEMPLATE, "hyperparameters": {"epochs": 1, "evalEverySteps": 10}}


def pruning_sweep(rule: str, min_steps: int, trials: int = 5, **spec: Any) -> Sim:
    """All `trials` trials created at once, so the tests drive each one's curve."""
    fields: dict[str, Any] = {
        "template": {"spec": copy.deepcopy(EVAL_TEMPLATE)},
        "earlyStopping": {"type": rule, "minSteps": min_steps, "minTrials": 3},
        "maxTrials": trials,
        "parallelTrials": trials,
    }
    body = sweep_body(**{**fields, **spec})
    sim = Sim(body)
    assert len(sim.step().creates) == trials
    return sim


def evals(points: dict[int, float]) -> list[dict[str, Any]]:
    return [
        {"step": s, "trainLoss": v + 0.1, "evalLoss": v, "evalAccuracy": 1 - v} for s, v in points.items()
    ]


def report(sim: Sim, name: str, points: dict[int, float]) -> None:
    """The trial runs and has reported these evaluations (status.progress.evaluations)."""
    sim.jobs[name]["status"] = {
        "phase": "Running",
        "progress": {"step": max(points), "evaluations": evals(points)},
    }


def succeed(sim: Sim, name: str, points: dict[int, float]) -> None:
    sim.finish(name, value=points[max(points)])
    sim.jobs[name]["status"]["progress"] = {"step": max(points), "evaluations": evals(points)}


def end_pruned(sim: Sim, name: str) -> None:
    """What the FineTuneJob controller does with the annotation: Failed, reason Pruned."""
    job = sim.jobs[name]
    message = f"pruned by its FineTuneSweep: {job['metadata']['annotations'][ANN_PRUNE]}"
    job["status"] = {
        **job["status"],
        "phase": "Failed",
        "conditions": [{"type": "Failed", "status": "True", "reason": "Pruned", "message": message}],
    }


def pruned(plan: Plan) -> dict[str, str]:
    return {n: p["metadata"]["annotations"][ANN_PRUNE] for _, n, p in plan.patches}


def trial(sim: Sim, name: str) -> dict[str, Any]:
    return next(t for t in sim.status["trials"] if t["name"] == name)


# three succeeded curves: at step 40 the median of (0.6, 0.5, 0.55) is 0.55
DONE = ({20: 0.8, 40: 0.6, 60: 0.5}, {20: 0.7, 40: 0.5, 60: 0.45}, {20: 0.9, 40: 0.55, 60: 0.5})


def test_median_prunes_a_worse_trial_past_min_steps_and_not_before():
    sim = pruning_sweep("median", min_steps=40)
    for k, points in enumerate(DONE):
        succeed(sim, f"sw-t{k}", points)
    report(sim, "sw-t3", {20: 1.5})  # far worse, but before minSteps
    report(sim, "sw-t4", {20: 0.6})
    assert sim.step().patches == []
    assert (trial(sim, "sw-t3")["intermediate"], trial(sim, "sw-t3")["intermediateStep"]) == (1.5, 20)

    report(sim, "sw-t3", {20: 1.5, 40: 0.91})
    report(sim, "sw-t4", {20: 0.6, 40: 0.5})  # better than the median: kept
    plan = sim.step()
    assert pruned(plan) == {
        "sw-t3": "median: evalLoss 0.91 (its best by step 40) is worse than the median 0.55 of 3 "
        "succeeded trials at step 40"
    }
    (event,) = plan.events
    assert (event.type, event.reason) == ("Normal", "TrialPruned") and "sw-t3" in event.message
    # annotated, not ended yet: Running, with the rule's message; not annotated twice
    assert (trial(sim, "sw-t3")["phase"], trial(sim, "sw-t3")["message"]) == (
        "Running",
        pruned(plan)["sw-t3"],
    )
    assert sim.plan().is_empty()


def test_median_waits_for_min_trials_succeeded_trials():
    sim = pruning_sweep("median", min_steps=40)
    succeed(sim, "sw-t0", DONE[0])
    succeed(sim, "sw-t1", DONE[1])
    report(sim, "sw-t2", {40: 5.0})
    assert sim.step().patches == []  # 2 succeeded trials: minTrials is 3
    succeed(sim, "sw-t3", DONE[2])
    assert list(pruned(sim.step())) == ["sw-t2"]


def test_median_with_maximize_prunes_the_lower_accuracy():
    sim = pruning_sweep("median", min_steps=40, objective={"metric": "evalAccuracy", "goal": "maximize"})
    for k, points in enumerate(DONE):
        succeed(sim, f"sw-t{k}", points)
    report(sim, "sw-t3", {40: 0.6})  # accuracy 0.4 < median 0.45
    report(sim, "sw-t4", {40: 0.5})  # accuracy 0.5: kept
    assert pruned(sim.step()) == {
        "sw-t3": "median: evalAccuracy 0.4 (its best by step 40) is worse than the median 0.45 of 3 "
        "succeeded trials at step 40"
    }


def test_none_never_prunes():
    body = sweep_body(template={"spec": copy.deepcopy(EVAL_TEMPLATE)}, maxTrials=5, parallelTrials=5)
    sim = Sim(body)
    sim.step()
    for k, points in enumerate(DONE):
        succeed(sim, f"sw-t{k}", points)
    report(sim, "sw-t3", {40: 99.0, 60: 99.0})
    plan = sim.step()
    assert plan.patches == [] and not [e for e in plan.events if e.reason == "TrialPruned"]
    assert trial(sim, "sw-t3")["intermediate"] == 99.0


def test_a_pruned_trial_is_finished_not_failed_and_its_place_is_taken():
    sim = pruning_sweep("median", min_steps=40, trials=4, maxFailedTrials=1)
    for k, points in enumerate(DONE):
        succeed(sim, f"sw-t{k}", points)
    report(sim, "sw-t3", {40: 2.0})
    sim.step()
    end_pruned(sim, "sw-t3")
    sim.body["spec"]["maxTrials"] = 5
    plan = sim.step()
    t3 = trial(sim, "sw-t3")
    assert t3["phase"] == "Pruned" and t3["message"].startswith("median: evalLoss 2 ")
    assert (t3["intermediate"], t3["intermediateStep"]) == (2.0, 40)
    # maxFailedTrials 1: a pruned trial is not a failure; it counts as finished toward maxTrials
    assert sim.status["phase"] == "Running" and sim.status["finishedTrials"] == 4
    assert [c["metadata"]["name"] for c in plan.creates] == ["sw-t4"]
    succeed(sim, "sw-t4", {40: 0.4})
    sim.step()
    assert sim.status["phase"] == "Succeeded" and sim.status["best"]["trial"] == "sw-t4"


def test_restart_with_a_pruned_trial_in_status_keeps_it_pruned():
    sim = pruning_sweep("median", min_steps=40)
    for k, points in enumerate(DONE):
        succeed(sim, f"sw-t{k}", points)
    report(sim, "sw-t3", {40: 2.0})
    sim.step()
    end_pruned(sim, "sw-t3")
    sim.step()
    before = copy.deepcopy(sim.status)
    assert trial(sim, "sw-t3")["phase"] == "Pruned" and sim.status["phase"] == "Running"
    # a restarted operator: same sweep, same trials, nothing to do
    fresh = Sim(copy.deepcopy(sim.body))
    fresh.jobs = copy.deepcopy(sim.jobs)
    assert fresh.plan().is_empty()
    # its FineTuneJob deleted: status.trials keeps it Pruned, with its last value for the sampler
    sim.jobs.pop("sw-t3")
    assert sim.plan().is_empty() and sim.status == before


def test_a_trial_being_pruned_whose_job_is_gone_is_pruned_and_a_finished_one_keeps_its_result():
    sim = pruning_sweep("median", min_steps=40)
    for k, points in enumerate(DONE):
        succeed(sim, f"sw-t{k}", points)
    report(sim, "sw-t3", {40: 2.0})
    report(sim, "sw-t4", {40: 3.0})
    assert sorted(pruned(sim.step())) == ["sw-t3", "sw-t4"]
    sim.jobs.pop("sw-t3")  # gone before it ended
    succeed(sim, "sw-t4", {40: 3.0, 60: 0.3})  # finished before it saw the annotation
    sim.step()
    assert trial(sim, "sw-t3")["phase"] == "Pruned"
    assert (trial(sim, "sw-t4")["phase"], trial(sim, "sw-t4")["objective"]) == ("Succeeded", 0.3)
    assert sim.status["phase"] == "Succeeded" and sim.status["best"]["trial"] == "sw-t4"


def test_asha_prunes_outside_the_best_third_of_a_rung():
    # rungs at steps 10, 30, 90 (reduction factor 3)
    sim = pruning_sweep("asha", min_steps=10, trials=5)
    report(sim, "sw-t0", {5: 9.0})  # before the first rung: never judged
    assert sim.step().patches == []
    report(sim, "sw-t0", {10: 0.4})  # the first at rung 0 is promoted
    assert sim.step().patches == []
    report(sim, "sw-t1", {10: 0.5})
    report(sim, "sw-t2", {10: 0.6})
    report(sim, "sw-t3", {10: 0.7})
    plan = sim.step()
    # each judged against every other trial's rung-0 value: only the best 1 of 4 (0.4) goes on
    assert sorted(pruned(plan)) == ["sw-t1", "sw-t2", "sw-t3"]
    assert pruned(plan)["sw-t3"] == (
        "asha: evalLoss 0.7 at step 10 is not in the best 1 of 4 trials at rung 0 (step 10; cutoff 0.4)"
    )
    # t0 passed rung 0 when it reached it: later and better trials there do not re-judge it
    report(sim, "sw-t4", {10: 0.1})
    report(sim, "sw-t0", {10: 0.4, 20: 0.4})
    assert "sw-t0" not in pruned(sim.step())
    # at rung 1 (step 30) it competes again
    report(sim, "sw-t4", {10: 0.1, 30: 0.05})
    sim.step()
    report(sim, "sw-t0", {10: 0.4, 20: 0.4, 30: 0.3})
    assert pruned(sim.step()) == {
        "sw-t0": "asha: evalLoss 0.3 at step 30 is not in the best 1 of 2 trials at rung 1 (step 30; cutoff 0.05)"
    }


def test_asha_judges_every_rung_reached_since_the_last_pass():
    sim = pruning_sweep("asha", min_steps=10, trials=3)
    report(sim, "sw-t0", {10: 0.1, 30: 0.1})
    report(sim, "sw-t1", {10: 0.2, 30: 0.9})
    sim.step()
    # t2's first seen report is already past rungs 0 and 1: rung 0 promotes it (0.15 among 0.1, 0.2),
    # rung 1 does not (the best 1 of 3 at step 30 is 0.1)
    report(sim, "sw-t2", {10: 0.15, 30: 0.15})
    assert list(pruned(sim.step())) == ["sw-t2"]


def test_pruning_is_deterministic_and_order_free():
    def build() -> Sim:
        sim = pruning_sweep("median", min_steps=40)
        for k, points in enumerate(DONE):
            succeed(sim, f"sw-t{k}", points)
        report(sim, "sw-t3", {20: 1.0, 40: 0.7})
        report(sim, "sw-t4", {20: 1.0, 40: 0.56})
        return sim

    a, b = build(), build()
    b.jobs = dict(reversed(list(b.jobs.items())))
    plan_a, plan_b = a.plan(), b.plan()
    assert plan_a.patches == plan_b.patches and plan_a.status == plan_b.status
    assert sorted(pruned(plan_a)) == ["sw-t3", "sw-t4"]
    assert plan_a.patches == a.plan().patches


def test_the_sampler_sees_a_pruned_trial_as_pruned_with_its_curve():
    from optuna.trial import TrialState

    from tauon.reconcile.finetunesweep import _frozen, collect, distribution

    sim = pruning_sweep("median", min_steps=40, trials=4)
    for k, points in enumerate(DONE):
        succeed(sim, f"sw-t{k}", points)
    report(sim, "sw-t3", {20: 3.0, 40: 2.0})
    sim.step()
    end_pruned(sim, "sw-t3")
    sweep = FineTuneSweep.model_validate(sim.body)
    p = collect(sweep, Observed(trials=list(sim.jobs.values())))
    dists = {q.name: distribution(q) for q in sweep.spec.parameters}
    frozen = {k: _frozen(t, dists) for k, t in p.trials.items()}
    assert frozen[3] is not None and frozen[3].state == TrialState.PRUNED
    assert frozen[3].intermediate_values == {20: 3.0, 40: 2.0}
    assert frozen[0] is not None and frozen[0].state == TrialState.COMPLETE and frozen[0].value == 0.5


def test_curve_reads_only_sound_evaluations():
    from tauon.reconcile.finetunesweep import curve

    body = {
        "status": {
            "progress": {
                "evaluations": [
                    {"step": 10, "evalLoss": 0.5},
                    {"step": 20, "evalLoss": None},
                    {"step": 30, "evalLoss": float("nan")},
                    {"step": "40", "evalLoss": 0.4},
                    {"step": True, "evalLoss": 0.4},
                    {"step": -1, "evalLoss": 0.4},
                    "junk",
                    {"step": 50, "evalLoss": 0.3},
                    {"step": 50, "evalLoss": 0.35},
                ]
            }
        }
    }
    assert curve(body, "evalLoss") == {10: 0.5, 50: 0.35}
    assert curve(body, "evalAccuracy") == {}
    assert curve({"status": {"progress": {"evaluations": "x"}}}, "evalLoss") == {}
