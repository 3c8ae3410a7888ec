"""tauon.client: every SDK call builds the object a hand-written manifest would, validation errors name
the field, and the package imports no torch."""

from __future__ import annotations

import importlib
import io
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tauon.api import FineTuneJob, InferenceService
from tauon.client import Client, ClusterUnreachable, NotFound, SpecError, build
from tauon.client.handles import split_outputs
from tauon.client.logs import merge_files
from tests.manifests import MINILM
from tests.manifests import SENTIMENT as DATA


def roundtrip(model: type[FineTuneJob] | type[InferenceService], doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = build.manifest(model.model_validate(doc))
    return out


def test_fine_tune_builds_the_hand_written_manifest() -> None:
    job = build.finetunejob(
        "sentiment",
        model=MINILM,
        dataset=str(DATA),
        label_field="label",
        validation_split=0.15,
        num_labels=2,
        num_nodes=2,
        nproc_per_node=1,
        method="full",
        output="pvc://results/sentiment",
        checkpoint_every_steps=10,
        namespace="team-a",
        max_steps=20,
        batch_size_per_device=16,
        learning_rate=1e-4,
        max_seq_length=48,
        resources={"requests": {"cpu": "1", "memory": "2Gi"}},
        node_selector={"tauon.dev/node-agent": "process"},
        env={"HF_HUB_OFFLINE": "1"},
        run_policy={"backoff_limit": 2, "schedule_timeout_seconds": 60},
    )
    hand = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "sentiment", "namespace": "team-a"},
        "spec": {
            "model": {"source": MINILM, "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": f"file://{DATA}", "labelField": "label", "validationSplit": 0.15},
            "method": {"type": "full"},
            "hyperparameters": {
                "maxSteps": 20,
                "batchSizePerDevice": 16,
                "learningRate": 1.0e-4,
                "maxSeqLength": 48,
            },
            "output": {"storage": "pvc://results/sentiment", "checkpointEverySteps": 10},
            "numNodes": 2,
            "nprocPerNode": 1,
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
            "podTemplate": {"nodeSelector": {"tauon.dev/node-agent": "process"}},
            "runPolicy": {"backoffLimit": 2, "scheduleTimeoutSeconds": 60},
        },
    }
    assert build.manifest(job) == hand
    assert build.manifest(job) == roundtrip(FineTuneJob, hand)
    # the operator sees the same object (defaults included) either way
    assert job.dump() == FineTuneJob.model_validate(hand).dump()


def test_lora_and_causal_lm_defaults() -> None:
    job = build.finetunejob(
        "chat",
        model="file:///models/tiny",
        dataset={"source": "pvc://data/chat.jsonl", "text_field": "body"},
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
        output="pvc://out/chat",
    )
    hand = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {
            "model": {"source": "file:///models/tiny", "task": "causal-lm"},
            "dataset": {"source": "pvc://data/chat.jsonl", "textField": "body"},
            "method": {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}},
            "output": {"storage": "pvc://out/chat"},
        },
    }
    assert build.manifest(job) == hand == roundtrip(FineTuneJob, hand)


def test_serve_builds_the_hand_written_manifest() -> None:
    isvc = build.inferenceservice(
        "sentiment",
        fine_tune_job="sentiment",
        namespace="team-a",
        autoscaling={"min_replicas": 1, "max_replicas": 4, "target_cpu_utilization_percentage": 60},
        batching={"max_batch_size": 8},
        node_selector={"tauon.dev/node-agent": "process"},
    )
    hand = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "sentiment", "namespace": "team-a"},
        "spec": {
            "model": {"fineTuneJobRef": {"name": "sentiment"}},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetCPUUtilizationPercentage": 60},
            "batching": {"maxBatchSize": 8},
            "podTemplate": {"nodeSelector": {"tauon.dev/node-agent": "process"}},
        },
    }
    assert build.manifest(isvc) == hand == roundtrip(InferenceService, hand)
    src = build.inferenceservice("base", source="hf://org/model", replicas=2)
    assert build.manifest(src)["spec"] == {"model": {"source": "hf://org/model"}, "replicas": 2}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": 2.0}, "spec.hyperparameters.learningRate"),
        ({"batch_size_per_device": 0}, "spec.hyperparameters.batchSizePerDevice"),
        ({"num_nodes": 0}, "spec.numNodes"),
        ({"method": "qlora"}, "spec.method.type"),
        ({"dataset": "gs://bucket/x.jsonl"}, "spec.dataset.source"),
        ({"num_labels": None, "task": "sequence-classification"}, "spec.model.numLabels"),
        ({"task": "causal-lm", "num_labels": None, "label_field": "y"}, "spec.dataset.labelField"),
        ({"learnig_rate": 1e-4}, "learnig_rate"),
    ],
)
def test_validation_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "model": MINILM,
        "dataset": "pvc://data/train.jsonl",
        "num_labels": 2,
        "output": "pvc://out/x",
    }
    args.update(kwargs)
    with pytest.raises(SpecError) as e:
        build.finetunejob("job", **args)
    assert field in e.value.fields, e.value.fields
    assert field in str(e.value)


