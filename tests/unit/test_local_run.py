"""`tauon run --local`: the server command comes from the renderer (prepare_server only writes files under
the runs directory), and status.json is the status the operator's planner gives for the same pods."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tauon.api import FineTuneJob, FineTuneJobStatus, InferenceServiceStatus
from tauon.api.inferenceservice import InferenceService
from tauon.local import process as lp
from tauon.local import run as local_run
from tauon.local.process import Unsupported
from tauon.local.run import prepare_server
from tauon.reconcile import finetunejob as ftj
from tauon.reconcile import inferenceservice as isv
from tauon.render.config import OperatorConfig
from tauon.render.finetunejob import CONTAINER, render_pod
from tauon.render.inferenceservice import ModelLocation, Models, predictor_name, render, render_deployment


def isvc(model: dict[str, Any], **spec: Any) -> InferenceService:
    return InferenceService.model_validate(
        {
            "apiVersion": "tauon.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": "sent", "namespace": "default"},
            "spec": {"model": model, **spec},
        }
    )


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_server_argv_is_the_rendered_one_mapped_locally(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "m"
    model_dir.mkdir(parents=True)
    obj = isvc(
        {"source": f"file://{model_dir}", "task": "sequence-classification"},
        batching={"maxBatchSize": 7, "maxLatencyMilliseconds": 3},
    )
    prep = prepare_server(obj, tmp_path / "runs", 18555)
    assert prep.argv[:3] == ["python", "-m", "tauon_serve.serve"]
    assert flag(prep.argv, "--task") == "sequence-classification"  # drifted before: no --task
    assert flag(prep.argv, "--model") == str(model_dir)
    assert flag(prep.argv, "--port") == "18555" and prep.ports["http"] == 18555
    assert flag(prep.argv, "--host") == "127.0.0.1"
    assert flag(prep.argv, "--max-batch-size") == "7" and flag(prep.argv, "--max-latency-ms") == "3"
    # every other rendered argument is passed through unchanged
    rendered = render_deployment(
        obj, "predictor", ModelLocation(f"file://{model_dir}"), 1, OperatorConfig(allow_host_paths=True)
    )
    args = rendered["spec"]["template"]["spec"]["containers"][0]["args"]
    local = {"8080": "18555", "8081": str(prep.ports["health"])}  # the health listener: a free port
    assert prep.ports["health"] not in (8081, 18555)
    assert prep.argv[3 : 3 + len(args)] == [local.get(a, a) for a in args]
    # container paths (the /tmp emptyDir) map under the run's directory
    assert prep.env["HF_HOME"].startswith(str(tmp_path / "runs" / ".local"))


def test_finetunejob_ref_serves_the_local_run_output(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ft" / "model"
    out.mkdir(parents=True)
    succeeded = {"phase": "Succeeded", "conditions": [{"type": "Succeeded", "status": "True"}]}
    local_run.write_status(out.parent / "status.json", {**succeeded, "output": {"model": f"file://{out}"}})
    prep = prepare_server(isvc({"fineTuneJobRef": {"name": "ft"}}), tmp_path / "runs", None)
    assert flag(prep.argv, "--model") == str(out)
    assert prep.ports["http"] > 0


def test_missing_local_job_output_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="run the FineTuneJob ft locally first"):
        prepare_server(isvc({"fineTuneJobRef": {"name": "ft"}}), tmp_path, None)


def test_pvc_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="pvc://"):
        prepare_server(isvc({"source": "pvc://models/m"}), tmp_path, None)


def _threads_pod(name: str, limits: dict[str, str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "command": ["x"]}
    if limits is not None:
        container["resources"] = {"limits": limits}
    return {"metadata": {"name": "p"}, "spec": {"containers": [container]}}


def test_local_threads_follow_the_spec_and_give_a_lone_server_every_core() -> None:
    from tauon.local.process import local_threads

    cores = os.cpu_count() or 1
    assert local_threads(_threads_pod("server"), {}) == cores
    assert local_threads(_threads_pod("server", {"cpu": "3"}), {}) == 3
    assert local_threads(_threads_pod("server", {"cpu": "1500m"}), {}) == 2
    assert local_threads(_threads_pod("trainer"), {"NPROC_PER_NODE": "2"}) == 1  # ranks share the cores
    assert local_threads(_threads_pod("trainer", {"cpu": "8"}), {"NPROC_PER_NODE": "2"}) == 4


def test_local_server_threads_are_what_the_rendered_pod_would_get(tmp_path: Path) -> None:
    """The rendered OMP_NUM_THREADS comes from limits.cpu (a resourceFieldRef the local runner cannot
    resolve); the local runner gives the same value itself."""
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    src = {"source": f"file://{model_dir}", "task": "sequence-classification"}
    limited = prepare_server(isvc(src, resources={"limits": {"cpu": "1"}}), tmp_path / "a", None)
    assert limited.env["OMP_NUM_THREADS"] == "1"
    free = prepare_server(isvc(src), tmp_path / "b", None)
    assert free.env["OMP_NUM_THREADS"] == str(os.cpu_count() or 1)


# -- status.json -------------------------------------------------------------------------------------------

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
PERMANENT = {"retryable": False, "reason": "DatasetNotFound", "message": "no file /x/missing.jsonl"}


def ftjob(tmp_path: Path, **spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "metadata": {"name": "broken", "namespace": "default", "uid": "u1"},
            "spec": {
                "model": {
                    "source": f"file://{tmp_path}/m",
                    "task": "sequence-classification",
                    "numLabels": 2,
                },
                "dataset": {"source": f"file://{tmp_path}/d.jsonl"},
                "output": {"storage": f"file://{tmp_path}/out"},
                "numNodes": 2,
                "nprocPerNode": 1,
                **spec,
            },
        }
    )


class FakeProc:
    """A rank's process: running (None) or exited with `returncode`."""

    def __init__(self, returncode: int | None = None):
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


