"""Handler-layer pieces that need no cluster: named indexes and the live body, the parse-failure plan of
both kinds, the bounded /progress read, message caps, and the wiring rules (ids, no in-function imports)."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tauon.api.finetunejob import FineTuneJob
from tauon.api.inferenceservice import InferenceService
from tauon.handlers import indexes as ix
from tauon.handlers import progress
from tauon.reconcile.context import MAX_MESSAGE, cap, summarise
from tauon.reconcile.invalid import describe, invalid_spec_plan

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HANDLERS = Path(__file__).resolve().parents[2] / "operator" / "tauon" / "handlers"


def body(uid: str, created: str, rv: str, deleting: bool = False, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "ft",
        "namespace": "ns",
        "uid": uid,
        "creationTimestamp": created,
        "resourceVersion": rv,
        "generation": 1,
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:09Z"
    return {"metadata": meta, **extra}


# -- indexes ---------------------------------------------------------------------------------------------


def test_live_body_prefers_the_new_object_over_a_ghost() -> None:
    ghost = body("old", "2026-01-01T00:00:00Z", "900")
    new = body("new", "2026-01-01T00:05:00Z", "50")  # newer object, lower resourceVersion is irrelevant
    assert ix.live([ghost, new])["metadata"]["uid"] == "new"  # type: ignore[index]
    assert ix.live([new, ghost])["metadata"]["uid"] == "new"  # type: ignore[index]


def test_live_body_prefers_one_not_being_deleted() -> None:
    going = body("a", "2026-01-01T00:05:00Z", "10", deleting=True)
    staying = body("b", "2026-01-01T00:00:00Z", "5")
    assert ix.live([going, staying])["metadata"]["uid"] == "b"  # type: ignore[index]
    assert ix.live([going])["metadata"]["uid"] == "a"  # type: ignore[index]
    assert ix.live([]) is None


def test_indexes_capture_only_named_indexes() -> None:
    idx = ix.Indexes()
    view = {("ns", "ft"): [body("u", "2026-01-01T00:00:00Z", "1", status={"phase": "Running"})]}
    idx.capture({ix.FTJ: view, "something_idx": {("ns", "x"): [{}]}, "logger": object()})
    assert idx.keys(ix.FTJ) == [("ns", "ft")]
    assert idx.keys("something_idx") == []
    assert idx.phase_counts(ix.FTJ) == {("ns", "Running"): 1}
    copy = idx.bodies(ix.FTJ, ("ns", "ft"))[0]
    copy["metadata"] = {}
    assert idx.live(ix.FTJ, ("ns", "ft"))["metadata"]["uid"] == "u"  # type: ignore[index]


def _pod(uid: str, rv: str, phase: str = "Running") -> dict[str, Any]:
    pod = body(uid, "2026-01-01T00:00:00Z", rv, kind="Pod", status={"phase": phase})
    pod["metadata"]["name"] = f"ft-{uid}"
    return pod


def test_a_pod_relist_drops_pods_deleted_while_the_watch_was_away() -> None:
    """Kopf does not diff a 410 re-list: a pod deleted while the watch was disconnected stays in the index
    (Running). A LIST of the job's pods (at resourceVersion 10) drops it; a pod the index saw after the
    LIST was served (rv 20) is kept, and so is one the LIST returned."""
    key = ("ns", "ft")
    kept, deleted, newer = _pod("a", "5"), _pod("b", "9"), _pod("c", "20")
    view = {key: [kept, deleted, newer]}
    idx = ix.Indexes()
    idx.capture({ix.FTJ_PODS: view})
    dropped = idx.resync(ix.FTJ_PODS, key, listed=[_pod("a", "7")], list_rv="10")
    assert dropped == ["ft-b"]
    assert sorted(b["metadata"]["uid"] for b in idx.bodies(ix.FTJ_PODS, key)) == ["a", "c"]
    # once Kopf itself forgets the pod (a later DELETED event), nothing is remembered about it
    view[key] = [kept, newer]
    idx.resync(ix.FTJ_PODS, key, listed=[kept, newer], list_rv="30")
    assert idx.gone_count() == 0


def test_an_unparseable_list_resource_version_drops_nothing() -> None:
    key = ("ns", "ft")
    idx = ix.Indexes()
    idx.capture({ix.FTJ_PODS: {key: [_pod("b", "9")]}})
    assert idx.resync(ix.FTJ_PODS, key, listed=[], list_rv="") == []
    assert len(idx.bodies(ix.FTJ_PODS, key)) == 1


async def test_a_job_pass_resyncs_its_pods_at_most_once_a_period(monkeypatch: pytest.MonkeyPatch) -> None:
    from tauon.api.names import LABEL_JOB
    from tauon.handlers import finetunejob as ftj
    from tauon.handlers.runtime import RT

    key = ("ns", "ft")
    calls: list[tuple[str, str, Any]] = []

    class Kube:
        async def _call(self, method: str, p: str, query: Any = None, **_: Any) -> dict[str, Any]:
            calls.append((method, p, query))
            return {"metadata": {"resourceVersion": "10"}, "items": []}

    idx = ix.Indexes()
    idx.capture({ix.FTJ_PODS: {key: [_pod("b", "9")]}})
    monkeypatch.setattr(RT, "indexes", idx)
    monkeypatch.setattr(RT, "kube", Kube())
    ftj._resynced.clear()
    await ftj.resync_pods("ns", "ft", now=100.0)
    assert calls == [("GET", "/api/v1/namespaces/ns/pods", [("labelSelector", f"{LABEL_JOB}=ft")])]
    assert idx.bodies(ix.FTJ_PODS, key) == []
    await ftj.resync_pods("ns", "ft", now=100.0 + ftj.POD_RESYNC_SECONDS - 1)
    assert len(calls) == 1
    await ftj.resync_pods("ns", "ft", now=100.0 + ftj.POD_RESYNC_SECONDS)
    assert len(calls) == 2


def test_every_index_handler_uses_a_named_id() -> None:
    import kopf

    import tauon.handlers  # noqa: F401 - registers

    ids = {h.id for h in kopf.get_default_registry()._indexing.get_all_handlers()}
    assert ids == set(ix.ALL)


def test_no_handler_module_imports_inside_a_function() -> None:
    for path in HANDLERS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
                assert not inner, f"{path.name}: {fn.name} imports inside the function"
        text = path.read_text()
        assert '"ftj_idx"' not in text and 'endswith("_idx")' not in text


# -- a spec that does not parse ------------------------------------------------------------------------


def _ftj_error() -> tuple[dict[str, Any], ValidationError]:
    raw = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "ft", "namespace": "ns", "uid": "u", "generation": 3},
        "spec": {"numNodes": "many"},
    }
    with pytest.raises(ValidationError) as e:
        FineTuneJob.model_validate(raw)
    return raw, e.value


def test_unparseable_finetunejob_fails_once() -> None:
    raw, err = _ftj_error()
    plan = invalid_spec_plan("FineTuneJob", raw, describe(err), NOW)
    assert plan.status is not None and plan.status["phase"] == "Failed"
    failed = {c["type"]: c for c in plan.status["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"], failed["observedGeneration"]) == ("True", "InvalidSpec", 3)
    assert "spec." in failed["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "InvalidSpec")]
    raw["status"] = plan.status
    assert invalid_spec_plan("FineTuneJob", raw, describe(err), NOW).is_empty()


def test_unparseable_inferenceservice_fails_too() -> None:
    raw = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "s", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"model": {"source": 7}, "replicas": -1},
        "status": {
            "phase": "Ready",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}],
        },
    }
    with pytest.raises(ValidationError) as e:
        InferenceService.model_validate(raw)
    plan = invalid_spec_plan("InferenceService", raw, describe(e.value), NOW)
    assert plan.status is not None and plan.status["phase"] == "Failed"
    conds = {c["type"]: (c["status"], c["reason"]) for c in plan.status["conditions"]}
    assert conds["Ready"] == ("False", "InvalidSpec") and conds["ModelReady"] == ("False", "InvalidSpec")
    assert len(plan.events) == 1
    raw["status"] = plan.status
    assert invalid_spec_plan("InferenceService", raw, describe(e.value), NOW).is_empty()


# -- message caps ----------------------------------------------------------------------------------------


def test_cap_and_summarise() -> None:
    assert cap("short") == "short"
    long = "ü" * 2000
    assert len(cap(long).encode()) <= MAX_MESSAGE and cap(long).endswith("...")
    assert summarise(["a"]) == "a"
    assert summarise(["a", "b", "c"], "more refused") == "a, and 2 more refused"
    assert len(summarise(["x" * 5000, "y"]).encode()) <= MAX_MESSAGE


# -- /progress ------------------------------------------------------------------------------------------


def test_progress_answer_is_capped_and_parsed_defensively() -> None:
    assert progress.decode(b'{"step": 3}') == {"step": 3}
    with pytest.raises(progress.BadReport):
        progress.decode(b'{"a": "' + b"x" * progress.MAX_BYTES + b'"}')
    with pytest.raises(progress.BadReport):
        progress.decode(b"[" * 100_000 + b"]" * 100_000)  # RecursionError inside json
    with pytest.raises(progress.BadReport):
        progress.decode(b"[1, 2]")
    with pytest.raises(progress.BadReport):
        progress.decode(b"not json")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]:9000", "[::1]:9000"),
        ("10.0.0.5:0", None),
        ("10.0.0.5:70000", None),
        ("metadata.google.internal:80", None),
        ("169.254.169.254:80/latest/meta-data", None),
        ("127.0.0.1:80@evil.example:80", None),
        ("::1:9000", None),
        ("", None),
    ],
)
def test_metrics_address_must_be_a_literal_ip_and_port(value: str, expected: str | None) -> None:
    assert progress.parse_address(value) == expected


def test_metrics_address_annotation_needs_the_dev_flag() -> None:
    pod = {
        "metadata": {"annotations": {progress.METRICS_ADDRESS_ANNOTATION: "169.254.169.254:80"}},
        "status": {"podIP": "10.1.2.3"},
    }
    assert progress.address(pod, 9090, trust_annotation=False) == "10.1.2.3:9090"
    assert progress.address(pod, 9090, trust_annotation=True) == "169.254.169.254:80"
    assert progress.dev_flag({}) is False
    assert progress.dev_flag({progress.DEV_FLAG_ENV: "1"}) is True


def test_progress_backoff_doubles_and_resets() -> None:
    b = progress.Backoff()
    key = ("ns", "ft")
    assert b.ready(key, 0)
    b.failed(key, 0, 10)
    assert not b.ready(key, 9) and b.ready(key, 10)
    b.failed(key, 10, 10)
    assert not b.ready(key, 29) and b.ready(key, 30)
    for _ in range(20):
        b.failed(key, 0, 10)
    assert b.ready(key, progress.BACKOFF_MAX_SECONDS)
    b.ok(key)
    assert b.ready(key, 0)


# -- index projections ---------------------------------------------------------------------------------


def _same_plan_with_projected_pods(sim: Any) -> None:
    from tauon.reconcile.finetunejob import reconcile

    full = sim.observed()
    projected = sim.observed()
    projected.pods = [ix.project_pod(p) for p in projected.pods]
    projected.config_map = ix.project_owned(projected.config_map) if projected.config_map else None
    projected.service = ix.project_owned(projected.service) if projected.service else None
    assert reconcile(sim.job, projected, sim.now, sim.cfg) == reconcile(sim.job, full, sim.now, sim.cfg)


def test_pod_projection_keeps_what_the_planner_reads() -> None:
    from tests.unit.test_reconcile_finetunejob import Sim

    sim = Sim({"runPolicy": {"backoffLimit": 1}})
    _same_plan_with_projected_pods(sim)
    sim.step()
    _same_plan_with_projected_pods(sim)
    sim.start()
    _same_plan_with_projected_pods(sim)
    sim.step()
    sim.fail(1, message='{"retryable": true, "reason": "OOM", "message": "x"}')
    _same_plan_with_projected_pods(sim)
    sim.step()  # restart: attempt 1
    sim.step()  # its pods
    sim.delete(0)
    _same_plan_with_projected_pods(sim)
    pod = next(iter(sim.pods.values()))
    full, small = json.dumps(pod), json.dumps(ix.project_pod(pod))
    assert len(small) * 3 < len(full), (len(small), len(full))


def test_deployment_projection_keeps_rollout_fields() -> None:
    from tauon.reconcile.inferenceservice import deployment_rollout, needs_apply
    from tests.unit.test_reconcile_inferenceservice import World, isvc_body

    w = World(isvc_body(replicas=2))
    w.step()
    w.roll_out("sentiment-predictor")
    dep = w.dep("sentiment-predictor")
    assert dep is not None
    small = ix.project_deployment(dep)
    assert "template" not in small["spec"]
    assert deployment_rollout("d", small, False) == deployment_rollout("d", dep, False)
    desired = w.objects[("Deployment", "sentiment-predictor")]
    assert needs_apply(desired, small) == needs_apply(desired, dep) is False
