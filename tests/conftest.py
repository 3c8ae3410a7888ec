"""Shared fixtures. The control plane is started once per test session and always stopped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.kube import REPO, Cluster, load_cluster_module, wait_until


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """A real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) with tauon's CRDs.

    Set TAUON_TEST_CLUSTER_DIR to reuse one started with `make cluster-up` (it is then left running).
    """
    mod = load_cluster_module()
    reuse = os.environ.get("TAUON_TEST_CLUSTER_DIR")
    d = Path(reuse) if reuse else REPO / ".cluster-test"
    kubeconfig = mod.up(d)
    c = Cluster(kubeconfig, mod.build())
    try:
        c.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        for crd in ("finetunejobs.tauon.dev", "inferenceservices.tauon.dev"):
            c.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        wait_until(lambda: c.kubectl("get", "ftj", "-A", check=False).returncode == 0, 30, "CRDs served")
        yield c
    finally:
        if not reuse:
            mod.down(d)


@pytest.fixture
def namespace(cluster: Cluster):
    ns = cluster.create_namespace()
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
