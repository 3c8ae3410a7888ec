"""Test helpers around the local control plane (hack/cluster/cluster.py) and kubectl."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TAUON = str(Path(sys.executable).parent / "tauon")
CRDS = ("finetunejobs.tauon.dev", "inferenceservices.tauon.dev", "finetunesweeps.tauon.dev")


def load_cluster_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tauon_dev_cluster", REPO / "hack" / "cluster" / "cluster.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Cluster:
    """kubectl against one control plane. Every call is bounded by a timeout."""

    def __init__(self, kubeconfig: Path, bin_dir: Path):
        self.kubeconfig = kubeconfig
        self.bin_dir = bin_dir
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            # the test clusters' workers are process-backed dev nodes: the operator may read /progress at
            # the address they publish (tauon.handlers.progress)
            "TAUON_DEV_PROCESS_NODE": "1",
        }

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60):
        r = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def apply(self, obj: dict | str, *extra: str, check: bool = True):
        text = obj if isinstance(obj, str) else yaml.safe_dump(obj)
        return self.kubectl("apply", "-f", "-", *extra, input=text, check=check)

    def get(self, kind: str, name: str, ns: str | None = None) -> dict | None:
        args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
        r = self.kubectl(*args, check=False)
        if r.returncode != 0:
            if "NotFound" in r.stderr or "not found" in r.stderr:
                return None
            raise AssertionError(r.stderr)
        return json.loads(r.stdout)

    def list(self, kind: str, ns: str | None = None, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-o", "json"] + (["-n", ns] if ns else ["-A"])
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args).stdout)["items"]

    def create_namespace(self, prefix: str = "t") -> str:
        ns = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", ns)
        wait_until(lambda: self.get("serviceaccount", "default", ns) is not None, 60, f"default SA in {ns}")
        return ns


@contextmanager
def control_plane(directory: Path, keep: bool = False) -> Iterator[Cluster]:
    """A control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) in ``directory`` with
    tauon's CRDs applied, Established and served; stopped on exit unless ``keep``."""
    mod = load_cluster_module()
    kubeconfig = mod.up(directory)
    c = Cluster(kubeconfig, mod.build())
    try:
        c.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        for crd in CRDS:
            c.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        wait_until(lambda: c.kubectl("get", "ftj", "-A", check=False).returncode == 0, 30, "CRDs served")
        yield c
    finally:
        if not keep:
            mod.down(directory)


@contextmanager
def process_node(cluster: Cluster, name: str, root: Path, *args: str) -> Iterator[Path]:
    """`tauon node` (pods as local processes) registered as ``name``, its pods under root/pods and its
    log in root/node.log; Ready on entry, stopped on exit (SIGTERM to its session, SIGKILL after 60s)."""
    log = open(root / "node.log", "ab")
    proc = subprocess.Popen(
        [TAUON, "node", "--name", name, "--root", str(root / "pods"), *args],
        env=cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: condition(cluster.get("node", name), "Ready"), 60, "process node Ready")
        yield root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    """Poll pred until truthy (returned) or fail after timeout with a message naming what we waited for."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except AssertionError as e:
            last_exc = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f": {last_exc}" if last_exc else "")
    )


def condition(obj: dict | None, ctype: str) -> dict | None:
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c.get("type") == ctype:
            return c
    return None
