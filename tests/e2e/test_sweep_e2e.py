"""End to end: a FineTuneSweep really trains its trials on the process node (`tauon node`, pods as local
processes) with the operator, prunes a deliberately bad learning rate with the median rule before its last
step, and an InferenceService serves the best trial through `spec.model.fineTuneSweepRef`.

The model is a tiny random Llama classifier built from its config (no download) on the shipped sentiment
data: a trial is tens of seconds on a CPU. The grid runs the learning rates in order, two at a time, the bad
one last, so two trials have succeeded (the median rule's minTrials) by the time it is judged; it trains
long enough (MAX_STEPS) for the operator's progress poll (every second here) to see its evaluations and stop it."""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Operator
from tests.kube import Cluster, condition, process_node, wait_until
from tests.manifests import (
    API_VERSION,
    PROCESS_NODE,
    SENTIMENT,
    TINY_LLAMA,
    TINY_TOKENIZER,
    inferenceservice,
    on_process_nodes,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NODE = "tauon-node-sweep-e2e"
GOOD_RATES = [1e-3, 3e-3, 1e-2]
BAD_RATE = 0.9  # AdamW at 0.9: the classifier never beats chance
RATES = [*GOOD_RATES, BAD_RATE]
MAX_STEPS = 600  # ~20-40 s of training a trial here; the bad one is stopped long before its end
EVAL_EVERY = 30
MIN_STEPS = 60


@pytest.fixture(scope="module")
def operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    # /progress read every second (the default 10 s would leave a short trial to finish before it is judged)
    op = Operator(cluster, tmp_path_factory.mktemp("op") / "operator.log", "--progress-period", "1")
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def node(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with process_node(cluster, NODE, tmp_path_factory.mktemp("node"), "--cpus", "8") as root:
        yield root


def sweep(name: str, out: Path) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "model": {
                        "init": "scratch",
                        "config": {**TINY_LLAMA, "num_labels": 2},
                        "tokenizer": f"file://{TINY_TOKENIZER}",
                        "task": "sequence-classification",
                        "numLabels": 2,
                    },
                    "dataset": {
                        "source": f"file://{SENTIMENT}",
                        "labelField": "label",
                        "validationSplit": 0.15,
                    },
                    "hyperparameters": {
                        "maxSteps": MAX_STEPS,
                        "batchSizePerDevice": 16,
                        "maxSeqLength": 48,
                        "precision": "fp32",
                        "evalEverySteps": EVAL_EVERY,
                    },
                    "output": {"storage": f"file://{out}"},
                    **on_process_nodes(nodes=1, backoff=0),
                }
            },
            "parameters": [{"name": "learningRate", "type": "categorical", "values": RATES}],
            "algorithm": {"type": "grid"},
            "objective": {"metric": "evalAccuracy", "goal": "maximize"},
            "earlyStopping": {"type": "median", "minSteps": MIN_STEPS, "minTrials": 2},
            "maxTrials": len(RATES),
            "parallelTrials": 2,
            "maxFailedTrials": 2,
        },
    }


def sweep_status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return (cluster.get("ftsweep", name, ns) or {}).get("status") or {}


def test_sweep_prunes_the_bad_rate_and_serves_the_best_trial(
    cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "lr"
    name = "lr"
    # the service first: it waits for the sweep
    cluster.apply(
        inferenceservice(
            "best-lr",
            model={"fineTuneSweepRef": {"name": name}},
            podTemplate={"nodeSelector": PROCESS_NODE},
        ),
        "-n",
        namespace,
    )
    cluster.apply(sweep(name, out), "-n", namespace)
    st = wait_until(
        lambda: (s := sweep_status(cluster, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
        600,
        f"sweep {name} finished\n{operator.tail()}",
        interval=2,
    )
    assert st["phase"] == "Succeeded", (st, operator.tail())
    trials = {t["name"]: t for t in st["trials"]}
    assert [t["parameters"]["learningRate"] for t in st["trials"]] == RATES, st[
        "trials"
    ]  # the grid, in order

    # the bad rate was pruned by the median rule before its last step; its FineTuneJob Failed/Pruned
    bad = f"{name}-t{RATES.index(BAD_RATE)}"
    assert trials[bad]["phase"] == "Pruned", st["trials"]
    assert "median" in (trials[bad].get("message") or ""), trials[bad]
    job = cluster.get("ftj", bad, namespace) or {}
    assert "tauon.dev/prune" in job["metadata"].get("annotations", {})
    failed = condition(job, "Failed") or {}
    assert (failed.get("status"), failed.get("reason")) == ("True", "Pruned"), job.get("status")
    progress = job["status"].get("progress") or {}
    assert 0 < progress["step"] < MAX_STEPS, progress  # stopped before its last step
    evaluations = progress.get("evaluations") or []
    assert evaluations and evaluations[-1]["step"] >= MIN_STEPS
    assert all(e["step"] % EVAL_EVERY == 0 for e in evaluations)
    assert not (out / bad / "model").exists()

    # the best trial: the highest final evalAccuracy of the trials that succeeded
    succeeded = {n: t for n, t in trials.items() if t["phase"] == "Succeeded"}
    assert succeeded and bad not in succeeded
    top = max(succeeded.values(), key=lambda t: t["objective"])
    best = st["best"]
    assert best["trial"] == top["name"] and best["objective"] == top["objective"]
    assert math.isfinite(best["objective"]) and best["objective"] > 0.5
    assert best["model"] == f"file://{out / top['name'] / 'model'}"
    for n in succeeded:  # each succeeded trial's objective is its own FineTuneJob's final metric
        metrics = (cluster.get("ftj", n, namespace) or {})["status"]["output"]["metrics"]
        assert metrics["evalAccuracy"] == trials[n]["objective"]

    # the service serves it
    wait_until(
        lambda: (condition(cluster.get("tis", "best-lr", namespace), "Ready") or {}).get("status") == "True",
        240,
        f"InferenceService Ready\n{operator.tail()}",
        interval=1,
    )
    isvc = cluster.get("tis", "best-lr", namespace) or {}
    assert isvc["status"]["model"] == {
        "source": best["model"],
        "fineTuneJob": best["trial"],
        "fineTuneSweep": name,
        "task": "sequence-classification",
    }
    ready = condition(isvc, "ModelReady") or {}
    assert ready["reason"] == "ModelResolved" and f"best trial {best['trial']}" in ready["message"]
    pod = cluster.list("pods", namespace, "tauon.dev/inference-service=best-lr")[0]
    addr = pod["metadata"]["annotations"]["tauon.dev/http-address"]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "data": ["I loved every minute of it", "terrible, broke after a day"],
                }
            ]
        }
    )
    req = urllib.request.Request(
        f"http://{addr}/v2/models/best-lr/infer",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        outputs = {o["name"]: o for o in json.loads(r.read())["outputs"]}
    labels = outputs["label"]["data"]
    assert len(labels) == 2 and all(label in (0, 1) for label in labels)
    assert len(outputs["probabilities"]["data"]) == 4
