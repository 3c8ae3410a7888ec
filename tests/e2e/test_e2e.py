"""End to end: real control plane + the operator + `tauon node` (pods as local processes). A 2-node CPU
FineTuneJob really trains (2 ranks, gloo) and an InferenceService really serves it."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import Operator
from tests.kube import Cluster, condition, process_node, wait_until
from tests.manifests import (
    MINILM_CLASSIFIER,
    PROCESS_NODE,
    SENTIMENT,
    finetunejob,
    inferenceservice,
    on_process_nodes,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NODE = "tauon-node-e2e"


@pytest.fixture(scope="module")
def operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    op = Operator(cluster, tmp_path_factory.mktemp("op") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def node(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with process_node(cluster, NODE, tmp_path_factory.mktemp("node"), "--cpus", "8") as root:
        yield root


def ftj(name: str, out: Path, backoff: int = 2, steps_every: int = 4) -> dict:
    return finetunejob(
        name,
        model=MINILM_CLASSIFIER,
        dataset={"source": f"file://{SENTIMENT}", "labelField": "label", "validationSplit": 0.15},
        hyperparameters={
            "epochs": 2,
            "batchSizePerDevice": 16,
            "learningRate": 1.0e-4,
            "maxSeqLength": 48,
            "warmupRatio": 0.1,
        },
        output={"storage": f"file://{out}", "checkpointEverySteps": steps_every},
        **on_process_nodes(nodes=2, backoff=backoff),
    )


def st(cluster: Cluster, ns: str, name: str) -> dict:
    return (cluster.get("ftj", name, ns) or {}).get("status") or {}


def wait_phase(cluster: Cluster, ns: str, name: str, phase: str, timeout: float) -> dict:
    return wait_until(
        lambda: st(cluster, ns, name) if st(cluster, ns, name).get("phase") == phase else None,
        timeout,
        f"{name} {phase} (now {st(cluster, ns, name).get('phase')})",
        interval=1,
    )


def test_train_then_serve(cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path):
    out = tmp_path / "sentiment"
    cluster.apply(ftj("sentiment", out), "-n", namespace)
    wait_phase(cluster, namespace, "sentiment", "Running", 120)
    # progress is refreshed from rank 0 while the job trains and shows in kubectl get
    prog = wait_until(
        lambda: (
            st(cluster, namespace, "sentiment").get("progress", {}).get("step")
            and st(cluster, namespace, "sentiment")["progress"]
        ),
        120,
        "status.progress",
    )
    assert prog["totalSteps"] >= prog["step"] > 0 and prog["updatedAt"] and prog["samplesPerSecond"] > 0
    final = wait_phase(cluster, namespace, "sentiment", "Succeeded", 400)
    assert final["restarts"] == 0
    assert final["output"]["model"] == f"file://{out}/model"
    assert (out / "model" / "config.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["worldSize"] == 2 and metrics["backend"] == "gloo"
    assert metrics["evalAccuracy"] > metrics["initialEvalAccuracy"]
    assert final["output"]["metrics"].get("evalAccuracy") == pytest.approx(metrics["evalAccuracy"], abs=1e-6)
    row = cluster.kubectl("get", "ftj", "sentiment", "-n", namespace).stdout.splitlines()[1].split()
    assert row[1] == "Succeeded" and row[4] == "100"

    cluster.apply(
        inferenceservice(
            "sentiment",
            model={"fineTuneJobRef": {"name": "sentiment"}},
            podTemplate={"nodeSelector": PROCESS_NODE},
        ),
        "-n",
        namespace,
    )
    wait_until(
        lambda: (
            (condition(cluster.get("tis", "sentiment", namespace), "Ready") or {}).get("status") == "True"
        ),
        240,
        "InferenceService Ready",
        interval=1,
    )
    pod = cluster.list("pods", namespace, "tauon.dev/inference-service=sentiment")[0]
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
        f"http://{addr}/v2/models/sentiment/infer",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        outputs = {o["name"]: o for o in json.loads(r.read())["outputs"]}
    assert outputs["label"]["data"] == [1, 0]
    assert len(outputs["probabilities"]["data"]) == 4


def test_deleted_pod_restarts_gang_and_resumes(
    cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path
):
    out = tmp_path / "resume"
    cluster.apply(ftj("resume", out, steps_every=3), "-n", namespace)
    wait_until(
        lambda: (
            any((out / "checkpoints").glob("step-*/complete")) if (out / "checkpoints").exists() else False
        ),
        300,
        "a complete checkpoint",
        interval=0.5,
    )
    cluster.kubectl("delete", "pod", "resume-r0-node-1", "-n", namespace, "--wait=false")
    final = wait_phase(cluster, namespace, "resume", "Succeeded", 400)
    assert final["restarts"] == 1 and final["restartsCountTowardsLimit"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumedFromStep"] > 0


def _trainer_pids(job: str, node_rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "tauon_train.train" in cmd and "torchrun" not in cmd and "torch.distributed.run" not in cmd:
            if f"TAUON_JOB_NAME={job}".encode() in env and f"PET_NODE_RANK={node_rank}".encode() in env:
                pids.append(int(proc.name))
    return pids


def test_sigkill_of_a_rank_restarts_once_and_counts(
    cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path
):
    out = tmp_path / "killed"
    cluster.apply(ftj("killed", out, steps_every=3), "-n", namespace)
    pids = wait_until(
        lambda: _trainer_pids("killed", 1) if (out / "progress.json").exists() else None,
        300,
        "rank 1's trainer process while training",
        interval=0.5,
    )
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    final = wait_phase(cluster, namespace, "killed", "Succeeded", 400)
    assert final["restarts"] == 1 and final["restartsCountTowardsLimit"] == 1
    assert final["lastFailure"]["pod"].startswith("killed-r0-node-")
