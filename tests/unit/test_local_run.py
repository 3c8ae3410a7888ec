"""`tauon run --local` for an InferenceService: the server command comes from the renderer (no process
is started here; prepare_server only writes files under the runs directory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tauon.api.inferenceservice import InferenceService
from tauon.local.process import Unsupported
from tauon.local.run import prepare_server
from tauon.render.config import OperatorConfig
from tauon.render.inferenceservice import ModelLocation, render_deployment


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
    assert prep.argv[3 : 3 + len(args)] == [a if a != "8080" else "18555" for a in args]
    # container paths (the /tmp emptyDir) map under the run's directory
    assert prep.env["HF_HOME"].startswith(str(tmp_path / "runs" / ".local"))


def test_finetunejob_ref_serves_the_local_run_output(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ft" / "model"
    out.mkdir(parents=True)
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
