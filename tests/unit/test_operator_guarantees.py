"""Operator-side guarantees of issue 22: the phase gauges forget a namespace with no objects left, the local
SDK backend never deletes outside its run directory, and the pod index drops pods a re-list no longer
shows (tests/unit/test_leader.py has the slow-GET leader test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from tauon import metrics
from tauon.client.errors import SpecError
from tauon.client.local import LocalBackend


def _series(gauge: Gauge) -> set[tuple[str, ...]]:
    return set(gauge._metrics)


def test_phase_gauge_drops_a_namespace_with_no_objects_left() -> None:
    g = Gauge("t_phases", "test", ["namespace", "phase"], registry=CollectorRegistry())
    metrics.set_phase_counts(g, {("a", "Running"): 2, ("b", "Pending"): 1})
    metrics.set_phase_counts(g, {("a", "Succeeded"): 2})
    # a phase that emptied in a namespace that still has objects reads 0; namespace b is gone entirely
    assert _series(g) == {("a", "Running"), ("a", "Succeeded")}
    assert g.labels("a", "Running")._value.get() == 0
    metrics.set_phase_counts(g, {})
    assert _series(g) == set()


@pytest.mark.parametrize("name", ["../x", "..", "a/../../x", "/etc", "UPPER", ""])
def test_local_delete_refuses_names_that_leave_the_run_directory(tmp_path: Path, name: str) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    victim = tmp_path / "x"
    victim.mkdir()
    (victim / "status.json").write_text('{"phase": "Succeeded"}')
    (victim / "keep").write_text("precious")
    backend = LocalBackend(root)
    with pytest.raises(SpecError):
        backend.delete("FineTuneJob", name)
    assert (victim / "keep").read_text() == "precious"
    backend.close()


def test_local_delete_still_removes_a_valid_job(tmp_path: Path) -> None:
    job = tmp_path / "job-1"
    job.mkdir()
    (job / "status.json").write_text('{"phase": "Succeeded"}')
    backend = LocalBackend(tmp_path)
    backend.delete("FineTuneJob", "job-1")
    assert not job.exists()
    backend.close()