def test_bad_names_and_ambiguous_models_are_refused() -> None:
    with pytest.raises(SpecError, match="metadata.name"):
        build.finetunejob("Bad_Name", model=MINILM, dataset="pvc://d/x", num_labels=2, output="pvc://o/x")
    with pytest.raises(SpecError, match="exactly one of fine_tune_job=, fine_tune_sweep= and source="):
        build.inferenceservice("s", fine_tune_job="a", source="hf://o/m")
    with pytest.raises(SpecError, match="spec.autoscaling.maxReplicas"):
        build.inferenceservice("s", source="hf://o/m", autoscaling={"min_replicas": 1})


def test_cluster_fine_tune_needs_an_output() -> None:
    client = Client(local=True, workdir="/nonexistent-tauon-test")
    client._backend.default_output = None  # a backend without a default output: a cluster
    with pytest.raises(SpecError, match="spec.output.storage"):
        client.build_fine_tune("x", model=MINILM, dataset="pvc://d/x", num_labels=2)
    client.close()


def test_local_default_output_is_the_run_directory(tmp_path: Path) -> None:
    client = Client(local=True, workdir=tmp_path)
    job = client.build_fine_tune("x", model=MINILM, dataset=str(DATA), num_labels=2)
    assert job.spec.output.storage == f"file://{tmp_path / 'x'}"
    client.close()


def test_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u, namespace: ns1}}]\n"
    )
    client = Client(kubeconfig=str(kubeconfig))
    assert client.namespace == "ns1"
    with pytest.raises(ClusterUnreachable) as e:
        client.job("missing")
    assert "127.0.0.1:9" in str(e.value) and "\n" not in str(e.value)
    client.close()
    with pytest.raises(ClusterUnreachable, match="no usable Kubernetes configuration"):
        Client(kubeconfig=str(tmp_path / "absent"))


def test_v2_outputs_are_split_per_instance() -> None:
    outputs = [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.8, 0.2]},
    ]
    assert split_outputs(outputs, 2) == [
        {"label": 1, "probabilities": [0.1, 0.9]},
        {"label": 0, "probabilities": [0.8, 0.2]},
    ]


class FakeProc:
    """A `tauon run` process: running (returncode None) or exited."""

    def __init__(self, returncode: int | None = None):
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, _sig: int) -> None:
        self.returncode = -15

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


# what `tauon run --local` writes for a rank that failed permanently: the operator's own status
FAILED_STATUS = {
    "phase": "Failed",
    "attempt": 0,
    "conditions": [
        {"type": "Running", "status": "False", "reason": "PermanentError", "message": ""},
        {
            "type": "Failed",
            "status": "True",
            "reason": "PermanentError",
            "message": "pod broken-r0-node-1 failed with a non-retryable error: DatasetNotFound: no file /x/m.jsonl",
        },
    ],
    "lastFailure": {
        "pod": "broken-r0-node-1",
        "exitCode": 1,
        "reason": "DatasetNotFound",
        "message": "no file /x/m.jsonl",
    },
    "pods": {"active": 1, "ready": 1, "succeeded": 0, "failed": 1},
}
# a console line that says otherwise: the SDK must not take reasons from what `tauon run` printed
MISLEADING = 'rank 0 failed with exit code 3: {"retryable": false, "reason": "Bogus", "message": "console"}\n'


