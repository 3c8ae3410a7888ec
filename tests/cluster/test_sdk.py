"""The SDK against the local control plane with the process-backed node: create a 2-node FineTuneJob,
stream the merged logs of both ranks while waiting for it, serve it, predict, delete; bad use gets clear
errors (unknown job, serving a job that has not succeeded)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tauon.api.names import ANN_LOG_FILE
from tauon.client import Client, JobFailed, NotFound, NotReady
from tests.cluster.conftest import Operator
from tests.kube import TAUON, Cluster, process_node, wait_until
from tests.manifests import PROCESS_NODE, fine_tune_kwargs, sentiment_fine_tune

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]
NODE = "tauon-node-sdk"


@pytest.fixture(scope="module")
def node(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with process_node(cluster, NODE, tmp_path_factory.mktemp("node")) as root:
        yield root


def test_sdk_trains_streams_logs_serves_and_deletes(
    cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path
) -> None:
    client = Client(kubeconfig=str(cluster.kubeconfig), namespace=namespace)
    try:
        with pytest.raises(NotFound, match="FineTuneJob 'nope' not found"):
            client.job("nope")
        job = client.fine_tune(
            "sdk",
            **sentiment_fine_tune(
                output=f"file://{tmp_path / 'out'}",
                checkpoint_every_steps=50,
                resources={"requests": {"cpu": "1", "memory": "1Gi"}},
                node_selector=PROCESS_NODE,
                run_policy={"backoff_limit": 1, "schedule_timeout_seconds": 60},
            ),
        )
        with pytest.raises(NotReady, match="not Succeeded"):
            client.serve("early", fine_tune_job="sdk", node_selector=PROCESS_NODE)
        assert cluster.get("tis", "early", namespace) is None  # refused before anything was sent

        streamed: list[str] = []
        follower = threading.Thread(target=lambda: streamed.extend(job.logs(follow=True)), daemon=True)
        follower.start()
        status = job.wait(timeout=600, progress=False)
        follower.join(timeout=120)
        assert not follower.is_alive(), "logs(follow=True) did not end with the job"
        assert status.phase == "Succeeded" and status.restarts == 0
        assert status.output.metrics["worldSize"] == 2
        assert status.progress.step == status.progress.total_steps > 0

        kube = ["--kubeconfig", str(cluster.kubeconfig), "-n", namespace]
        waited = subprocess.run([TAUON, "wait", "sdk", *kube], capture_output=True, text=True, timeout=120)
        assert waited.returncode == 0 and "FineTuneJob sdk Succeeded" in waited.stdout, waited.stderr
        cli_logs = subprocess.run([TAUON, "logs", "sdk", *kube], capture_output=True, text=True, timeout=120)
        assert cli_logs.returncode == 0 and cli_logs.stdout.startswith("[rank 0] "), cli_logs.stderr

        svc = client.serve("sdk", fine_tune_job=job, node_selector=PROCESS_NODE)
        svc.wait_ready(timeout=300)
        preds = svc.predict(["I loved every minute of it", "terrible, broke after a day"])
        assert [p["label"] for p in preds] == [1, 0]

        pods = cluster.list("pods", namespace, "tauon.dev/job-name=sdk")
        svc.delete()
        job.delete()
        wait_until(lambda: cluster.get("tis", "sdk", namespace) is None, 60, "InferenceService gone")
        wait_until(lambda: cluster.get("ftj", "sdk", namespace) is None, 60, "FineTuneJob gone")
        with pytest.raises(NotFound):
            job.status()

        assert all(ANN_LOG_FILE in (p["metadata"].get("annotations") or {}) for p in pods), pods
        for rank in (0, 1):
            mine = [line for line in streamed if line.startswith(f"[rank {rank}] ")]
            assert mine and not any("<no logs" in line for line in mine), streamed[-20:]
        assert any("tauon-progress" in line for line in streamed if line.startswith("[rank 0] "))
    finally:
        client.close()


def test_sdk_waiting_on_a_failed_job_raises_its_reason(
    cluster: Cluster, operator: Operator, node: Path, namespace: str, tmp_path: Path
) -> None:
    with Client(kubeconfig=str(cluster.kubeconfig), namespace=namespace) as client:
        job = client.fine_tune(
            "broken",
            **fine_tune_kwargs(
                tmp_path / "missing.jsonl",
                output=f"file://{tmp_path / 'out'}",
                node_selector=PROCESS_NODE,
                run_policy={"backoff_limit": 1, "schedule_timeout_seconds": 60},
            ),
        )
        with pytest.raises(JobFailed) as e:
            job.wait(timeout=300, progress=False)
        assert e.value.reason == "PermanentError"
        assert "DatasetNotFound" in e.value.message and "missing.jsonl" in e.value.message
        with pytest.raises(NotReady, match="it is Failed"):
            client.serve("broken", fine_tune_job="broken", node_selector=PROCESS_NODE)
        kube = ["--kubeconfig", str(cluster.kubeconfig), "-n", namespace]
        r = subprocess.run([TAUON, "wait", "broken", *kube], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert r.stderr.startswith("tauon: FineTuneJob 'broken' failed: PermanentError: ")
        r = subprocess.run([TAUON, "wait", "nope", *kube], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        assert (
            r.stderr
            == f"tauon: FineTuneJob, InferenceService or FineTuneSweep 'nope' not found in namespace '{namespace}'\n"
        )
