"""FineTuneSweep admission: the pydantic rules (which the operator applies too) and the CEL rules and printer
columns of the generated CRD; the shipped example is valid."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tauon.api.crds import all_crds
from tauon.api.finetunesweep import SWEEP_NAME_MAX, FineTuneSweep, FineTuneSweepSpec, grid_point
from tests.kube import REPO

TEMPLATE: dict[str, Any] = {
    "model": {"source": "hf://org/model", "task": "sequence-classification", "numLabels": 2},
    "dataset": {"source": "file:///data/train.jsonl"},
    "method": {"type": "lora"},
    "output": {"storage": "file:///out/sweep"},
}
LR = {"name": "learningRate", "type": "float", "min": 1e-5, "max": 1e-3, "log": True}


def spec(*parameters: dict[str, Any], template: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "template": {"spec": copy.deepcopy(template or TEMPLATE)},
        "parameters": list(parameters) or [LR],
        **extra,
    }


def ok(s: dict[str, Any]) -> FineTuneSweepSpec:
    return FineTuneSweepSpec.model_validate(s)


def refused(s: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as e:
        FineTuneSweepSpec.model_validate(s)
    assert words in str(e.value), str(e.value)


def test_the_example_is_valid():
    body = yaml.safe_load((REPO / "examples" / "sweep-lr.yaml").read_text())
    sweep = FineTuneSweep.model_validate(body)
    assert sweep.kind == "FineTuneSweep" and len(sweep.metadata.name) <= SWEEP_NAME_MAX
    assert {p.name for p in sweep.spec.parameters} == {"learningRate", "method.lora.rank"}
    assert sweep.spec.parallel_trials <= sweep.spec.max_trials


def test_defaults():
    s = ok(spec())
    assert (s.objective.metric, s.objective.goal) == ("evalLoss", "minimize")
    assert (s.algorithm.type, s.algorithm.seed, s.early_stopping.type) == ("tpe", 0, "none")
    assert (s.max_trials, s.parallel_trials, s.max_failed_trials) == (10, 1, 3)


@pytest.mark.parametrize(
    "param",
    [
        {"name": "hyperparameters.learningRate", "type": "float", "min": 1e-5, "max": 1e-3},
        {"name": "batchSizePerDevice", "type": "categorical", "values": [8, 16]},
        {"name": "batchSizePerDevice", "type": "int", "min": 4, "max": 32, "log": True},
        {"name": "precision", "type": "categorical", "values": ["fp32", "bf16"]},
        {"name": "method.lora.r", "type": "int", "values": [8, 16, 32]},
        {"name": "method.lora.dropout", "type": "float", "min": 0.0, "max": 0.2},
        {"name": "warmupRatio", "type": "float", "values": [0.0, 0.1]},
    ],
)
def test_parameters_that_set_real_fields_are_accepted(param: dict[str, Any]):
    ok(spec(param))


@pytest.mark.parametrize(
    ("param", "words"),
    [
        ({"name": "learningRat", "type": "float", "min": 0.1, "max": 0.2}, "not a sweepable field"),
        ({"name": "model.source", "type": "categorical", "values": ["a"]}, "not a sweepable field"),
        ({"name": "method.lora.targetModules", "type": "categorical", "values": ["q"]}, "not a sweepable"),
        ({"name": "learningRate", "type": "float", "min": 1e-3, "max": 1e-5}, "min must be less than max"),
        ({"name": "learningRate", "type": "float", "min": 1e-3, "max": 1e-3}, "min must be less than max"),
        ({"name": "weightDecay", "type": "float", "min": 0.0, "max": 0.1, "log": True}, "min > 0"),
        ({"name": "learningRate", "type": "float", "min": 1e-5}, "either values, or min and max"),
        (
            {"name": "learningRate", "type": "float", "min": 1e-5, "max": 1e-3, "values": [1e-4]},
            "either values",
        ),
        (
            {"name": "precision", "type": "categorical", "min": 1, "max": 2},
            "categorical parameter needs values",
        ),
        ({"name": "batchSizePerDevice", "type": "int", "min": 1.5, "max": 8}, "integer min and max"),
        ({"name": "batchSizePerDevice", "type": "int", "values": [8, 8.5]}, "are integers"),
        ({"name": "batchSizePerDevice", "type": "float", "min": 4, "max": 8}, "swept with type int"),
        ({"name": "precision", "type": "float", "min": 1, "max": 2}, "swept with type categorical"),
        ({"name": "precision", "type": "categorical", "values": ["fp8"]}, "not a valid value"),
        ({"name": "learningRate", "type": "float", "min": 0.1, "max": 2.0}, "not a valid value"),
        ({"name": "method.lora.rank", "type": "int", "min": 1, "max": 5000}, "not a valid value"),
        ({"name": "learningRate", "type": "float", "values": [1e-4, 1e-4]}, "distinct"),
        ({"name": "learningRate", "type": "float", "values": ["fast"]}, "are numbers"),
    ],
)
def test_parameters_that_cannot_set_their_field_are_refused(param: dict[str, Any], words: str):
    refused(spec(param), words)


def test_lora_parameters_need_a_lora_template():
    full = {**TEMPLATE, "method": {"type": "full"}}
    refused(
        spec({"name": "method.lora.rank", "type": "int", "values": [8]}, template=full), "method.type lora"
    )


def test_two_names_for_one_field_are_refused():
    refused(
        spec(LR, {"name": "hyperparameters.learningRate", "type": "float", "values": [1e-4]}), "same field"
    )


def test_parallel_trials_within_max_trials():
    ok(spec(maxTrials=2, parallelTrials=2))
    refused(spec(maxTrials=2, parallelTrials=3), "parallelTrials must not exceed maxTrials")
    refused(spec(parallelTrials=0), "greater than or equal to 1")


def test_objective_must_be_reported_for_the_task():
    causal = {**TEMPLATE, "model": {"source": "hf://org/model", "task": "causal-lm"}}
    causal["method"] = {"type": "full"}
    refused(
        spec(template=causal, objective={"metric": "evalAccuracy", "goal": "maximize"}),
        "sequence-classification",
    )
    ok(spec(template=causal, objective={"metric": "evalLoss"}))
    no_eval = {**TEMPLATE, "dataset": {"source": "file:///d.jsonl", "validationSplit": 0}}
    refused(spec(template=no_eval), "validationSplit > 0")
    ok(spec(template=no_eval, objective={"metric": "trainLoss"}))
    refused(spec(objective={"metric": "evalPerplexity"}), "objective.metric")


def test_grid_needs_finite_parameters():
    refused(spec(LR, algorithm={"type": "grid"}), "finite parameters")
    s = ok(
        spec(
            {"name": "learningRate", "type": "float", "values": [1e-4, 1e-3]},
            {"name": "batchSizePerDevice", "type": "int", "min": 8, "max": 9},
            algorithm={"type": "grid"},
        )
    )
    assert [grid_point(s.parameters, k) for k in range(5)] == [
        {"learningRate": 1e-4, "batchSizePerDevice": 8},
        {"learningRate": 1e-4, "batchSizePerDevice": 9},
        {"learningRate": 1e-3, "batchSizePerDevice": 8},
        {"learningRate": 1e-3, "batchSizePerDevice": 9},
        None,
    ]
    refused(
        spec({"name": "seed", "type": "int", "min": 0, "max": 20000}, algorithm={"type": "grid"}), "more than"
    )


EVAL_TEMPLATE = {**TEMPLATE, "hyperparameters": {"evalEverySteps": 10}}


def test_early_stopping_is_validated():
    s = ok(spec(template=EVAL_TEMPLATE, earlyStopping={"type": "median", "minSteps": 20}))
    assert (s.early_stopping.min_steps, s.early_stopping.min_trials) == (20, 3)
    refused(spec(template=EVAL_TEMPLATE, earlyStopping={"type": "hyperband"}), "earlyStopping.type")
    refused(
        spec(template=EVAL_TEMPLATE, earlyStopping={"type": "asha", "minSteps": 0}),
        "greater than or equal to 1",
    )
    refused(spec(template=EVAL_TEMPLATE, earlyStopping={"type": "median", "minTrials": 0}), "minTrials")


@pytest.mark.parametrize("rule", ["median", "asha"])
def test_early_stopping_needs_periodic_evaluations(rule: str):
    refused(spec(earlyStopping={"type": rule}), "spec.template.spec.hyperparameters.evalEverySteps")
    ok(spec(earlyStopping={"type": "none"}))
    # a parameter that sets evalEverySteps does it too
    ok(spec(LR, {"name": "evalEverySteps", "type": "int", "values": [5, 10]}, earlyStopping={"type": rule}))
    ok(
        spec(
            LR,
            {"name": "hyperparameters.evalEverySteps", "type": "int", "min": 5, "max": 9},
            earlyStopping={"type": rule},
        )
    )


# -- the CRD ---------------------------------------------------------------------------------------------


def crd() -> dict[str, Any]:
    return all_crds()["finetunesweeps.tauon.dev.yaml"]


def rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_crd_names_and_columns():
    spec_ = crd()["spec"]
    assert spec_["names"]["shortNames"] == ["ftsweep"] and spec_["names"]["categories"] == ["tauon", "ml"]
    version = spec_["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:4] == [
        "Phase",
        "Trials",
        "Best",
        "Objective",
    ]
    assert version["subresources"] == {"status": {}}


def test_crd_rules_mirror_the_pydantic_ones():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert any(f"size(self.metadata.name) <= {SWEEP_NAME_MAX}" in r for r in rules(schema))
    spec_ = schema["properties"]["spec"]
    text = " ".join(rules(spec_))
    for needle in (
        "self.parallelTrials <= self.maxTrials",
        "'grid'",
        "evalAccuracy",
        "validationSplit",
        "method.lora.",
        "self.earlyStopping.type == 'none'",
        "has(self.template.spec.hyperparameters.evalEverySteps)",
        "p.name == 'hyperparameters.evalEverySteps'",
    ):
        assert needle in text
    assert "oldSelf.parameters" in text and "oldSelf.template" not in text  # template: the job's own rules
    param = spec_["properties"]["parameters"]["items"]
    assert "learningRate" in param["properties"]["name"]["enum"]
    assert "method.lora.rank" in param["properties"]["name"]["enum"]
    assert any("self.min < self.max" in r for r in rules(param))
    assert spec_["properties"]["parameters"]["maxItems"] >= 1
    template = spec_["properties"]["template"]["properties"]["spec"]
    assert template["required"] == ["model", "dataset", "output"]


# -- metrics ---------------------------------------------------------------------------------------------


def test_sweep_gauges_follow_the_sweeps(monkeypatch: pytest.MonkeyPatch):
    from tauon import metrics
    from tauon.handlers import finetunesweep
    from tauon.handlers import indexes as ix
    from tauon.handlers.runtime import RT

    def body(name: str, phases: list[str], best: float | None) -> dict[str, Any]:
        status: dict[str, Any] = {
            "trials": [{"name": f"{name}-t{k}", "phase": p} for k, p in enumerate(phases)]
        }
        if best is not None:
            status["best"] = {"trial": f"{name}-t0", "objective": best}
        return {"metadata": {"name": name, "namespace": "ns", "uid": name}, "status": status}

    idx = ix.Indexes()
    idx.capture(
        {
            ix.FTS: {
                ("ns", "a"): [body("a", ["Succeeded", "Running"], 0.25)],
                ("ns", "b"): [body("b", ["Running"], None)],
            }
        }
    )
    monkeypatch.setattr(RT, "indexes", idx)
    finetunesweep.update_gauges()
    reg = metrics.REGISTRY
    assert reg.get_sample_value("tauon_finetunesweep_trials", {"namespace": "ns", "phase": "Running"}) == 2
    assert reg.get_sample_value("tauon_finetunesweep_trials", {"namespace": "ns", "phase": "Succeeded"}) == 1
    assert (
        reg.get_sample_value("tauon_finetunesweep_best_objective", {"namespace": "ns", "name": "a"}) == 0.25
    )
    assert (
        reg.get_sample_value("tauon_finetunesweep_best_objective", {"namespace": "ns", "name": "b"}) is None
    )
    idx2 = ix.Indexes()
    idx2.capture({ix.FTS: {}})
    monkeypatch.setattr(RT, "indexes", idx2)
    finetunesweep.update_gauges()  # the sweeps are gone: so are their series
    assert (
        reg.get_sample_value("tauon_finetunesweep_best_objective", {"namespace": "ns", "name": "a"}) is None
    )
    assert reg.get_sample_value("tauon_finetunesweep_trials", {"namespace": "ns", "phase": "Running"}) is None
