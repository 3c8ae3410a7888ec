"""Model server, pure parts, in-process: request validation, argument parsing, model-source resolution,
batch splitting and the batcher itself. The real server process is tested in tests/workload/test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from tauon_serve.batching import (
    BatcherClosed,
    DynamicBatcher,
    PendingRequest,
    QueueFull,
    QueueTimeout,
    Segment,
    take_batch,
)
from tauon_serve.protocol import (
    CLASSIFICATION_OUTPUTS,
    Limits,
    RequestError,
    check_content_type,
    parse_json_body,
    parse_v1_predict,
    parse_v2_infer,
)

LIMITS = Limits(max_instances=4, max_text_chars=10)


def v2_body(data: list[Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(data)], "data": data}], **extra}


def test_parse_v1_accepts_strings_and_text_objects() -> None:
    assert parse_v1_predict({"instances": ["a", {"text": "b"}]}, LIMITS) == ["a", "b"]


def test_parse_v2_valid_request() -> None:
    body = {
        "id": "r1",
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"], "parameters": {}}
        ],
        "outputs": [{"name": "probabilities"}, {"name": "probabilities"}],
    }
    req = parse_v2_infer(body, LIMITS, CLASSIFICATION_OUTPUTS)
    assert req.texts == ["a", "b"] and req.id == "r1" and req.outputs == ["probabilities"]
    assert parse_v2_infer(v2_body(["x"]), LIMITS, CLASSIFICATION_OUTPUTS).outputs is None


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"instances": ["a"] * 5}, 413, "has 5 instances; the limit is 4"),
        ({"instances": ["a" * 11]}, 413, "instances[0] is 11 characters; the limit is 10"),
        (
            {"instances": [None]},
            400,
            'instances[0] must be a string or an object with a string "text" field, got null',
        ),
        ({"instances": [{"text": 1}]}, 400, "instances[0].text must be a string"),
        ("x", 400, "request body must be a JSON object, got string"),
    ],
)
def test_parse_v1_errors(body: Any, status: int, message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_v1_predict(body, LIMITS)
    assert err.value.status == status and message in err.value.message


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, 400, "describes 2"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1], "data": ["a"]}]}, 400, "shape must be"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [True], "data": ["a"]}]}, 400, "shape must be"),
        ({"inputs": [{"name": "text", "datatype": None, "shape": [1], "data": ["a"]}]}, 400, "BYTES, got null"),
        ({"inputs": [{"name": 3}]}, 400, "inputs[0].name must be a string"),
        ({"inputs": ["text"]}, 400, "inputs[0] must be an object"),
        ({**v2_body(["a"]), "outputs": "label"}, 400, "outputs must be a list"),
        ({"inputs": v2_body(["a"])["inputs"] * 2}, 400, "inputs[1] repeats the input"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [["a"]]}]}, 400, "data[0] must be a string, got array"),
    ],
)  # fmt: skip
def test_parse_v2_errors(body: Any, status: int, message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_v2_infer(body, LIMITS, CLASSIFICATION_OUTPUTS)
    assert err.value.status == status and message in err.value.message


def test_content_type_and_json_checks() -> None:
    for ok in (None, "", "application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        check_content_type(ok)
    with pytest.raises(RequestError) as err:
        check_content_type("text/plain")
    assert err.value.status == 415
    assert parse_json_body(b' {"a": 1} ') == {"a": 1}
    with pytest.raises(RequestError, match="line 1 column 2"):
        parse_json_body(b"{x")


def test_parse_args_env_and_flags() -> None:
    from tauon_serve.config import parse_args

    env = {
        "TAUON_MODEL_DIR": "/m",
        "TAUON_MODEL_NAME": "n",
        "TAUON_PORT": "9000",
        "TAUON_MAX_LATENCY_MS": "0",
    }
    cfg = parse_args([], env=env)
    assert (cfg.model, cfg.name, cfg.port, cfg.max_latency_ms, cfg.max_batch_size) == (
        "/m",
        "n",
        9000,
        0.0,
        32,
    )
    cfg = parse_args(["--port", "9001", "--max-batch-size", "4"], env=env)
    assert cfg.port == 9001 and cfg.max_batch_size == 4  # a flag wins over the environment
    with pytest.raises(SystemExit):
        parse_args(["--max-batch-size", "0"], env=env)
    with pytest.raises(SystemExit):
        parse_args([], env={"TAUON_MODEL_NAME": "n"})


def test_parse_args_llm_flags_from_env_and_flags() -> None:
    """The flags the operator renders for spec.generation (and their environment variables)."""
    from tauon_serve.config import parse_args

    env = {
        "TAUON_MODEL_DIR": "/m",
        "TAUON_MODEL_NAME": "n",
        "TAUON_MAX_MODEL_LENGTH": "4096",
        "TAUON_MAX_NEW_TOKENS": "256",
        "TAUON_MAX_CONCURRENT_SEQUENCES": "64",
        "TAUON_MAX_QUEUED_SEQUENCES": "9",
        "TAUON_MAX_QUEUE_WAIT_SECONDS": "5",
        "TAUON_LIMIT_CONCURRENCY": "100",
    }
    cfg = parse_args([], env=env)
    assert (cfg.max_model_length, cfg.max_new_tokens, cfg.max_concurrent_sequences) == (4096, 256, 64)
    assert (cfg.max_queued_sequences, cfg.max_queue_wait_seconds, cfg.limit_concurrency) == (9, 5.0, 100)
    cfg = parse_args(["--max-concurrent-sequences", "3", "--max-model-length", "128"], env=env)
    assert cfg.max_concurrent_sequences == 3 and cfg.max_model_length == 128
    for bad in (
        ["--max-concurrent-sequences", "0"],
        ["--max-model-length", "-1"],
        ["--max-queued-sequences=0"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad, env=env)


def test_model_source_resolution(tmp_path: Path) -> None:
    from tauon_core.sources import ModelSourceError
    from tauon_serve.predictor import detect_task, resolve_model_source

    bundled = resolve_model_source("hf://sentence-transformers/all-MiniLM-L6-v2")
    assert (Path(bundled) / "config.json").is_file()
    assert resolve_model_source("hf://org/other-model") == "org/other-model"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(f"file://{tmp_path}") == str(tmp_path)
    assert resolve_model_source("s3://bucket/model/") == "s3://bucket/model/"  # downloaded at load
    for bad in (str(tmp_path / "missing"), "gs://bucket/model", "s3:///model", "hf://"):
        with pytest.raises(ModelSourceError):
            resolve_model_source(bad)
    assert detect_task(["BertForSequenceClassification"]) == ("sequence-classification", True)
    assert detect_task(["GPT2LMHeadModel"]) == ("causal-lm", True)
    assert detect_task(["LlamaForCausalLM"]) == ("causal-lm", True)
    assert detect_task(["BertModel"]) == ("sequence-classification", False)


# -- pure parts: batch splitting and the batcher ---------------------------------------------------


def _pending(n: int, tag: str = "") -> PendingRequest[str, str]:
    loop = asyncio.new_event_loop()
    fut: asyncio.Future[list[str]] = loop.create_future()
    loop.close()
    return PendingRequest([f"{tag}{i}" for i in range(n)], fut, 0.0, [None] * n, n)


def test_take_batch_splits_and_keeps_order() -> None:
    a, b, c = _pending(3, "a"), _pending(5, "b"), _pending(20, "c")
    queue: deque[Segment[str, str]] = deque(Segment(r, 0, len(r.items)) for r in (a, b, c))
    first = take_batch(queue, 8)
    assert [(s.request, s.start, s.stop) for s in first] == [(a, 0, 3), (b, 0, 5)]
    second = take_batch(queue, 8)
    assert [(s.request, s.start, s.stop) for s in second] == [(c, 0, 8)]
    third = take_batch(queue, 100)
    assert [(s.request, s.start, s.stop) for s in third] == [(c, 8, 20)]
    assert not queue and take_batch(queue, 8) == []


def test_take_batch_single_request_and_drops_done() -> None:
    a, b, c = _pending(2), _pending(2), _pending(2)
    b.future.cancel()
    queue: deque[Segment[str, str]] = deque(Segment(r, 0, 2) for r in (a, b, c))
    assert [s.request for s in take_batch(queue, 8, single_request=True)] == [a]
    assert [s.request for s in take_batch(queue, 8, single_request=True)] == [c]  # b was cancelled
    assert not queue


class _Recorder:
    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, items: list[str]) -> list[str]:
        with self.lock:
            self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot handle {self.fail_on}")
        return [s.upper() for s in items]


async def test_batcher_merges_concurrent_requests() -> None:
    rec = _Recorder()
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=32, max_latency_s=0.05)
    b.start()
    results = await asyncio.gather(*(b.submit([f"r{i}"]) for i in range(10)))
    await b.close()
    assert results == [[f"R{i}"] for i in range(10)]
    assert [len(x) for x in rec.batches] == [10]


async def test_batcher_splits_large_request_in_order() -> None:
    rec = _Recorder()
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=4, max_latency_s=0.01)
    b.start()
    items = [f"x{i}" for i in range(10)]
    assert await b.submit(items) == [s.upper() for s in items]
    await b.close()
    assert [len(x) for x in rec.batches] == [4, 4, 2]


async def test_batcher_latency_zero_never_merges_requests() -> None:
    rec = _Recorder(delay=0.01)
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=32, max_latency_s=0)
    b.start()
    await asyncio.gather(*(b.submit([f"{k}-{i}" for i in range(3)]) for k in range(6)))
    await b.close()
    assert len(rec.batches) == 6
    assert all(len({s.split("-")[0] for s in batch}) == 1 and len(batch) == 3 for batch in rec.batches)


async def test_batcher_max_batch_one() -> None:
    rec = _Recorder()
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=1, max_latency_s=0.05)
    b.start()
    await asyncio.gather(b.submit(["a", "b"]), b.submit(["c"]))
    await b.close()
    assert sorted(len(x) for x in rec.batches) == [1, 1, 1]


async def test_batcher_lone_request_runs_at_once_without_the_window() -> None:
    """Adaptive batching (issue 15): a request that finds the model idle does not wait for the window.
    (Replaces the old test that asserted a lone request waited the whole window.)"""
    rec = _Recorder()
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=32, max_latency_s=2.0)
    b.start()
    t0 = time.perf_counter()
    assert await b.submit(["solo"]) == ["SOLO"]
    assert time.perf_counter() - t0 < 1.0
    await b.close()


async def test_batcher_backlog_waits_for_the_window_then_runs_a_partial_batch() -> None:
    """Work that queued while a pass ran is a backlog: it waits up to the window (from its oldest
    instance) for the batch to fill, and then runs together."""
    rec = _Recorder(delay=0.1)
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=32, max_latency_s=0.3)
    b.start()
    first = asyncio.ensure_future(b.submit(["first"]))
    await asyncio.sleep(0.02)  # "first" is running now
    t0 = time.perf_counter()
    queued = asyncio.ensure_future(b.submit(["q1"]))
    await asyncio.sleep(0.15)  # the pass has ended; the backlog waits for the window
    late = asyncio.ensure_future(b.submit(["q2"]))
    assert await queued == ["Q1"] and await late == ["Q2"] and await first == ["FIRST"]
    elapsed = time.perf_counter() - t0
    await b.close()
    assert [sorted(x) for x in rec.batches] == [["first"], ["q1", "q2"]]
    assert 0.25 <= elapsed < 3.0


async def test_batcher_keeps_closed_loop_clients_together() -> None:
    """Closed-loop clients answer each response with a new request, a few ms apart. Running the first
    arrival at once would split them into alternating passes of 1 and n-1 (what bench/serving measured:
    mean batch 15.5 at 32 clients); right after a pass of n the batcher waits for n (within the window)."""
    rec = _Recorder(delay=0.02)
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=32, max_latency_s=0.2)
    b.start()

    async def client(k: int) -> None:
        for i in range(5):
            await b.submit([f"{k}-{i}"])
            await asyncio.sleep(0.003 * k)  # the round trip differs per client

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(4)))
    elapsed = time.perf_counter() - t0
    await b.close()
    assert [len(x) for x in rec.batches] == [4] * 5
    assert elapsed < 1.0  # each wait ended when the 4th request came, not at the window


def test_batcher_fill_target() -> None:
    b: DynamicBatcher[str, str] = DynamicBatcher(_Recorder(), max_batch_size=8, max_latency_s=0.01)
    assert b._fill_target(now=0.0) == 0  # idle model, no history: run at once
    b._last_items, b._last_end = 1, 0.0
    assert b._fill_target(now=0.001) == 0  # a lone client's pass: never wait
    b._last_items = 5
    assert b._fill_target(now=0.01) == 5  # its clients are coming back
    assert b._fill_target(now=0.11) == 0  # too long ago (10 windows, at least 50 ms)
    b._last_items = 50
    assert b._fill_target(now=0.01) == 8  # capped at max_batch_size
    b._backlog = True
    assert b._fill_target(now=100.0) == 8


async def test_batcher_queue_wait_deadline() -> None:
    rec = _Recorder(delay=0.3)
    b: DynamicBatcher[str, str] = DynamicBatcher(
        rec, max_batch_size=1, max_latency_s=0.0, max_queue_wait_s=0.1
    )
    b.start()
    first = asyncio.ensure_future(b.submit(["a"]))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueTimeout):
        await b.submit(["b"])  # waited 0.3 s behind "a", longer than 0.1 s
    assert await first == ["A"]
    await b.close()
    assert rec.batches == [["a"]]


async def test_batcher_isolates_a_failing_request() -> None:
    rec = _Recorder(fail_on="bad")
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=32, max_latency_s=0.05)
    b.start()
    good, bad = await asyncio.gather(b.submit(["ok1", "ok2"]), b.submit(["bad"]), return_exceptions=True)
    await b.close()
    assert good == ["OK1", "OK2"]
    assert isinstance(bad, ValueError)
    assert len(rec.batches) == 3  # merged pass failed, then each request alone


async def test_batcher_close_drains_queue_and_refuses_new_work() -> None:
    rec = _Recorder(delay=0.1)
    depths: list[int] = []
    b: DynamicBatcher[str, str] = DynamicBatcher(
        rec, max_batch_size=32, max_latency_s=30, max_queued_items=5, on_queue_depth=depths.append
    )
    b.start()
    busy = asyncio.ensure_future(b.submit(["x"]))  # idle model: runs at once; what follows is a backlog
    await asyncio.sleep(0.01)
    pending = asyncio.ensure_future(b.submit(["a", "b", "c"]))
    await asyncio.sleep(0.2)
    assert b.queued == 3
    with pytest.raises(QueueFull):
        await b.submit(["d", "e", "f"])
    t0 = time.perf_counter()
    await b.close()  # must not wait for the 30 s window
    assert await pending == ["A", "B", "C"] and await busy == ["X"]
    assert time.perf_counter() - t0 < 2
    assert depths[-1] == 0
    with pytest.raises(BatcherClosed):
        await b.submit(["late"])


async def test_a_request_whose_client_disconnected_is_dropped_before_its_pass() -> None:
    """Issue 13: the server awaits each request with ``until_disconnect``; a client that goes away while
    its request is queued behind a running pass gets nothing computed."""
    from tauon_serve.rest.common import ClientGone, until_disconnect

    class GoneClient:
        def __init__(self) -> None:
            self.gone = asyncio.Event()

        async def receive(self) -> dict[str, Any]:
            await self.gone.wait()
            return {"type": "http.disconnect"}

    rec = _Recorder(delay=0.2)
    b: DynamicBatcher[str, str] = DynamicBatcher(rec, max_batch_size=32, max_latency_s=0.01)
    b.start()
    busy = asyncio.ensure_future(b.submit(["busy"]))
    await asyncio.sleep(0.02)
    client = GoneClient()
    waiting = asyncio.ensure_future(until_disconnect(client, b.submit(["abandoned"])))  # type: ignore[arg-type]
    stays = asyncio.ensure_future(until_disconnect(GoneClient(), b.submit(["kept"])))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    client.gone.set()
    with pytest.raises(ClientGone):
        await waiting
    assert await busy == ["BUSY"] and await stays == ["KEPT"]
    await b.close()
    assert rec.batches == [["busy"], ["kept"]]


def test_metrics_middleware_labels_routes_and_caches_them() -> None:
    """Every request's endpoint label is its route template (405s keep the path's template, unknown
    paths are "unmatched"); the answer per (method, path) is cached, and a full cache changes nothing."""
    from fastapi import FastAPI

    from tauon_serve.metrics import ServerMetrics
    from tauon_serve.rest.metrics import MetricsMiddleware

    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str) -> dict[str, str]:
        return {}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, str]:
        return {}

    mw = MetricsMiddleware(app, ServerMetrics(), app.router)

    def label(method: str, path: str) -> str:
        return mw._endpoint({"type": "http", "method": method, "path": path})

    for _ in range(2):  # the second round comes from the cache
        assert label("POST", "/v1/models/m:predict") == "/v1/models/{name}:predict"
        assert label("GET", "/v1/models/m:predict") == "/v1/models/{name}:predict"  # 405
        assert label("GET", "/v2/health/ready") == "/v2/health/ready"
        assert label("GET", "/nope") == "unmatched"
    assert len(mw._endpoints) == 4
    mw.ENDPOINT_CACHE = 4
    assert label("POST", "/v1/models/other:predict") == "/v1/models/{name}:predict"
    assert len(mw._endpoints) == 4, "a full cache is not grown"


# -- the V2 schema and the predictor interface -------------------------------------------------------


def test_one_v2_schema_gives_metadata_tensors_and_v1_predictions() -> None:
    """The result types have exactly the schema's outputs as fields; tensors, metadata and V1 keys all
    come from the schema (written once, in protocol.py)."""
    from dataclasses import fields

    from tauon_serve.protocol import (
        CLASSIFICATION_SCHEMA,
        GENERATION_OUTPUTS,
        GENERATION_SCHEMA,
        Classification,
        Generation,
        model_metadata,
        v1_prediction,
        v2_outputs,
    )

    assert {f.name for f in fields(Classification)} == set(CLASSIFICATION_OUTPUTS)
    assert {f.name for f in fields(Generation)} == set(GENERATION_OUTPUTS)
    results = [Classification(1, "pos", [0.25, 0.75]), Classification(0, "neg", [0.5, 0.5])]
    assert v2_outputs(CLASSIFICATION_SCHEMA, results, None) == [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 0.5, 0.5]},
        {"name": "label_name", "datatype": "BYTES", "shape": [2], "data": ["pos", "neg"]},
    ]
    assert [o["name"] for o in v2_outputs(CLASSIFICATION_SCHEMA, results, ["label_name", "label"])] == [
        "label_name",
        "label",
    ]
    assert list(v1_prediction(results[0]).items()) == [
        ("label", 1),
        ("labelName", "pos"),
        ("probabilities", [0.25, 0.75]),
    ]
    assert v1_prediction(Generation("hi")) == {"generatedText": "hi"}
    meta = model_metadata("m", CLASSIFICATION_SCHEMA, 2, {"task": "t"})
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "label_name", "datatype": "BYTES", "shape": [-1]},
    ]
    assert model_metadata("m", GENERATION_SCHEMA, 0, {})["outputs"] == [
        {"name": "generated_text", "datatype": "BYTES", "shape": [-1]}
    ]


def test_the_app_serves_any_predictor_through_the_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state and the routes know the model only as a Predictor: a fake one (no torch) is loaded,
    started, served on V1, V2 and metadata, refused on the OpenAI routes, drained and closed."""
    from concurrent.futures import Executor

    from fastapi.testclient import TestClient

    from tauon_serve import state as state_mod
    from tauon_serve.config import parse_args
    from tauon_serve.metrics import ServerMetrics
    from tauon_serve.predictor import Predictor
    from tauon_serve.protocol import CLASSIFICATION_SCHEMA, Classification
    from tauon_serve.serve import create_app

    class Fake(Predictor):
        task = "fake-task"
        schema = CLASSIFICATION_SCHEMA
        labels = ["neg", "pos"]
        calls: list[str] = []

        def warm_up(self) -> None:
            self.calls.append("warm_up")

        def start(self, executor: Executor, metrics: ServerMetrics) -> None:
            self.calls.append("start")

        def begin_drain(self) -> None:
            self.calls.append("drain")

        async def close(self, grace_seconds: float) -> None:
            self.calls.append("close")

        def check_inputs(self, texts: Any, where: Any) -> None:
            if "bad" in texts:
                raise RequestError(400, f"{where(list(texts).index('bad'))} is bad")

        async def infer(self, texts: list[str]) -> list[Classification]:
            return [Classification(len(t) % 2, self.labels[len(t) % 2], [0.5, 0.5]) for t in texts]

        def describe(self) -> str:
            return "fake"

    fake = Fake()
    monkeypatch.setattr(state_mod, "load_predictor", lambda cfg: fake)
    state = state_mod.ServerState(parse_args(["--model", "/m", "--name", "m"], env={}))
    with TestClient(create_app(state)) as client:
        for _ in range(100):
            if client.get("/v2/health/ready").status_code == 200:
                break
            time.sleep(0.02)
        assert fake.calls == ["warm_up", "start"]
        r = client.post("/v1/models/m:predict", json={"instances": ["ab", "abc"]})
        assert r.json() == {
            "predictions": [
                {"label": 0, "labelName": "neg", "probabilities": [0.5, 0.5]},
                {"label": 1, "labelName": "pos", "probabilities": [0.5, 0.5]},
            ]
        }
        r = client.post("/v2/models/m/infer", json={**v2_body(["a"]), "outputs": [{"name": "label_name"}]})
        assert r.json()["outputs"] == [
            {"name": "label_name", "datatype": "BYTES", "shape": [1], "data": ["pos"]}
        ]
        r = client.post("/v2/models/m/infer", json=v2_body(["ok", "bad"]))
        assert r.status_code == 400 and r.json() == {"error": "inputs[0].data[1] is bad"}
        meta = client.get("/v2/models/m").json()
        assert meta["parameters"]["task"] == "fake-task" and meta["parameters"]["labels"] == ["neg", "pos"]
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert fake.calls == ["warm_up", "start", "drain", "close"]


