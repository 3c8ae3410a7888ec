"""The operator as a real subprocess (`tauon operator`), so tests can SIGKILL and restart it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.kube import TAUON, Cluster
from tests.net import free_port


class Operator:
    def __init__(self, cluster: Cluster, log: Path, *extra: str):
        self.cluster = cluster
        self.log = log
        self.extra = extra
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            TAUON,
            "operator",
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-address",
            "127.0.0.1",
            "--health-port",
            "0",
            "--period",
            "1",
            "--allow-host-paths",
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=self.cluster.env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


@pytest.fixture(scope="module")
def operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = Operator(cluster, log)
    op.start()
    time.sleep(1)
    assert op.alive(), op.tail()
    yield op
    op.stop()
    if os.environ.get("TAUON_SHOW_OPERATOR_LOG"):
        print(op.tail(200))
