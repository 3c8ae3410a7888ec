"""Metric naming conventions (ARCHITECTURE.md): tauon's own metrics are prefixed `tauon_`, the generic controller
metrics use controller-runtime's exact names, counters end in `_total`, base units in names (`_seconds`,
`_bytes`), histograms for latencies, bounded labels only. Also: docs/metrics.md lists every metric."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from tauon import metrics
from tests.kube import REPO

# Bounded label names: never an object, job or pod name.
ALLOWED_LABELS = {
    "namespace",
    "phase",
    "controller",
    "result",
    "cause",
    "verb",
    "endpoint",
    "code",
    "node_rank",
    "le",
    "quantile",
}
# Per-object series, each removed with its object (the only exceptions to bounded labels).
PER_OBJECT_LABELS = {"tauon_finetunesweep_best_objective": {"name"}}
CONTROLLER_RUNTIME = {
    "controller_runtime_reconcile_total": "counter",
    "controller_runtime_reconcile_errors_total": "counter",
    "controller_runtime_reconcile_time_seconds": "histogram",
}
CONTROLLERS = {"finetunejob", "inferenceservice", "finetunesweep"}
# Time and size must be in base units; these spellings mean a non-base unit or a missing one.
NON_BASE_UNITS = re.compile(
    r"_(ms|milliseconds|microseconds|minutes|hours|kb|mb|gb|kib|mib|gib|percent)(_|$)"
)
TIME_WORDS = re.compile(r"(^|_)(duration|latency|time|elapsed|age|delay|wait)(_|$)")
SIZE_WORDS = re.compile(r"(^|_)(memory|bytes)(_|$)")
# Standard collectors of prometheus_client (process_*, python_*) in the model server's registry.
STANDARD_PREFIXES = ("process_", "python_")


def exposed(registry: CollectorRegistry) -> dict[str, str]:
    """Metric name as exposed (counters with `_total`) -> type."""
    out = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = family.type
    return out


def declared_in(path: Path) -> dict[str, str]:
    """Metric names exactly as written in the source: Counter("name", ...) -> {"name": "Counter"}."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("Counter", "Gauge", "Histogram", "Summary")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found[node.args[0].value] = node.func.id
    return found


def operator_collectors() -> list[MetricWrapperBase]:
    return [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]


def check_name(name: str, mtype: str) -> list[str]:
    problems = []
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        problems.append(f"{name}: not snake_case")
    if mtype == "counter" and not name.endswith("_total"):
        problems.append(f"{name}: counter without _total")
    if mtype != "counter" and name.endswith("_total"):
        problems.append(f"{name}: {mtype} ending in _total (only counters)")
    if NON_BASE_UNITS.search(name):
        problems.append(f"{name}: non-base unit (use _seconds / _bytes / ratios 0..1)")
    base = name.removesuffix("_total")
    if TIME_WORDS.search(base) and not base.endswith("_seconds"):
        problems.append(f"{name}: a time without the _seconds unit")
    if SIZE_WORDS.search(base) and not base.endswith("_bytes"):
        problems.append(f"{name}: a size without the _bytes unit")
    return problems


# -- the operator registry ---------------------------------------------------------------------------


def test_operator_metric_names():
    names = exposed(metrics.REGISTRY)
    assert names, "the operator registry is empty"
    problems: list[str] = []
    for name, mtype in names.items():
        if name.startswith("controller_runtime_"):
            if CONTROLLER_RUNTIME.get(name) != mtype:
                problems.append(f"{name}: not one of controller-runtime's names/types {CONTROLLER_RUNTIME}")
        elif not name.startswith("tauon_"):
            problems.append(f"{name}: neither tauon_ nor controller_runtime_")
        problems += check_name(name, mtype)
    assert not problems, "\n".join(problems)
    assert set(CONTROLLER_RUNTIME) <= set(names), "controller-runtime's generic metrics are missing"


def test_operator_counters_are_declared_with_total_in_the_source():
    """prometheus_client appends `_total` itself; the source must still spell the exposed name, so a
    grep for a dashboard's metric finds its definition."""
    declared = declared_in(REPO / "operator" / "tauon" / "metrics.py")
    assert declared
    for name, ctor in declared.items():
        if ctor == "Counter":
            assert name.endswith("_total"), f"Counter {name!r} must be declared with its exposed _total name"
        assert name in exposed(metrics.REGISTRY), f"{name} declared but not in the registry"


def test_operator_labels_are_bounded():
    for collector in operator_collectors():
        labels = set(collector._labelnames)
        allowed = ALLOWED_LABELS | PER_OBJECT_LABELS.get(collector._name, set())
        assert labels <= allowed, f"{collector._name}: unbounded label(s) {labels - allowed}"
        if collector._name.startswith("controller_runtime_"):
            assert "controller" in labels
        # latencies are histograms, never summaries (summaries cannot be aggregated across pods)
        assert collector._type != "summary", f"{collector._name}: use a histogram"


def test_controller_label_values_are_the_controllers():
    from tauon.handlers import finetunejob, finetunesweep, inferenceservice

    assert {finetunejob.CONTROLLER, inferenceservice.CONTROLLER, finetunesweep.CONTROLLER} == CONTROLLERS


# -- the trainer and the model server (same conventions) -----------------------------------------------


def trainer_registry() -> CollectorRegistry:
    mod = pytest.importorskip("tauon_train.metrics")
    return mod.TrainerMetrics(node_rank=0, with_gpu=True).registry


def server_registry() -> CollectorRegistry:
    pytest.importorskip("fastapi")
    mod = pytest.importorskip("tauon_serve.metrics")
    return mod.ServerMetrics().registry


@pytest.mark.parametrize("which", ["trainer", "server"])
def test_trainer_and_server_metric_names(which: str):
    registry = trainer_registry() if which == "trainer" else server_registry()
    prefix = f"tauon_{which}_"
    problems: list[str] = []
    for family in registry.collect():
        if family.name.startswith(STANDARD_PREFIXES):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        if not name.startswith(prefix):
            problems.append(f"{name}: expected prefix {prefix}")
        problems += check_name(name, family.type)
    for collector in registry._collector_to_names:  # label names, also of series not yet observed
        extra = set(getattr(collector, "_labelnames", ())) - ALLOWED_LABELS
        if extra:
            problems.append(f"{collector._name}: unbounded label(s) {extra}")
    assert not problems, "\n".join(problems)


# -- docs/metrics.md -----------------------------------------------------------------------------------


def documented() -> set[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\|\s*`([a-z_:][a-z0-9_:]*)`", text, re.M))


def test_docs_list_every_metric():
    names = set(exposed(metrics.REGISTRY))
    try:
        names |= set(exposed(trainer_registry()))
        names |= {n for n in exposed(server_registry()) if not n.startswith(STANDARD_PREFIXES)}
    except pytest.skip.Exception:
        pass
    missing = names - documented()
    assert not missing, f"docs/metrics.md does not list: {sorted(missing)}"


def test_dashboard_uses_documented_metrics_only():
    import json

    board = json.loads((REPO / "helm" / "tauon" / "files" / "dashboards" / "tauon-overview.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"\b((?:tauon|controller_runtime)_[a-z0-9_]+)", e)
    }
    unknown = used - documented()
    assert not unknown, f"the dashboard queries metrics that do not exist: {sorted(unknown)}"