# -- hostile requests (issue 22): bodies, liveness, flags ---------------------------------------------


def test_parse_args_hardening_flags() -> None:
    from tauon_serve.config import parse_args

    cfg = parse_args(["--model", "/m", "--name", "n"], env={})
    assert (cfg.max_body_bytes, cfg.max_openai_body_bytes, cfg.max_inflight_body_bytes) == (
        16 << 20,
        2 << 20,
        32 << 20,
    )
    assert (cfg.health_port, cfg.header_timeout_seconds, cfg.graceful_timeout_seconds) == (0, 10.0, 25.0)
    env = {
        "TAUON_HEALTH_PORT": "8081",
        "TAUON_HEADER_TIMEOUT_SECONDS": "3",
        "TAUON_MAX_OPENAI_BODY_BYTES": "4096",
    }
    cfg = parse_args(["--model", "/m", "--name", "n"], env=env)
    assert (cfg.health_port, cfg.header_timeout_seconds, cfg.max_openai_body_bytes) == (8081, 3.0, 4096)
    for bad in (
        ["--health-port", "8080"],  # the main port
        ["--header-timeout-seconds", "0"],
        ["--max-inflight-body-bytes", "2048"],  # below --max-body-bytes
    ):
        with pytest.raises(SystemExit):
            parse_args(["--model", "/m", "--name", "n", *bad], env={})


