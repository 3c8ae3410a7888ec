"""Shared fixtures. The control plane is started once per test session and always stopped."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import REPO, Cluster, control_plane


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) with tauon's CRDs.

    Set TAUON_TEST_CLUSTER_DIR to reuse one started with `make cluster-up` (it is then left running).
    """
    reuse = os.environ.get("TAUON_TEST_CLUSTER_DIR")
    with control_plane(Path(reuse) if reuse else REPO / ".cluster-test", keep=bool(reuse)) as c:
        yield c


@pytest.fixture
def namespace(cluster: Cluster):
    ns = cluster.create_namespace()
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