def _local_run(client: Client, tmp_path: Path, kind: str, name: str, proc: FakeProc) -> None:
    from tauon.client.local import LocalBackend, LocalRun

    backend = client._backend
    assert isinstance(backend, LocalBackend)
    stderr = tmp_path / f"{name}.stderr"
    stderr.write_text(MISLEADING)
    manifest = {"kind": kind, "metadata": {"name": name}, "spec": {"numNodes": 2}}
    backend.runs[(kind, name)] = LocalRun(kind, manifest, proc, stderr, 18555)  # type: ignore[arg-type]


def test_local_job_failure_is_read_from_status_json(tmp_path: Path) -> None:
    from tauon.client import JobFailed

    with Client(local=True, workdir=tmp_path, poll=0.01) as client:
        _local_run(client, tmp_path, "FineTuneJob", "broken", FakeProc())
        job = client.job("broken")
        assert job.phase == "Pending"  # `tauon run` has not written status.json yet
        status_json = tmp_path / "broken" / "status.json"
        status_json.parent.mkdir()
        status_json.write_text(json.dumps({**FAILED_STATUS, "phase": "Running", "conditions": []}))
        assert job.phase == "Running"
        status_json.write_text(json.dumps(FAILED_STATUS))
        with pytest.raises(JobFailed) as e:
            job.wait(timeout=5, progress=False)
        assert e.value.reason == "PermanentError" and "DatasetNotFound: no file /x/m.jsonl" in e.value.message
        st = job.status()
        assert st.last_failure is not None and st.last_failure.reason == "DatasetNotFound"
        assert st.pods.failed == 1 and "Bogus" not in json.dumps(job.get())


def test_a_local_run_that_ended_without_a_final_status_failed(tmp_path: Path) -> None:
    from tauon.client import JobFailed

    with Client(local=True, workdir=tmp_path, poll=0.01) as client:
        _local_run(client, tmp_path, "FineTuneJob", "crashed", FakeProc(1))
        status_json = tmp_path / "crashed" / "status.json"
        status_json.parent.mkdir()
        status_json.write_text(json.dumps({"phase": "Running"}))  # killed while running
        with pytest.raises(JobFailed) as e:
            client.job("crashed").wait(timeout=5, progress=False)
        assert e.value.reason == "LocalRunFailed" and e.value.message.startswith(
            "tauon run exited with code 1: "
        )


def test_local_service_status_is_read_from_its_status_json(tmp_path: Path) -> None:
    from tauon.client import ServiceFailed

    ready = {
        "phase": "Ready",
        "url": "http://127.0.0.1:18555",
        "readyReplicas": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}],
    }
    failed = {
        "phase": "Failed",
        "conditions": [
            {"type": "ModelReady", "status": "True", "reason": "ModelResolved"},
            {"type": "Ready", "status": "False", "reason": "ServerExited", "message": "exited with code 1"},
        ],
    }
    with Client(local=True, workdir=tmp_path, poll=0.01) as client:
        _local_run(client, tmp_path, "InferenceService", "svc", FakeProc())
        svc = client.service("svc")
        assert svc.status().phase == "Pending"  # no status.json yet
        (tmp_path / "svc-server.status.json").write_text(json.dumps(ready))
        assert svc.wait_ready(timeout=5).ready_replicas == 1
        (tmp_path / "svc-server.status.json").write_text(json.dumps(failed))
        with pytest.raises(ServiceFailed, match="ServerExited: exited with code 1"):
            svc.wait_ready(timeout=5)


def test_merged_logs_prefix_every_rank(tmp_path: Path) -> None:
    (tmp_path / "node-0.log").write_text("a\nb\n")
    (tmp_path / "node-1.log").write_text("c\npartial")
    files = {0: tmp_path / "node-0.log", 1: tmp_path / "node-1.log"}
    lines = list(merge_files(files, follow=False, running=lambda: False))
    assert lines == ["[rank 0] a", "[rank 0] b", "[rank 1] c", "[rank 1] partial"]
    assert list(merge_files(files, follow=True, running=lambda: False)) == lines


class _Blocker:
    FORBIDDEN = ("torch", "transformers", "tauon_train", "tauon_serve", "tauon_core", "kubernetes")

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.FORBIDDEN:
            raise ImportError(f"tauon.client imported {name}")
        return None