def rank_run(job: FineTuneJob, tmp_path: Path, rank: int, code: int | None, term: Any = None) -> Any:
    d = tmp_path / f"node-{rank}"
    d.mkdir(parents=True, exist_ok=True)
    if term is not None:
        (d / "termination-log").write_text(term if isinstance(term, str) else json.dumps(term))
    prep = lp.Prepared([], {}, d, d / "termination-log", {})
    pod = render_pod(job, OperatorConfig(allow_host_paths=True), 0, rank)
    return local_run.RankRun(rank, pod, prep, FakeProc(code), d / "log", T0)  # type: ignore[arg-type]


def cluster_pod(
    job: FineTuneJob, rank: int, phase: str, term: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The pod as the API server shows it on a cluster (kubelet status), written independently."""
    pod = render_pod(job, OperatorConfig(allow_host_paths=True), 0, rank)
    ts = "2025-01-02T03:04:05Z"
    pod["metadata"]["creationTimestamp"] = ts
    pod["spec"]["nodeName"] = "node-a"
    conds = [{"type": "PodScheduled", "status": "True"}]
    if phase == "Running":
        conds.append({"type": "Ready", "status": "True"})
        state: dict[str, Any] = {"running": {"startedAt": ts}}
    else:
        state = {"terminated": {"startedAt": ts, "finishedAt": "2025-01-02T03:04:15Z", **(term or {})}}
    pod["status"] = {
        "phase": phase,
        "conditions": conds,
        "containerStatuses": [{"name": CONTAINER, "state": state}],
    }
    return pod


def cluster_status(
    job: FineTuneJob, passes: list[tuple[datetime, list[dict[str, Any]]]]
) -> FineTuneJobStatus:
    """The operator's passes over those pods, its status carried from one pass to the next."""
    job = job.model_copy(deep=True)
    job.metadata.generation, job.metadata.creation_timestamp = 1, T0
    cfg = OperatorConfig(allow_host_paths=True)
    for now, pods in passes:
        plan = ftj.reconcile(job, ftj.Observed(pods=pods), now, cfg)
        if plan.status is not None:
            job.status = FineTuneJobStatus.model_validate(plan.status)
    return job.status


def local_status(job: FineTuneJob, tmp_path: Path) -> Any:
    status = local_run.JobStatus(job, tmp_path / "out", OperatorConfig(allow_host_paths=True))
    status.job.metadata.creation_timestamp = T0
    return status


def written(tmp_path: Path) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate(json.loads((tmp_path / "out" / "status.json").read_text()))


def test_write_status_replaces_the_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "status.json"
    local_run.write_status(path, {"phase": "Running"})
    assert json.loads(path.read_text()) == {"phase": "Running"}
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        replaced.append((str(src), str(dst)))
        assert json.loads(Path(src).read_text()) == {"phase": "Failed"}  # complete before it is renamed
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        local_run.write_status(path, {"phase": "Failed"})
    # the reader still sees the previous status, whole; the temp file was in the same directory, and is gone
    assert json.loads(path.read_text()) == {"phase": "Running"}
    assert replaced and Path(replaced[0][0]).parent == tmp_path and replaced[0][1] == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    monkeypatch.setattr(os, "replace", real_replace)
    local_run.write_status(path, {"phase": "Failed"})
    assert json.loads(path.read_text()) == {"phase": "Failed"}


def test_failed_rank_status_is_the_clusters(tmp_path: Path) -> None:
    """A rank fails with the trainer's termination message: the status the operator's planner gives for
    the same pods on a cluster (PermanentError; lastFailure carries the trainer's reason)."""
    job = ftjob(tmp_path)
    status = local_status(job, tmp_path)
    t1, t2 = T0 + timedelta(seconds=10), T0 + timedelta(seconds=11)
    status.observe([], T0)
    assert written(tmp_path).phase == "Pending"
    running = [rank_run(job, tmp_path, r, None) for r in (0, 1)]
    status.observe(running, T0)
    assert written(tmp_path).phase == "Running"
    failing = [running[0], rank_run(job, tmp_path, 1, 1, PERMANENT)]
    local = status.observe(failing, T0 + timedelta(seconds=10))
    term = {"exitCode": 1, "reason": "Error", "message": json.dumps(PERMANENT)}
    cluster = cluster_status(
        job,
        [
            (T0, []),
            (T0, [cluster_pod(job, r, "Running") for r in (0, 1)]),
            (t1, [cluster_pod(job, 0, "Running"), cluster_pod(job, 1, "Failed", term)]),
        ],
    )
    assert local.dump() == cluster.dump() == written(tmp_path).dump()
    failed = local_run.failed_condition(local.conditions)
    assert local.phase == "Failed" and failed is not None and failed.reason == "PermanentError"
    assert "DatasetNotFound: no file /x/missing.jsonl" in failed.message
    lf = local.last_failure
    assert lf is not None and (lf.pod, lf.reason, lf.exit_code) == ("broken-r0-node-1", "DatasetNotFound", 1)
    # tauon run then stops rank 0, as the operator stops survivors: still Failed, both pods failed
    failing[0].proc.returncode, failing[0].stopped = -15, True
    final = status.observe(failing, t2)
    assert final.phase == "Failed" and final.pods.failed == 2 and final.pods.active == 0
    assert written(tmp_path).last_failure == lf


def test_a_crash_without_termination_message_reports_the_log_tail(tmp_path: Path) -> None:
    """FallbackToLogsOnError: the log's end is the message; a local gang is never restarted."""
    job = ftjob(tmp_path)
    status = local_status(job, tmp_path)
    crashed = rank_run(job, tmp_path, 0, -9)
    crashed.log.write_text("".join(f"line {i}\n" for i in range(200)))
    st = status.observe([crashed, rank_run(job, tmp_path, 1, None)], T0)
    failed = local_run.failed_condition(st.conditions)
    assert (
        failed is not None and failed.reason == "BackoffLimitExceeded" and "exit code 137" in failed.message
    )
    assert st.last_failure is not None and st.last_failure.message.endswith("line 199")
    assert "line 119\n" not in st.last_failure.message  # the last 80 lines only
    assert st.restarts == 0 and st.attempt == 0


def test_success_takes_metrics_and_progress_as_the_operator_does(tmp_path: Path) -> None:
    job = ftjob(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    progress = {
        "step": 3,
        "totalSteps": 39,
        "percent": 7.69,
        "epoch": 0,
        "loss": 0.69,
        "tokensPerSecond": 1.0,
    }
    (out / "progress.json").write_text(json.dumps({**progress, "updatedAt": "2025-01-02T03:04:06Z"}))
    status = local_status(job, tmp_path)
    st = status.observe([rank_run(job, tmp_path, r, None) for r in (0, 1)], T0)
    assert (st.phase, st.progress.step, st.progress.total_steps, st.progress.percent) == ("Running", 3, 39, 7)
    done = {"metrics": {"evalAccuracy": 0.9, "worldSize": 2}, "resolved": {"strategy": "ddp"}}
    ranks = [rank_run(job, tmp_path, 0, 0, done), rank_run(job, tmp_path, 1, 0)]
    st = status.observe(ranks, T0 + timedelta(seconds=30))
    assert st.phase == "Succeeded" and st.output.model == f"file://{tmp_path}/out/model"
    assert st.output.metrics == {"evalAccuracy": 0.9, "worldSize": 2} and st.resolved.strategy == "ddp"
    assert st.progress.percent == 100 and st.pods.succeeded == 2
    assert written(tmp_path) == st


def test_an_interrupted_run_is_failed_with_reason_interrupted(tmp_path: Path) -> None:
    job = ftjob(tmp_path)
    status = local_status(job, tmp_path)
    status.observe([rank_run(job, tmp_path, r, None) for r in (0, 1)], T0)
    status.fail("Interrupted", "tauon run --local was interrupted: all ranks stopped")
    st = written(tmp_path)
    failed = local_run.failed_condition(st.conditions)
    assert st.phase == "Failed" and failed is not None and failed.reason == "Interrupted"
    assert {c.type: c.status for c in st.conditions}["Running"] == "False"


def test_invalid_spec_is_written_before_any_rank_starts(tmp_path: Path) -> None:
    from tauon.render.common import InvalidSpec

    job = ftjob(tmp_path, resources={"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}})
    with pytest.raises(InvalidSpec, match="must be equal"):
        local_run.run_finetunejob(job, tmp_path / "out", quiet=True)
    st = written(tmp_path)
    failed = local_run.failed_condition(st.conditions)
    assert st.phase == "Failed" and failed is not None and failed.reason == "InvalidSpec"
    assert not (tmp_path / "out" / "logs").exists()


RANK_SCRIPT = """
import json, os, sys, time
rank = int(os.environ["PET_NODE_RANK"])
out = sys.argv[1]
if rank == 1:
    open(os.environ["TAUON_TERMINATION_LOG"], "w").write(json.dumps(%s))
    sys.exit(2)
json.dump({"step": 1, "totalSteps": 10}, open(os.path.join(out, "progress.json"), "w"))
time.sleep(60)
"""


def test_run_finetunejob_keeps_status_json_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole local loop with stand-in trainers: rank 1 fails permanently, rank 0 is stopped."""
    job = ftjob(tmp_path)
    out = tmp_path / "out"
    script = RANK_SCRIPT % repr(PERMANENT)
    real_start = lp.start
    seen: list[str] = []

    def start(prep: lp.Prepared, log: Path) -> Any:
        seen.append(json.loads((out / "status.json").read_text())["phase"])  # written before any rank
        prep.argv = [sys.executable, "-c", script, str(out)]
        return real_start(prep, log)

    monkeypatch.setattr(lp, "start", start)
    assert local_run.run_finetunejob(job, out, quiet=True) == 2
    assert seen == ["Pending", "Pending"]
    st = written(tmp_path)
    failed = local_run.failed_condition(st.conditions)
    assert st.phase == "Failed" and failed is not None and failed.reason == "PermanentError"
    assert st.last_failure is not None and st.last_failure.reason == "DatasetNotFound"
    assert st.pods.failed == 2 and st.pods.active == 0  # rank 0 stopped with the gang
    assert not list(out.glob(".status.json.*"))  # no temp file left behind


def test_service_status_is_the_clusters_at_the_local_url(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    obj = isvc({"source": f"file://{model_dir}", "task": "sequence-classification"})
    status = local_run.ServiceStatus(obj, tmp_path)
    status.url = "http://127.0.0.1:18555"
    path = tmp_path / "sent-server.status.json"
    st = status.observe(False)
    assert InferenceServiceStatus.model_validate(json.loads(path.read_text())).phase == "NotReady"
    status.observe(True)
    local = InferenceServiceStatus.model_validate(json.loads(path.read_text()))
    # the cluster: the operator's planner with the predictor Deployment rolled out and ready
    cfg = OperatorConfig(allow_host_paths=True)
    cluster_obj = obj.model_copy(deep=True)
    cluster_obj.metadata.generation = 1
    dep = next(
        c
        for c in render(cluster_obj, Models(ModelLocation(f"file://{model_dir}")), cfg)
        if c["metadata"]["name"] == predictor_name("sent")
    )
    dep["metadata"]["generation"] = 1
    dep["status"] = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}
    cluster_obj.status = st
    plan = isv.reconcile(cluster_obj, isv.Observed(deployments={predictor_name("sent"): dep}), T0, cfg)
    assert plan.status is not None
    cluster = InferenceServiceStatus.model_validate(plan.status)
    assert local.phase == cluster.phase == "Ready" and local.ready_replicas == cluster.ready_replicas == 1
    assert local.url == "http://127.0.0.1:18555" and cluster.url == "http://sent.default.svc.cluster.local"
    strip = {"lastTransitionTime", "message"}
    assert [{k: v for k, v in c.dump().items() if k not in strip} for c in local.conditions] == [
        {k: v for k, v in c.dump().items() if k not in strip} for c in cluster.conditions
    ]
    ready = next(c for c in local.conditions if c.type == "Ready")
    assert ready.message == "serving at http://127.0.0.1:18555"
    status.fail("ServerExited", "the model server exited with code 1: boom")
    failed = InferenceServiceStatus.model_validate(json.loads(path.read_text()))
    assert failed.phase == "Failed" and failed.ready_replicas == 0
    assert {c.type: (c.status, c.reason) for c in failed.conditions}["Ready"] == ("False", "ServerExited")


def test_a_failed_local_job_cannot_be_served(tmp_path: Path) -> None:
    job = ftjob(tmp_path)
    status = local_run.JobStatus(job, tmp_path / "broken", OperatorConfig(allow_host_paths=True))
    status.observe([], T0)
    status.fail("Interrupted", "stopped")
    with pytest.raises(Unsupported, match=r"FineTuneJob broken failed \(Interrupted: stopped\)"):
        prepare_server(isvc({"fineTuneJobRef": {"name": "broken"}}), tmp_path, None)


CLAIM_SCRIPT = """
import json, os, sys
from tauon_core.errors import PermanentError
from tauon_train.output import claim
try:
    claim(sys.argv[1], os.environ.get("TAUON_JOB_UID", ""), sys.argv[2], 0)
except PermanentError as e:
    open(os.environ["TAUON_TERMINATION_LOG"], "w").write(
        json.dumps({"retryable": False, "reason": e.reason, "message": e.message}))
    sys.exit(2)
"""


def test_a_local_job_owns_its_output_and_another_job_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `tauon run --local` of different jobs on one output: the second fails OutputInUse (as on a
    cluster) instead of resuming the first one's checkpoints; re-running the first resumes (same owner).
    The ranks are stand-ins that only claim the output with the trainer's own `claim`."""
    out = tmp_path / "out"
    real_start = lp.start

    def start(prep: lp.Prepared, log: Path) -> Any:
        prep.argv = [sys.executable, "-c", CLAIM_SCRIPT, str(out), "job"]
        return real_start(prep, log)

    monkeypatch.setattr(lp, "start", start)

    def job(name: str) -> FineTuneJob:
        j = ftjob(tmp_path, numNodes=1)
        j.metadata.name, j.metadata.uid = name, None
        return j

    assert local_run.run_finetunejob(job("first"), out, quiet=True) == 0
    owner = json.loads((out / ".tauon-owner.json").read_text())
    assert owner["uid"], "a local job claimed its output without an identity"
    assert local_run.run_finetunejob(job("second"), out, quiet=True) == 2
    st = written(tmp_path)
    assert st.phase == "Failed" and st.last_failure is not None
    assert st.last_failure.reason == "OutputInUse"
    assert local_run.run_finetunejob(job("first"), out, quiet=True) == 0  # the same job again: its output
    assert json.loads((out / ".tauon-owner.json").read_text())["uid"] == owner["uid"]
