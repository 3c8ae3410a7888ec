"""The edges of sweep early stopping: apply_plan's merge patches of children (the prune annotation)
against an in-process HTTP server speaking the API server's REST answers, the trial-phase gauges (Pruned
included), and the dashboard's sweep panels."""

from __future__ import annotations

import json
from typing import Any

from tauon import metrics
from tauon.api.names import ANN_PRUNE
from tauon.handlers.finetunesweep import TRIAL_PHASES, sweep_gauges
from tauon.kube.apply import apply_plan
from tauon.kube.client import Kube
from tauon.reconcile.plan import Event, Plan
from tests.kube import REPO
from tests.unit.test_kube_apply import NS, FakeApiServer, api  # noqa: F401 (the fixture)

SWEEP = {
    "metadata": {"name": "sw", "namespace": NS, "uid": "sweep-uid", "resourceVersion": "7"},
    "status": {"phase": "Running"},
}
TRIALS = f"/apis/tauon.dev/v1alpha1/namespaces/{NS}/finetunejobs"
ANNOTATE = {"metadata": {"annotations": {ANN_PRUNE: "median: evalLoss 0.91 at step 40"}}}


def test_a_plan_with_patches_is_not_empty() -> None:
    assert Plan().is_empty()
    assert not Plan(patches=[("FineTuneJob", "sw-t3", ANNOTATE)]).is_empty()


async def test_patches_are_merge_patches_of_the_children_before_status_and_events(
    api: tuple[FakeApiServer, Kube],  # noqa: F811
) -> None:
    fake, kube = api
    posted: list[Event] = []

    async def post(ev: Event) -> None:
        posted.append(ev)

    plan = Plan(
        patches=[("FineTuneJob", "sw-t3", ANNOTATE)],
        status={"phase": "Running", "finishedTrials": 3},
        events=[Event("Normal", "TrialPruned", "trial sw-t3 pruned")],
    )
    await apply_plan(kube, "FineTuneSweep", SWEEP, plan, post)
    method, path, payload = fake.requests[0]
    assert (method, path, payload) == ("PATCH", f"{TRIALS}/sw-t3", ANNOTATE)
    assert fake.calls("PATCH")[1].endswith("/finetunesweeps/sw/status")
    assert [e.reason for e in posted] == ["TrialPruned"]


async def test_a_patch_of_a_child_that_is_gone_is_skipped(api: tuple[FakeApiServer, Kube]) -> None:  # noqa: F811
    fake, kube = api
    fake.rules[("PATCH", f"{TRIALS}/sw-t3")] = (404, {"kind": "Status", "reason": "NotFound"})
    plan = Plan(
        patches=[("FineTuneJob", "sw-t3", ANNOTATE)], status={"phase": "Running", "finishedTrials": 4}
    )
    result = await apply_plan(kube, "FineTuneSweep", SWEEP, plan)
    assert not result.stale and fake.calls("PATCH")[-1].endswith("/finetunesweeps/sw/status")


def sweep(phases: list[str], best: float | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"trials": [{"name": f"sw-t{k}", "phase": p} for k, p in enumerate(phases)]}
    if best is not None:
        status["best"] = {"trial": "sw-t0", "objective": best}
    return {"status": status}


def test_trial_gauges_count_pruned_and_every_phase_reads_zero_when_empty() -> None:
    trials, best = sweep_gauges(
        [
            (("a", "one"), sweep(["Succeeded", "Pruned", "Pruned", "Running"], best=0.4)),
            (("a", "two"), sweep(["Failed"])),
            (("b", "three"), sweep([])),
        ]
    )
    assert TRIAL_PHASES == ("Pending", "Running", "Succeeded", "Failed", "Pruned")
    assert {p: trials[("a", p)] for p in TRIAL_PHASES} == {
        "Pending": 0,
        "Running": 1,
        "Succeeded": 1,
        "Failed": 1,
        "Pruned": 2,
    }
    assert {p: trials[("b", p)] for p in TRIAL_PHASES} == dict.fromkeys(TRIAL_PHASES, 0)
    assert best == {("a", "one"): 0.4}
    metrics.set_phase_counts(metrics.FINETUNESWEEP_TRIALS, trials)
    try:
        assert (
            metrics.REGISTRY.get_sample_value(
                "tauon_finetunesweep_trials", {"namespace": "a", "phase": "Pruned"}
            )
            == 2
        )
    finally:
        metrics.set_phase_counts(metrics.FINETUNESWEEP_TRIALS, {})


def test_dashboard_draws_sweep_trials_by_phase_and_the_best_objective_per_sweep() -> None:
    board = json.loads((REPO / "helm" / "tauon" / "files" / "dashboards" / "tauon-overview.json").read_text())
    panels = {p["title"]: p for p in board["panels"]}
    assert panels["Hyperparameter sweeps"]["type"] == "row"
    trials = panels["Sweep trials by phase"]
    assert (
        trials["targets"][0]["expr"] == 'sum by (phase) (tauon_finetunesweep_trials{namespace=~"$namespace"})'
    )
    assert trials["targets"][0]["legendFormat"] == "{{phase}}"
    best = panels["Best objective per sweep"]
    assert 'tauon_finetunesweep_best_objective{namespace=~"$namespace"}' in best["targets"][0]["expr"]
    assert "by (namespace, name)" in best["targets"][0]["expr"]
    namespaces = next(v for v in board["templating"]["list"] if v["name"] == "namespace")
    assert "tauon_finetunesweep_trials" in namespaces["query"]["query"]
    # below every other panel: no overlap
    others = [p for p in board["panels"] if p["title"] not in panels or p["id"] < 24]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in others if p["id"] < 24)
    assert (
        min(panels[t]["gridPos"]["y"] for t in ("Sweep trials by phase", "Best objective per sweep")) > bottom
    )
