"""Operator metrics. tauon's own are prefixed `tauon_`; the generic controller metrics use
controller-runtime's exact names so existing dashboards carry over. Labels are bounded: namespace,
phase, controller, result, kind - never a job or pod name. One exception: a sweep's best objective is per
sweep (`name`), one series per live FineTuneSweep, removed with it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

FINETUNEJOBS = Gauge(
    "tauon_finetunejobs", "FineTuneJobs by phase.", ["namespace", "phase"], registry=REGISTRY
)
INFERENCESERVICES = Gauge(
    "tauon_inferenceservices", "InferenceServices by phase.", ["namespace", "phase"], registry=REGISTRY
)
FINETUNESWEEP_TRIALS = Gauge(
    "tauon_finetunesweep_trials",
    "Trials of the FineTuneSweeps, by trial phase (Pending, Running, Succeeded, Failed, and Pruned: stopped "
    "by spec.earlyStopping). A namespace with sweeps has a series for every phase.",
    ["namespace", "phase"],
    registry=REGISTRY,
)
FINETUNESWEEP_BEST_OBJECTIVE = Gauge(
    "tauon_finetunesweep_best_objective",
    "The objective metric of each FineTuneSweep's best trial so far.",
    ["namespace", "name"],
    registry=REGISTRY,
)
GANG_RESTARTS = Counter(
    "tauon_finetunejob_gang_restarts_total",
    "Whole-gang restarts, by cause (failure counts toward backoffLimit, disruption does not).",
    ["namespace", "cause"],
    registry=REGISTRY,
)
TIME_TO_RUNNING = Histogram(
    "tauon_finetunejob_time_to_running_seconds",
    "Seconds from FineTuneJob creation until every pod of its first attempt is running.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
    registry=REGISTRY,
)
RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total",
    "Total number of reconciliations per controller.",
    ["controller", "result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "controller_runtime_reconcile_errors_total",
    "Total number of reconciliation errors per controller.",
    ["controller"],
    registry=REGISTRY,
)
RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Length of time per reconciliation per controller.",
    ["controller"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
API_WRITES = Counter(
    "tauon_api_writes_total",
    "Writes the operator sent to the API server, by controller and verb (a converged object costs none).",
    ["controller", "verb"],
    registry=REGISTRY,
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=REGISTRY)


def set_phase_counts(gauge: Gauge, counts: dict[tuple[str, str], int]) -> None:
    """Replace the gauge's series by these (namespace, phase) counts. A phase that emptied in a namespace
    that still has objects reads 0; every series of a namespace with no objects left is removed, so the
    gauge does not keep a series for every namespace it ever saw."""
    live = {ns for ns, _ in counts}
    for labels in list(gauge._metrics):
        if labels in counts:
            continue
        if labels[0] in live:
            gauge.labels(*labels).set(0)
        else:
            gauge.remove(*labels)
    for (ns, phase), n in counts.items():
        gauge.labels(ns, phase).set(n)


def set_values(gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
    """Replace the gauge's series by exactly these (objects gone take their series with them)."""
    for labels in list(gauge._metrics):
        if labels not in values:
            gauge.remove(*labels)
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
