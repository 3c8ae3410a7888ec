"""bench/serving.py builds its servers from an InferenceService: the manifest it writes must stay valid
and render to the batching it claims to measure (pure: nothing is started)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tauon.api import InferenceService
from tauon.render.config import OperatorConfig
from tauon.render.inferenceservice import ModelLocation, render_deployment

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serving.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_serving", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = mod
    spec.loader.exec_module(mod)
    return mod


def _container(bench: ModuleType, mode: str, cpu_limit: str | None, tmp_path: Path) -> dict[str, Any]:
    doc = bench.manifest(tmp_path / "model", bench.MODES[mode], cpu_limit)
    isvc = InferenceService.model_validate(doc)
    dep = render_deployment(
        isvc,
        "predictor",
        ModelLocation(doc["spec"]["model"]["source"]),
        1,
        OperatorConfig(allow_host_paths=True),
    )
    container: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize(("mode", "size", "latency"), [("batching", "32", "10"), ("no-batching", "1", None)])
def test_manifest_renders_the_measured_batching(
    bench: ModuleType, tmp_path: Path, mode: str, size: str, latency: str | None
) -> None:
    args = [str(a) for a in _container(bench, mode, None, tmp_path)["args"]]
    assert args[args.index("--max-batch-size") + 1] == size
    assert args[args.index("--name") + 1] == bench.NAME
    if latency is not None:
        assert args[args.index("--max-latency-ms") + 1] == latency


def test_manifest_cpu_limit_reaches_the_container(bench: ModuleType, tmp_path: Path) -> None:
    c = _container(bench, "batching", "3", tmp_path)
    assert c["resources"]["limits"]["cpu"] == "3"
    assert c["resources"]["requests"]["cpu"] == "1"


def test_rendered_threads_reads_flag_then_env(bench: ModuleType) -> None:
    assert (
        bench.rendered_threads({"args": ["--model", "/m"], "env": [{"name": "HF_HOME", "value": "/x"}]})
        is None
    )
    assert bench.rendered_threads({"args": ["--threads", "4"], "env": []}) == "--threads 4"
    env = [{"name": "OMP_NUM_THREADS", "value": "2"}]
    assert bench.rendered_threads({"args": [], "env": env}) == "OMP_NUM_THREADS=2"


def test_server_threads_parses_the_load_line(bench: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "INFO loaded /m (bert) task=sequence-classification device=cpu dtype=fp32 max_length=512 threads=3 pid=77\n"
    )
    assert bench.server_threads(log) == 3
    assert bench.server_pid(log) == 77
    assert bench.server_threads(tmp_path / "missing.log") is None