def test_client_imports_no_torch() -> None:
    saved = dict(sys.modules)
    blocker = _Blocker()
    try:
        for mod in list(sys.modules):
            if mod.split(".")[0] in ("tauon", *_Blocker.FORBIDDEN):
                del sys.modules[mod]
        sys.meta_path.insert(0, blocker)
        for mod in ("tauon.client", "tauon.client.cluster", "tauon.client.local", "tauon.cli"):
            importlib.import_module(mod)
        importlib.import_module("tauon.cli").build_parser()  # the node agent's sync client stays lazy
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.clear()
        sys.modules.update(saved)


TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def test_pretrain_builds_the_hand_written_manifest(tmp_path: Path) -> None:
    client = Client(local=True, workdir=tmp_path)
    job = client.build_fine_tune(
        "tiny",
        model=None,
        init="scratch",
        task="causal-lm",
        model_config=TINY_LLAMA,
        tokenizer="pvc://data/tokenizers/tiny-llama",
        dataset="pvc://data/corpus.jsonl",
        dataset_type="text",
        packing=True,
        strategy="fsdp",
        output="pvc://out/tiny",
        num_nodes=2,
        epochs=20,
        learning_rate=3e-3,
    )
    client.close()
    hand = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {
            "model": {
                "init": "scratch",
                "task": "causal-lm",
                "config": TINY_LLAMA,  # Hugging Face keys are kept as they are
                "tokenizer": "pvc://data/tokenizers/tiny-llama",
            },
            "dataset": {"source": "pvc://data/corpus.jsonl", "type": "text", "packing": True},
            "hyperparameters": {"epochs": 20, "learningRate": 3.0e-3},
            "parallelism": {"strategy": "fsdp"},
            "output": {"storage": "pvc://out/tiny"},
            "numNodes": 2,
        },
    }
    assert build.manifest(job) == hand == roundtrip(FineTuneJob, hand)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model_config": None}, "spec.model.config"),
        ({"tokenizer": None}, "spec.model.tokenizer"),
        ({"init": None, "model": None}, "spec.model.source"),
        ({"strategy": "zero3"}, "spec.parallelism.strategy"),
    ],
)
def test_pretrain_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {
        "model": None,
        "init": "scratch",
        "task": "causal-lm",
        "model_config": TINY_LLAMA,
        "tokenizer": "pvc://t/tok",
        "dataset": "pvc://d/x",
        "output": "pvc://o/x",
    }
    args.update(kwargs)
    with pytest.raises(SpecError) as e:
        build.finetunejob("job", **args)
    assert field in e.value.fields, e.value.fields


def test_serve_runtime_and_generation() -> None:
    isvc = build.inferenceservice(
        "llm", source="pvc://models/tiny", runtime="tauon", generation={"max_new_tokens": 16}
    )
    hand = {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "llm", "namespace": "default"},
        "spec": {
            "model": {"source": "pvc://models/tiny"},
            "runtime": "tauon",
            "generation": {"maxNewTokens": 16},
        },
    }
    assert build.manifest(isvc) == hand == roundtrip(InferenceService, hand)