def _fake_app(monkeypatch: pytest.MonkeyPatch, *flags: str, health: str | None = None) -> Any:
    """The state and a TestClient over the real app with a fake causal LM (no torch)."""
    from fastapi.testclient import TestClient

    from tauon_serve.serve import create_app

    state = _fake_state(monkeypatch, *flags, health=health)
    return state, TestClient(create_app(state), raise_server_exceptions=False)


def _fake_state(monkeypatch: pytest.MonkeyPatch, *flags: str, health: str | None = None) -> Any:
    """A server state whose model is a fake causal LM (no torch): V1 echoes the texts ("boom" raises),
    the OpenAI service answers 418 to whatever reaches it."""
    from concurrent.futures import Executor

    from tauon_serve import state as state_mod
    from tauon_serve.config import parse_args
    from tauon_serve.metrics import ServerMetrics
    from tauon_serve.predictor import Predictor
    from tauon_serve.protocol import GENERATION_SCHEMA, Generation

    class FakeService:
        max_model_length = 64

        async def open(self, kind: str, body: Any) -> Any:
            raise RequestError(418, "reached the service")

    class Fake(Predictor):
        task = "causal-lm"
        schema = GENERATION_SCHEMA
        labels: list[str] = []

        def warm_up(self) -> None: ...

        def start(self, executor: Executor, metrics: ServerMetrics) -> None:
            self.openai = FakeService()  # type: ignore[assignment]

        def begin_drain(self) -> None: ...

        async def close(self, grace_seconds: float) -> None: ...

        def check_inputs(self, texts: Any, where: Any) -> None: ...

        async def infer(self, texts: list[str]) -> list[Generation]:
            if texts == ["boom"]:
                raise KeyError("boom")
            return [Generation(t) for t in texts]

        def describe(self) -> str:
            return "fake"

        def health_error(self) -> str | None:
            return health

    monkeypatch.setattr(state_mod, "load_predictor", lambda cfg: Fake())
    return state_mod.ServerState(parse_args(["--model", "/m", "--name", "m", *flags], env={}))


