"""`tauon run --local`: failures are reported with rank, exit code and reason; nothing outlives it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tauon.api import FineTuneJobStatus, InferenceServiceStatus
from tests.kube import TAUON, wait_until
from tests.manifests import MINILM, MINILM_CLASSIFIER, finetunejob, inferenceservice
from tests.net import free_port

pytestmark = [pytest.mark.e2e]


def test_failed_rank_is_reported_with_reason(tmp_path: Path):
    job = finetunejob(
        "broken",
        model=MINILM_CLASSIFIER,
        dataset={"source": "file://./missing.jsonl"},
        output={"storage": "file://./out"},
        numNodes=2,
        nprocPerNode=1,
    )
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    r = subprocess.run(
        [TAUON, "run", str(manifest), "--local", "--quiet", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    # torchrun wraps the trainer: the pod's exit code is torchrun's (1); the reason is the termination message
    assert r.returncode == 1, r.stderr
    assert "failed with exit code 1" in r.stderr and '"retryable": false' in r.stderr
    assert "DatasetNotFound" in r.stderr and "missing.jsonl" in r.stderr
    # status.json: the status the operator gives the same failure on a cluster
    status = FineTuneJobStatus.model_validate(json.loads((tmp_path / "out" / "status.json").read_text()))
    failed = next(c for c in status.conditions if c.type == "Failed")
    assert status.phase == "Failed" and (failed.status, failed.reason) == ("True", "PermanentError")
    assert "DatasetNotFound" in failed.message and status.last_failure is not None
    assert status.last_failure.reason == "DatasetNotFound" and status.last_failure.exit_code == 1
    assert status.pods.active == 0 and status.pods.failed == 2


def test_sigterm_stops_the_local_server(tmp_path: Path):
    isvc = inferenceservice("base", model={"source": MINILM})
    manifest = tmp_path / "isvc.yaml"
    manifest.write_text(yaml.safe_dump(isvc))
    port = free_port()
    proc = subprocess.Popen(
        [TAUON, "run", str(manifest), "--local", "--output", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(ready, 180, "local server ready", interval=0.5)
        status_json = tmp_path / "base-server.status.json"

        def status() -> InferenceServiceStatus:
            return InferenceServiceStatus.model_validate(json.loads(status_json.read_text()))

        wait_until(lambda: status_json.exists() and status().phase == "Ready", 30, "status.json Ready")
        assert status().url == f"http://127.0.0.1:{port}" and status().ready_replicas == 1
        proc.send_signal(signal.SIGTERM)  # only tauon itself, not its process group
        proc.wait(timeout=60)

        def closed() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) != 0

        wait_until(closed, 30, "the model server stopped with tauon run")
        assert not status_json.exists()  # stopped like a deleted object
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