def test_cli_reports_bad_use_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tauon.cli import main

    assert main(["wait", "x", "--kubeconfig", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tauon: no usable Kubernetes configuration") and err.count("\n") == 1
    assert main(["logs", "nope", "--local", "--workdir", str(tmp_path)]) == 1
    assert (
        capsys.readouterr().err == f"tauon: FineTuneJob 'nope' not found in local run directory {tmp_path}\n"
    )


def test_a_finished_local_run_is_found_again(tmp_path: Path) -> None:
    out = tmp_path / "done"
    (out / "model").mkdir(parents=True)
    (out / "status.json").write_text(
        json.dumps(
            {
                "phase": "Succeeded",
                "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}],
                "progress": {"step": 30, "totalSteps": 30, "percent": 100, "loss": 0.3},
                "output": {"model": f"file://{out / 'model'}", "metrics": {"evalAccuracy": 0.9, "steps": 30}},
            }
        )
    )
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "status.json").write_text(json.dumps(FAILED_STATUS))
    with Client(local=True, workdir=tmp_path) as client:
        with pytest.raises(
            NotFound
        ):  # a failed run of an earlier process is not kept: fine_tune runs it again
            client.job("failed")
        job = client.job("done")
        status = job.wait(timeout=5, progress=False)
        assert status.phase == "Succeeded" and status.progress.percent == 100
        assert job.metrics == {"evalAccuracy": 0.9, "steps": 30}
        assert job.model_uri == f"file://{out / 'model'}"
        with pytest.raises(NotFound, match="FineTuneJob 'missing' not found in local run directory"):
            client.serve("svc", fine_tune_job="missing")


def test_chat_without_openai_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from tauon.client import InferenceServiceHandle, MissingDependency
    from tauon.client.url import UrlBackend

    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    svc = InferenceServiceHandle(UrlBackend("http://127.0.0.1:9"), "llm")
    with pytest.raises(MissingDependency, match="needs the 'openai' package: pip install openai"):
        svc.chat("hi")


# -- the OpenAI API through status.openai.baseURL (either runtime) -------------------------------------


class _VllmStandIn(BaseHTTPRequestHandler):
    """Answers like `vllm serve`: the OpenAI API under /v1 only and /health; anything else is 404."""

    paths: list[str] = []

    def log_message(self, *args: Any) -> None:
        return None

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.paths.append(f"GET {self.path}")
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/v1/models":
            self._json(
                200, {"object": "list", "data": [{"id": "llm", "object": "model", "owned_by": "vllm"}]}
            )
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        self.paths.append(f"POST {self.path}")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("model") != "llm":
            self._json(404, {"error": {"message": "model not found", "type": "NotFoundError", "code": 404}})
        elif self.path == "/v1/completions":
            self._json(
                200,
                {
                    "id": "c",
                    "object": "text_completion",
                    "created": 0,
                    "model": "llm",
                    "choices": [{"index": 0, "text": " world", "finish_reason": "length"}],
                },
            )
        elif self.path == "/v1/chat/completions" and body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in ("Hel", "lo"):
                chunk = {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "llm",
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
        elif self.path == "/v1/chat/completions":
            self._json(
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "llm",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "Hello"},
                        }
                    ],
                },
            )
        else:
            self._json(404, {"detail": "Not Found"})


@pytest.fixture
def vllm_stand_in() -> Iterator[str]:
    _VllmStandIn.paths = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VllmStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _ClusterLike:
    """A backend whose InferenceService status is the operator's for a vLLM predictor (in-cluster URLs)
    and whose endpoint is what a port-forward gives: the stand-in server."""

    namespace = "default"
    where = "a cluster"

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint

    def get(self, kind: str, name: str) -> dict[str, Any]:
        url = f"http://{name}.default.svc.cluster.local"
        status = {
            "phase": "Ready",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}],
            "url": url,
            "resolved": {"runtime": "vllm"},
            "openai": {"baseURL": f"{url}/v1", "model": name},
        }
        return {"kind": kind, "metadata": {"name": name}, "status": status}

    def endpoint(self, name: str) -> str:
        return self._endpoint

    def close(self) -> None:
        return None


def test_sdk_reaches_a_vllm_runtime_through_the_status_base_url(vllm_stand_in: str) -> None:
    from tauon.client import InferenceServiceHandle
    from tauon.client.handles import openai_base

    svc = InferenceServiceHandle(_ClusterLike(vllm_stand_in), "llm")  # type: ignore[arg-type]
    assert svc.status().resolved.runtime == "vllm"
    assert svc.openai_base_url == f"{vllm_stand_in}/v1"
    assert svc.chat("hi") == "Hello"
    assert "".join(svc.chat([{"role": "user", "content": "hi"}], stream=True)) == "Hello"
    assert svc.complete("hello") == " world"
    assert [m.id for m in svc.openai_client().models.list().data] == ["llm"]
    assert all(p.split()[1].startswith("/v1/") for p in _VllmStandIn.paths), _VllmStandIn.paths
    assert openai_base("http://127.0.0.1:1/", None) == "http://127.0.0.1:1/v1"
    assert openai_base("http://h:1", "http://svc.ns.svc.cluster.local/v1/") == "http://h:1/v1"