def _wait_ready(client: Any) -> None:
    for _ in range(200):
        if client.get("/v2/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("not ready")


def test_bodies_are_capped_per_route_and_by_the_in_flight_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """B9/N5: OpenAI bodies have a cap of their own, smaller than V1/V2's; a body that would take the
    bodies being read past --max-inflight-body-bytes is answered 503 + Retry-After, small bodies never
    are, and every path gives its share back."""
    flags = (
        "--max-body-bytes=1048576",
        "--max-openai-body-bytes=200000",
        "--max-inflight-body-bytes=1048576",
        "--max-text-chars=2000000",
    )
    state, client = _fake_app(monkeypatch, *flags)
    with client:
        _wait_ready(client)
        big_chat = {"model": "m", "messages": [{"role": "user", "content": "x" * 250_000}]}
        r = client.post("/v1/chat/completions", json=big_chat)
        assert r.status_code == 413 and "--max-openai-body-bytes" in r.json()["error"]["message"]
        r = client.post("/v1/models/m:predict", json={"instances": ["x" * 250_000]})
        assert r.status_code == 200  # the same size is fine on V1 (its cap is --max-body-bytes)
        r = client.post("/v1/models/m:predict", json={"instances": ["x" * 1_100_000]})
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]
        assert state.body_budget.used == 0

        assert state.body_budget.take(1_000_000)  # other requests' bodies are being read
        r = client.post("/v1/models/m:predict", json={"instances": ["x" * 100_000]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "--max-inflight-body-bytes" in r.json()["error"]
        r = client.post("/v1/completions", json={"model": "m", "prompt": "y" * 100_000})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error"
        r = client.post("/v1/models/m:predict", json={"instances": ["small"]})
        assert r.status_code == 200  # a small body is never refused for the budget
        state.body_budget.give(1_000_000)
        for body in (b"{not json" + b" " * 100_000, json.dumps({"instances": ["z" * 100_000]}).encode()):
            client.post("/v1/models/m:predict", content=body)
        assert state.body_budget.used == 0  # given back after a 400 and a 200 alike

        r = client.post("/v1/completions", json={"model": "m", "prompt": list(range(65))})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/completions", json={"model": "m", "prompt": list(range(64))})
        assert r.status_code == 418  # fits the model length: the service gets it


def test_liveness_reports_the_predictors_health_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _, client = _fake_app(monkeypatch, health="the engine thread died: RuntimeError: boom")
    with client:
        _wait_ready(client)
        r = client.get("/v2/health/live")
        assert r.status_code == 503
        assert r.json() == {"live": False, "error": "the engine thread died: RuntimeError: boom"}
    _, client = _fake_app(monkeypatch)
    with client:
        _wait_ready(client)
        assert client.get("/v2/health/live").json() == {"live": True}


def test_an_unexpected_error_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    """A 500 leaves one traceback (uvicorn's), not a second one from the handler."""
    _, client = _fake_app(monkeypatch)
    with client:
        _wait_ready(client)
        with caplog.at_level("ERROR", logger="tauon.serve"):
            r = client.post("/v1/models/m:predict", json={"instances": ["boom"]})
    assert r.status_code == 500 and r.json() == {"error": "internal error: KeyError"}
    ours = [rec for rec in caplog.records if rec.name == "tauon.serve" and "unexpected error" in rec.message]
    assert len(ours) == 1 and ours[0].exc_info is None


def test_idle_connections_are_closed_and_never_block_the_health_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """N2, in-process: the real uvicorn server (header-timeout protocol, --health-port) in a thread. 20
    idle connections, one a slow loris, fill --limit-concurrency 8: the main port answers 503, the
    health port 200; the header timeout closes every idle connection, then the main port answers."""
    import socket

    import httpx
    import uvicorn

    from tauon_serve.serve import _make_server_class, create_app, header_timeout_protocol, health_server
    from tests.net import free_port

    port, health_port = free_port(), free_port()
    flags = (f"--port={port}", f"--health-port={health_port}", "--header-timeout-seconds=0.5")
    state = _fake_state(monkeypatch, *flags, "--limit-concurrency=8")
    protocol = header_timeout_protocol(0.5)
    config = uvicorn.Config(
        create_app(state),
        host="127.0.0.1",
        port=port,
        http=protocol,
        limit_concurrency=8,
        log_level="warning",
    )
    server = _make_server_class()(config)
    server.state = state
    server.health = health_server(state, protocol)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    main, health = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health_port}"
    try:
        for _ in range(200):
            if server.started and httpx.get(main + "/v2/health/ready", timeout=2).status_code == 200:
                break
            time.sleep(0.05)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        idle[0].sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        time.sleep(0.1)
        assert httpx.get(main + "/v2/health/live", timeout=2).status_code == 503  # the cap is full
        assert httpx.get(health + "/v2/health/live", timeout=2).json() == {"live": True}
        assert httpx.get(health + "/v2/health/ready", timeout=2).status_code == 200
        for s in idle:
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the server, unanswered
            s.close()
        assert httpx.get(main + "/v2/health/live", timeout=2).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
