"""The generated CRDs on a real kube-apiserver: every admission rule of docs/api.md, explain, printer columns."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.kube import REPO, Cluster

pytestmark = pytest.mark.cluster


def ftj(**spec_overrides: Any) -> dict:
    obj = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "ok"},
        "spec": {
            "model": {"source": "pvc://models/minilm", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "pvc://data/train.jsonl", "labelField": "label"},
            "output": {"storage": "pvc://models/out"},
            "numNodes": 2,
        },
    }
    obj["spec"].update(spec_overrides)
    return obj


def tis(**spec_overrides: Any) -> dict:
    obj = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "ok"},
        "spec": {"model": {"source": "pvc://models/minilm"}},
    }
    obj["spec"].update(spec_overrides)
    return obj


def with_(base: dict, path: str, value: Any) -> dict:
    """Copy of base with the dotted path set (value DELETE removes it)."""
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = obj
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return obj


DELETE = object()
CAUSAL = {"source": "pvc://models/gpt", "task": "causal-lm"}
SCRATCH = {
    "init": "scratch",
    "task": "causal-lm",
    "config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2},
    "tokenizer": "pvc://models/tok",
}
NO_LABEL = {"source": "pvc://data/train.jsonl"}


def causal(**dataset: Any) -> dict:
    """A causal-lm job with the given dataset fields."""
    return with_(with_(ftj(), "spec.model", CAUSAL), "spec.dataset", {**NO_LABEL, **dataset})


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# (id, manifest, expected substring of the API server's error)
INVALID: list[tuple[str, dict, str]] = [
    ("name-too-long", with_(ftj(), "metadata.name", "a" * 41), "metadata.name must be a DNS-1035 label"),
    (
        "name-starts-with-digit",
        with_(ftj(), "metadata.name", "1job"),
        "metadata.name must be a DNS-1035 label",
    ),
    ("name-with-dot", with_(ftj(), "metadata.name", "job.v2"), "metadata.name must be a DNS-1035 label"),
    ("model-source-scheme", with_(ftj(), "spec.model.source", "s3://bucket/m"), "spec.model.source"),
    ("model-task-enum", with_(ftj(), "spec.model.task", "translation"), 'Unsupported value: "translation"'),
    (
        "numlabels-required",
        with_(ftj(), "spec.model.numLabels", DELETE),
        "spec.model.numLabels is required when task is sequence-classification",
    ),
    (
        "numlabels-forbidden-causal",
        with_(ftj(), "spec.model", {**CAUSAL, "numLabels": 2}),
        "spec.model.numLabels must not be set when task is causal-lm",
    ),
    ("numlabels-min", with_(ftj(), "spec.model.numLabels", 1), "spec.model.numLabels"),
    ("dataset-hf-scheme", with_(ftj(), "spec.dataset.source", "hf://org/data"), "spec.dataset.source"),
    ("dataset-format-enum", with_(ftj(), "spec.dataset.format", "xml"), 'Unsupported value: "xml"'),
    (
        "labelfield-forbidden-causal",
        with_(with_(ftj(), "spec.model", CAUSAL), "spec.dataset.labelField", "label"),
        "spec.dataset.labelField must not be set when spec.model.task is causal-lm",
    ),
    (
        "validation-split-max",
        with_(ftj(), "spec.dataset.validationSplit", 1.0),
        "spec.dataset.validationSplit",
    ),
    (
        "validation-split-min",
        with_(ftj(), "spec.dataset.validationSplit", -0.1),
        "spec.dataset.validationSplit",
    ),
    (
        "lora-without-type",
        with_(ftj(), "spec.method", {"type": "full", "lora": {"r": 8}}),
        "spec.method.lora is only allowed when spec.method.type is lora",
    ),
    ("method-type-enum", with_(ftj(), "spec.method", {"type": "qlora"}), 'Unsupported value: "qlora"'),
    (
        "lora-dropout",
        with_(ftj(), "spec.method", {"type": "lora", "lora": {"dropout": 1}}),
        "spec.method.lora.dropout",
    ),
    ("epochs-min", with_(ftj(), "spec.hyperparameters", {"epochs": 0}), "spec.hyperparameters.epochs"),
    ("maxsteps-min", with_(ftj(), "spec.hyperparameters", {"maxSteps": 0}), "spec.hyperparameters.maxSteps"),
    (
        "batch-min",
        with_(ftj(), "spec.hyperparameters", {"batchSizePerDevice": 0}),
        "spec.hyperparameters.batchSizePerDevice",
    ),
    (
        "accum-min",
        with_(ftj(), "spec.hyperparameters", {"gradientAccumulationSteps": 0}),
        "spec.hyperparameters.gradientAccumulationSteps",
    ),
    (
        "lr-zero",
        with_(ftj(), "spec.hyperparameters", {"learningRate": 0}),
        "spec.hyperparameters.learningRate",
    ),
    (
        "lr-one",
        with_(ftj(), "spec.hyperparameters", {"learningRate": 1}),
        "spec.hyperparameters.learningRate",
    ),
    (
        "weight-decay-negative",
        with_(ftj(), "spec.hyperparameters", {"weightDecay": -0.1}),
        "spec.hyperparameters.weightDecay",
    ),
    (
        "warmup-max",
        with_(ftj(), "spec.hyperparameters", {"warmupRatio": 1}),
        "spec.hyperparameters.warmupRatio",
    ),
    (
        "seq-len-min",
        with_(ftj(), "spec.hyperparameters", {"maxSeqLength": 4}),
        "spec.hyperparameters.maxSeqLength",
    ),
    (
        "seq-len-max",
        with_(ftj(), "spec.hyperparameters", {"maxSeqLength": 40000}),
        "spec.hyperparameters.maxSeqLength",
    ),
    (
        "precision-enum",
        with_(ftj(), "spec.hyperparameters", {"precision": "int8"}),
        'Unsupported value: "int8"',
    ),
    ("output-hf-scheme", with_(ftj(), "spec.output.storage", "hf://org/out"), "spec.output.storage"),
    (
        "checkpoint-min",
        with_(ftj(), "spec.output.checkpointEverySteps", 0),
        "spec.output.checkpointEverySteps",
    ),
    ("nodes-min", with_(ftj(), "spec.numNodes", 0), "spec.numNodes"),
    ("nodes-max", with_(ftj(), "spec.numNodes", 1025), "spec.numNodes"),
    (
        "nproc-word",
        with_(ftj(), "spec.nprocPerNode", "all"),
        "spec.nprocPerNode must be 'auto' or an integer >= 1",
    ),
    (
        "nproc-zero",
        with_(ftj(), "spec.nprocPerNode", 0),
        "spec.nprocPerNode must be 'auto' or an integer >= 1",
    ),
    (
        "env-world-size",
        with_(ftj(), "spec.env", [{"name": "WORLD_SIZE", "value": "4"}]),
        "env name WORLD_SIZE is reserved",
    ),
    (
        "env-pet-prefix",
        with_(ftj(), "spec.env", [{"name": "PET_NNODES", "value": "1"}]),
        "env name PET_NNODES is reserved",
    ),
    (
        "env-master-prefix",
        with_(ftj(), "spec.env", [{"name": "MASTER_ADDR", "value": "x"}]),
        "env name MASTER_ADDR is reserved",
    ),
    (
        "env-tauon-prefix",
        with_(ftj(), "spec.env", [{"name": "TAUON_DIST_BACKEND", "value": "x"}]),
        "env name TAUON_DIST_BACKEND is reserved",
    ),
    ("backoff-max", with_(ftj(), "spec.runPolicy", {"backoffLimit": 101}), "spec.runPolicy.backoffLimit"),
    (
        "deadline-min",
        with_(ftj(), "spec.runPolicy", {"activeDeadlineSeconds": 0}),
        "spec.runPolicy.activeDeadlineSeconds",
    ),
    (
        "ttl-min",
        with_(ftj(), "spec.runPolicy", {"ttlSecondsAfterFinished": -1}),
        "spec.runPolicy.ttlSecondsAfterFinished",
    ),
    ("unknown-field", with_(ftj(), "spec.epochs", 3), 'unknown field "spec.epochs"'),
    (
        "tis-both-models",
        with_(tis(), "spec.model", {"source": "pvc://m/x", "fineTuneJobRef": {"name": "a"}}),
        "exactly one of model.fineTuneJobRef, model.fineTuneSweepRef and model.source must be set",
    ),
    (
        "tis-no-model",
        with_(tis(), "spec.model", {"task": "causal-lm"}),
        "exactly one of model.fineTuneJobRef, model.fineTuneSweepRef and model.source must be set",
    ),
    ("tis-name", with_(tis(), "metadata.name", "Bad_Name"), "metadata.name"),
    ("tis-replicas-min", with_(tis(), "spec.replicas", -1), "spec.replicas"),
    (
        "tis-autoscaling-min-max",
        with_(tis(), "spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
        "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
    ),
    (
        "tis-cpu-target",
        with_(tis(), "spec.autoscaling", {"maxReplicas": 2, "targetCPUUtilizationPercentage": 0}),
        "spec.autoscaling.targetCPUUtilizationPercentage",
    ),
    (
        "tis-traffic-max",
        with_(tis(), "spec.canary", {"model": {"source": "pvc://m/y"}, "trafficPercent": 101}),
        "spec.canary.trafficPercent",
    ),
    (
        "tis-canary-model",
        with_(tis(), "spec.canary", {"model": {}, "trafficPercent": 10}),
        "exactly one of model.fineTuneJobRef, model.fineTuneSweepRef and model.source must be set",
    ),
    ("tis-batch-min", with_(tis(), "spec.batching", {"maxBatchSize": 0}), "spec.batching.maxBatchSize"),
    (
        "tis-env-reserved",
        with_(tis(), "spec.env", [{"name": "TAUON_PORT", "value": "1"}]),
        "env name TAUON_PORT is reserved",
    ),
    # -- large models (LARGE-MODELS.md "Rules") --
    (
        "scratch-needs-config",
        with_(with_(ftj(), "spec.model", without(SCRATCH, "config")), "spec.dataset", NO_LABEL),
        "spec.model.config (a Hugging Face config) is required when spec.model.init is scratch",
    ),
    (
        "scratch-needs-tokenizer",
        with_(with_(ftj(), "spec.model", without(SCRATCH, "tokenizer")), "spec.dataset", NO_LABEL),
        "spec.model.tokenizer is required when spec.model.init is scratch",
    ),
    (
        "scratch-forbids-lora",
        with_(
            with_(with_(ftj(), "spec.model", SCRATCH), "spec.dataset", NO_LABEL),
            "spec.method",
            {"type": "lora"},
        ),
        "spec.method.type lora is not allowed when spec.model.init is scratch",
    ),
    (
        "config-with-pretrained",
        with_(ftj(), "spec.model.config", {"hidden_size": 64}),
        "spec.model.config is only allowed when spec.model.init is scratch",
    ),
    (
        "config-with-explicit-pretrained",
        with_(with_(ftj(), "spec.model.init", "pretrained"), "spec.model.config", {"hidden_size": 64}),
        "spec.model.config is only allowed when spec.model.init is scratch",
    ),
    (
        "source-required-when-pretrained",
        with_(ftj(), "spec.model.source", DELETE),
        "spec.model.source is required unless spec.model.init is scratch",
    ),
    ("init-enum", with_(ftj(), "spec.model.init", "random"), 'Unsupported value: "random"'),
    (
        "chat-needs-causal",
        with_(ftj(), "spec.dataset.type", "chat"),
        "spec.dataset.type chat and prompt-completion need spec.model.task causal-lm",
    ),
    (
        "prompt-completion-needs-causal",
        with_(ftj(), "spec.dataset.type", "prompt-completion"),
        "spec.dataset.type chat and prompt-completion need spec.model.task causal-lm",
    ),
    (
        "packing-needs-causal",
        with_(ftj(), "spec.dataset.packing", True),
        "spec.dataset.packing needs spec.model.task causal-lm",
    ),
    ("dataset-type-enum", causal(type="dpo"), 'Unsupported value: "dpo"'),
    (
        "messages-field-with-text",
        causal(messagesField="conv"),
        "spec.dataset.messagesField is only allowed when spec.dataset.type is chat",
    ),
    (
        "prompt-field-with-chat",
        causal(type="chat", promptField="q"),
        "spec.dataset.promptField is only allowed when spec.dataset.type is prompt-completion",
    ),
    (
        "completion-field-with-text",
        causal(type="text", completionField="a"),
        "spec.dataset.completionField is only allowed when spec.dataset.type is prompt-completion",
    ),
    (
        "text-field-with-chat",
        causal(type="chat", textField="body"),
        "spec.dataset.textField is only allowed when spec.dataset.type is text",
    ),
    ("strategy-enum", with_(ftj(), "spec.parallelism", {"strategy": "tp"}), 'Unsupported value: "tp"'),
    (
        "grace-period-min",
        with_(ftj(), "spec.runPolicy", {"terminationGracePeriodSeconds": 0}),
        "spec.runPolicy.terminationGracePeriodSeconds",
    ),
    # -- sources: no `.`, `..` or empty path segments (issue 13) --
    (
        "output-dotdot",
        with_(ftj(), "spec.output.storage", "pvc://claim/../../tmp/x"),
        'spec.output.storage: empty, "." and ".." path segments are not allowed (got pvc://claim/../../tmp/x)',
    ),
    (
        "output-trailing-slash",
        with_(ftj(), "spec.output.storage", "pvc://claim/out/"),
        "spec.output.storage: empty",
    ),
    (
        "dataset-empty-segment",
        with_(ftj(), "spec.dataset.source", "pvc://data//train.jsonl"),
        "spec.dataset.source: empty",
    ),
    ("model-dot-segment", with_(ftj(), "spec.model.source", "pvc://models/./m"), "spec.model.source: empty"),
    (
        "model-file-dotdot",
        with_(ftj(), "spec.model.source", "file:///models/../etc"),
        "spec.model.source: empty",
    ),
    (
        "model-relative-dotdot",
        with_(ftj(), "spec.model.source", "file://./../outside"),
        "spec.model.source: empty",
    ),
    (
        "tokenizer-dotdot",
        with_(ftj(), "spec.model.tokenizer", "pvc://models/a/.."),
        "spec.model.tokenizer: empty",
    ),
    (
        "tis-source-dotdot",
        with_(tis(), "spec.model.source", "pvc://models/../secrets"),
        "model.source: empty",
    ),
    (
        "tis-canary-source-dotdot",
        with_(tis(), "spec.canary", {"model": {"source": "pvc://m/a/../b"}, "trafficPercent": 10}),
        "model.source: empty",
    ),
    # -- tauon.dev/ keys are the operator's (issue 13, SSRF) --
    (
        "pod-annotation-tauon-key",
        with_(
            ftj(), "spec.podTemplate", {"annotations": {"tauon.dev/metrics-address": "169.254.169.254:80"}}
        ),
        "podTemplate.annotations: keys under tauon.dev/ are reserved for the operator",
    ),
    (
        "pod-label-tauon-key",
        with_(ftj(), "spec.podTemplate", {"labels": {"tauon.dev/job-name": "other"}}),
        "podTemplate.labels: keys under tauon.dev/ are reserved for the operator",
    ),
    (
        "tis-pod-annotation-tauon-key",
        with_(tis(), "spec.podTemplate", {"annotations": {"tauon.dev/x": "1"}}),
        "podTemplate.annotations: keys under tauon.dev/ are reserved for the operator",
    ),
    # -- InferenceService serving of large models --
    ("tis-runtime-enum", with_(tis(), "spec.runtime", "tgi"), 'Unsupported value: "tgi"'),
    (
        "tis-vllm-classifier",
        with_(with_(tis(), "spec.runtime", "vllm"), "spec.model.task", "sequence-classification"),
        "spec.runtime vllm serves causal-lm models only",
    ),
    (
        "tis-new-tokens-vs-length",
        with_(tis(), "spec.generation", {"maxModelLength": 512, "maxNewTokens": 512}),
        "spec.generation.maxNewTokens must be smaller than spec.generation.maxModelLength",
    ),
    (
        "tis-vllm-s3-model",
        with_(with_(tis(), "spec.model", {"source": "s3://bucket/models/llama"}), "spec.runtime", "vllm"),
        "spec.runtime vllm cannot serve s3:// models",
    ),
    (
        "tis-concurrency-min",
        with_(tis(), "spec.generation", {"maxConcurrentSequences": 0}),
        "spec.generation.maxConcurrentSequences",
    ),
    ("tis-startup-min", with_(tis(), "spec.startupTimeoutSeconds", 0), "spec.startupTimeoutSeconds"),
]

# (id, manifest): objects the rules above must NOT refuse
VALID: list[tuple[str, dict]] = [
    ("scratch-without-source", with_(with_(ftj(), "spec.model", SCRATCH), "spec.dataset", NO_LABEL)),
    (
        "scratch-with-source-fsdp",
        with_(
            with_(
                with_(ftj(), "spec.model", {**SCRATCH, "source": "pvc://models/base"}),
                "spec.dataset",
                NO_LABEL,
            ),
            "spec.parallelism",
            {"strategy": "fsdp", "activationCheckpointing": True},
        ),
    ),
    ("pretrained-with-tokenizer", with_(ftj(), "spec.model.tokenizer", "hf://org/tok")),
    ("chat-packed", causal(type="chat", messagesField="conv", packing=True)),
    ("prompt-completion", causal(type="prompt-completion", promptField="q", completionField="a")),
    ("text-field-with-text", causal(type="text", textField="body")),
    ("packing-false-classifier", with_(ftj(), "spec.dataset.packing", False)),
    ("dotted-names", with_(ftj(), "spec.output.storage", "pvc://claim/a..b/.cache/v1.2/...")),
    ("claim-root", with_(ftj(), "spec.output.storage", "pvc://claim")),
    ("relative-file", with_(ftj(), "spec.dataset.source", "file://./data/train.jsonl")),
    ("absolute-file", with_(ftj(), "spec.dataset.source", "file:///data/train.jsonl")),
    ("grace-period", with_(ftj(), "spec.runPolicy", {"terminationGracePeriodSeconds": 3600})),
    ("other-pod-keys", with_(ftj(), "spec.podTemplate", {"annotations": {"example.com/tauon.dev/x": "1"}})),
    (
        "tis-llm",
        with_(
            with_(with_(tis(), "spec.model", {"fineTuneJobRef": {"name": "pre"}}), "spec.runtime", "vllm"),
            "spec.generation",
            {"maxModelLength": 8192, "maxNewTokens": 1024, "maxConcurrentSequences": 128},
        ),
    ),
    ("tis-startup", with_(tis(), "spec.startupTimeoutSeconds", 7200)),
    # maxModelLength has no default (the model's own): a cap alone is never compared with a guess
    ("tis-new-tokens-alone", with_(tis(), "spec.generation", {"maxNewTokens": 5000})),
    ("tis-auto-s3-model", with_(tis(), "spec.model", {"source": "s3://bucket/models/llama"})),
]


def test_invalid_table_is_large_enough() -> None:
    assert len(INVALID) >= 25
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("case", "manifest", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_rejected_with_rule_message(
    cluster: Cluster, namespace: str, case: str, manifest: dict, message: str
):
    r = cluster.apply(manifest, "-n", namespace, check=False)
    assert r.returncode != 0, f"{case}: accepted but should be rejected"
    assert message in r.stderr, f"{case}: expected {message!r} in:\n{r.stderr}"


@pytest.mark.parametrize(("case", "manifest"), VALID, ids=[c[0] for c in VALID])
def test_accepted(cluster: Cluster, namespace: str, case: str, manifest: dict):
    r = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False
    )
    assert r.returncode == 0, f"{case}: refused but should be accepted:\n{r.stderr}"


def test_examples_are_accepted(cluster: Cluster, namespace: str):
    files = sorted((REPO / "examples").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        r = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(f), check=False)
        assert r.returncode == 0, f"{f.name}: {r.stderr}"


def test_immutable_spec_and_mutable_run_policy(cluster: Cluster, namespace: str):
    cluster.apply(ftj(), "-n", namespace)

    def patch(p: dict) -> Any:
        return cluster.kubectl(
            "patch", "ftj", "ok", "-n", namespace, "--type=merge", "-p", json.dumps(p), check=False
        )

    changed = patch({"spec": {"hyperparameters": {"epochs": 7}}})
    assert changed.returncode != 0 and "spec.hyperparameters: field is immutable" in changed.stderr
    added = patch({"spec": {"image": "example.com/other:1"}})
    assert added.returncode != 0 and "spec.image: field is immutable" in added.stderr
    removed = patch({"spec": {"numNodes": None}})
    assert removed.returncode != 0 and "spec.numNodes: field is immutable" in removed.stderr
    nested = patch({"spec": {"model": {"numLabels": 3}}})
    assert nested.returncode != 0 and "spec.model: field is immutable" in nested.stderr

    parallel = patch({"spec": {"parallelism": {"strategy": "fsdp"}}})
    assert parallel.returncode != 0 and "spec.parallelism: field is immutable" in parallel.stderr

    ok = patch(
        {"spec": {"runPolicy": {"suspend": True, "backoffLimit": 5, "terminationGracePeriodSeconds": 120}}}
    )
    assert ok.returncode == 0, ok.stderr
    got = cluster.get("ftj", "ok", namespace)
    assert got and got["spec"]["runPolicy"] == {
        "suspend": True,
        "backoffLimit": 5,
        "terminationGracePeriodSeconds": 120,
    }


def test_model_config_is_kept_as_written(cluster: Cluster, namespace: str):
    obj = with_(with_(ftj(), "spec.model", SCRATCH), "spec.dataset", NO_LABEL)
    obj["spec"]["model"]["config"]["rope_scaling"] = {"type": "linear", "factor": 2.0}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    obj["spec"]["podTemplate"] = {"affinity": affinity}
    cluster.apply(obj, "-n", namespace)
    got = cluster.get("ftj", "ok", namespace)
    assert got and got["spec"]["model"]["config"] == obj["spec"]["model"]["config"]
    # free-form subtrees are kept whole, not pruned below their first level
    assert got["spec"]["podTemplate"]["affinity"] == affinity


def test_explain_prints_field_descriptions(cluster: Cluster):
    out = cluster.kubectl("explain", "finetunejob.spec.hyperparameters").stdout
    assert "learningRate" in out and "Peak learning rate (AdamW)" in out
    assert "Defaults to 5e-05" in out
    out = cluster.kubectl("explain", "inferenceservice.spec.canary.trafficPercent").stdout
    assert "split by replica ratio" in out
    for path, text in (
        ("finetunejob.spec.model.init", "random weights built from config"),
        ("finetunejob.spec.model.config", "Hugging Face model config"),
        ("finetunejob.spec.parallelism.strategy", "FSDP2"),
        ("finetunejob.spec.dataset.packing", "attention never crosses"),
        ("finetunejob.status.resolved.strategy", "rank 0 reports it"),
        ("inferenceservice.spec.runtime", "vllm when the served task is causal-lm"),
        ("inferenceservice.spec.generation.maxModelLength", "Unset: the model's own"),
        ("inferenceservice.spec.startupTimeoutSeconds", "Defaults to 1800"),
        ("inferenceservice.status.openai.baseURL", "OpenAI-compatible base URL"),
    ):
        out = " ".join(cluster.kubectl("explain", path).stdout.split())  # explain wraps lines
        assert text in out, f"{path}: {out}"


def test_printer_columns_short_names_and_categories(cluster: Cluster, namespace: str):
    cluster.apply(ftj(), "-n", namespace)
    cluster.apply(tis(), "-n", namespace)
    head = cluster.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()[0].split()
    assert head == ["NAME", "PHASE", "NODES", "RESTARTS", "PROGRESS", "AGE"]
    wide = cluster.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert wide[-2:] == ["LOSS", "MODEL"]
    head = cluster.kubectl("get", "tis", "-n", namespace).stdout.splitlines()[0].split()
    assert head == ["NAME", "PHASE", "READY", "REPLICAS", "URL", "AGE"]
    both = cluster.kubectl("get", "tauon", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(both) == ["finetunejob.tauon.dev/ok", "inferenceservice.tauon.dev/ok"]
    assert cluster.kubectl("get", "ml", "-n", namespace, "-o", "name").stdout.split() == sorted(both)


def test_scale_subresource(cluster: Cluster, namespace: str):
    cluster.apply(tis(), "-n", namespace)
    cluster.kubectl("scale", "tis/ok", "--replicas=3", "-n", namespace)
    got = cluster.get("tis", "ok", namespace)
    assert got and got["spec"]["replicas"] == 3


def test_kwok_nodes_ready(cluster: Cluster):
    nodes = cluster.list("nodes")
    gpu = [n for n in nodes if n["status"]["capacity"].get("nvidia.com/gpu") == "8"]
    cpu = [n for n in nodes if "nvidia.com/gpu" not in n["status"]["capacity"]]
    assert len(gpu) >= 4 and len(cpu) >= 2
    for n in gpu + cpu:
        ready = [c for c in n["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", n["metadata"]["name"]