def test_tauon_chat_with_url_reaches_a_vllm_server(
    vllm_stand_in: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tauon chat NAME --url URL` against a server with vLLM's paths: ready through /health, chat
    through /v1."""
    from tauon.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "llm", "--url", vllm_stand_in, "--timeout", "10"]) == 0
    out = capsys.readouterr()
    assert out.out == "> Hello\n> "  # the prompt, the streamed answer, the next prompt (then EOF)
    assert f"at {vllm_stand_in}/v1" in out.err
    assert "POST /v1/chat/completions" in _VllmStandIn.paths


# -- FineTuneSweep -----------------------------------------------------------------------------------------


def _sweep_kwargs(**over: Any) -> dict[str, Any]:
    return {
        "model": MINILM,
        "dataset": str(DATA),
        "num_labels": 2,
        "label_field": "label",
        "validation_split": 0.15,
        "method": "lora",
        "max_steps": 20,
        "eval_every_steps": 5,
        "parameters": [
            {"name": "learning_rate", "type": "float", "min": 1e-4, "max": 1e-2, "log": True},
            {"name": "method.lora.rank", "type": "int", "values": [4, 8]},
        ],
        "objective": "eval_accuracy",
        "goal": "maximize",
        "algorithm": "random",
        "seed": 3,
        "early_stopping": {"type": "median", "min_steps": 5},
        "max_trials": 4,
        "parallel_trials": 2,
        **over,
    }


def test_sweep_builds_the_hand_written_manifest(tmp_path: Path) -> None:
    from tauon.api import FineTuneSweep

    with Client(local=True, workdir=tmp_path) as client:
        sweep = client.build_sweep("lr", **_sweep_kwargs())
    got = build.manifest(sweep)
    assert got == {
        "apiVersion": "tauon.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "lr", "namespace": "default"},
        "spec": {
            "template": {
                "spec": {
                    "model": {"source": MINILM, "task": "sequence-classification", "numLabels": 2},
                    "dataset": {"source": f"file://{DATA}", "labelField": "label", "validationSplit": 0.15},
                    "method": {"type": "lora"},
                    "hyperparameters": {"maxSteps": 20, "evalEverySteps": 5},
                    "output": {"storage": f"file://{tmp_path / 'lr'}"},
                }
            },
            "parameters": [
                {"name": "learningRate", "type": "float", "min": 1e-4, "max": 1e-2, "log": True},
                {"name": "method.lora.rank", "type": "int", "values": [4, 8]},
            ],
            "objective": {"metric": "evalAccuracy", "goal": "maximize"},
            "algorithm": {"type": "random", "seed": 3},
            "earlyStopping": {"type": "median", "minSteps": 5},
            "maxTrials": 4,
            "parallelTrials": 2,
        },
    }
    assert build.manifest(FineTuneSweep.model_validate(got)) == got


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"parallel_trials": 5}, "spec"),  # more than maxTrials
        ({"parameters": [{"name": "nope", "type": "float", "min": 1, "max": 2}]}, "spec"),
        (
            {"parameters": [{"name": "learningRate", "type": "float", "min": 2, "max": 1}]},
            "spec.parameters.0",
        ),
        ({"objective": "accuracy"}, "spec.objective.metric"),
        ({"algorithm": "bayes"}, "spec.algorithm.type"),
        ({"max_trials": 0}, "spec.maxTrials"),
        ({"num_labels": None, "task": "sequence-classification"}, "spec.template.spec.model.numLabels"),
        ({"max_steps": -1}, "spec.template.spec.hyperparameters.maxSteps"),
    ],
)
def test_sweep_errors_name_the_field(tmp_path: Path, over: dict[str, Any], field: str) -> None:
    with Client(local=True, workdir=tmp_path) as client, pytest.raises(SpecError) as e:
        client.sweep("lr", **_sweep_kwargs(**over))
    assert e.value.kind == "FineTuneSweep" and field in e.value.fields, e.value.fields
    assert not (tmp_path / ".sdk").exists()  # nothing was started


def test_sweep_name_leaves_room_for_trial_names(tmp_path: Path) -> None:
    with Client(local=True, workdir=tmp_path) as client, pytest.raises(SpecError, match="<name>-t<k>"):
        client.build_sweep("s" * 38, **_sweep_kwargs())


SWEEP_DONE = {
    "phase": "Succeeded",
    "conditions": [{"type": "Succeeded", "status": "True", "reason": "AllTrialsFinished", "message": "2"}],
    "finishedTrials": 2,
    "trials": [
        {"name": "lr-t0", "parameters": {"learningRate": 0.001}, "phase": "Succeeded", "objective": 0.8},
        {
            "name": "lr-t1",
            "parameters": {"learningRate": 0.01},
            "phase": "Failed",
            "message": "PermanentError: x",
        },
    ],
    "best": {"trial": "lr-t0", "parameters": {"learningRate": 0.001}, "objective": 0.8, "model": "file:///m"},
}


def test_local_sweep_handle_reads_status_json(tmp_path: Path) -> None:
    from tauon.client import SweepFailed, SweepHandle

    with Client(local=True, workdir=tmp_path, poll=0.01) as client:
        _local_run(client, tmp_path, "FineTuneSweep", "lr", FakeProc())
        handle = client.get_sweep("lr")
        assert isinstance(handle, SweepHandle) and handle.phase == "Pending" and handle.best() is None
        status_json = tmp_path / "lr" / "status.json"
        status_json.parent.mkdir()
        status_json.write_text(json.dumps(SWEEP_DONE))
        status = handle.wait(timeout=5, progress=False)
        best = handle.best()
        assert status.phase == "Succeeded" and best is not None
        assert (best.trial, best.objective, best.model) == ("lr-t0", 0.8, "file:///m")
        assert [(t.name, t.phase) for t in handle.trials()] == [("lr-t0", "Succeeded"), ("lr-t1", "Failed")]

        failed = {
            "phase": "Failed",
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "TooManyFailedTrials", "message": "3 failed"}
            ],
        }
        status_json.write_text(json.dumps(failed))
        with pytest.raises(SweepFailed, match="TooManyFailedTrials: 3 failed"):
            handle.wait(timeout=5, progress=False)

        _local_run(client, tmp_path, "FineTuneSweep", "crashed", FakeProc(1))
        with pytest.raises(SweepFailed, match="LocalRunFailed: tauon run exited with code 1"):
            client.get_sweep("crashed").wait(timeout=5, progress=False)


def test_a_finished_local_sweep_is_found_again(tmp_path: Path) -> None:
    (tmp_path / "lr" / ".sweep").mkdir(parents=True)  # what tauon.local.sweep keeps beside status.json
    (tmp_path / "lr" / "status.json").write_text(json.dumps(SWEEP_DONE))
    with Client(local=True, workdir=tmp_path) as client:
        with pytest.raises(NotFound):  # a sweep's run directory is not a job's
            client.job("lr")
        handle = client.get_sweep("lr")
        best = handle.best()
        assert best is not None and best.trial == "lr-t0"
        handle.delete()
        assert not (tmp_path / "lr").exists()
        with pytest.raises(NotFound, match="FineTuneSweep 'lr' not found"):
            client.get_sweep("lr")


def test_serve_a_sweep_builds_its_ref_and_needs_it_succeeded(tmp_path: Path) -> None:
    from tauon.client import NotReady

    isvc = build.inferenceservice("best", fine_tune_sweep="lr")
    assert build.manifest(isvc)["spec"] == {"model": {"fineTuneSweepRef": {"name": "lr"}}}
    with pytest.raises(SpecError, match="exactly one of fine_tune_job=, fine_tune_sweep= and source="):
        build.inferenceservice("best", fine_tune_sweep="lr", source="hf://x/y")
    with Client(local=True, workdir=tmp_path) as client:
        with pytest.raises(NotFound, match="FineTuneSweep 'lr' not found"):
            client.serve("best", fine_tune_sweep="lr")
        _local_run(client, tmp_path, "FineTuneSweep", "lr", FakeProc())
        with pytest.raises(NotReady, match="cannot serve FineTuneSweep 'lr': it is Pending"):
            client.serve("best", fine_tune_sweep=client.get_sweep("lr"))


def test_tauon_wait_knows_a_local_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tauon.cli import main

    (tmp_path / "lr" / ".sweep").mkdir(parents=True)
    (tmp_path / "lr" / "status.json").write_text(json.dumps(SWEEP_DONE))
    assert main(["wait", "lr", "--local", "--workdir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FineTuneSweep lr Succeeded: best trial lr-t0"), out
    assert main(["wait", "none", "--local", "--workdir", str(tmp_path), "--quiet"]) == 1
    assert "FineTuneJob, InferenceService or FineTuneSweep" in capsys.readouterr().err
