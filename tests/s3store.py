"""S3 stores for tests: a real SeaweedFS (`weed mini`, from hack/s3/store.py) and, for fault injection
only, moto's in-process server and an endpoint that throttles everything.

Every store listens on 127.0.0.1 only, on free ports, and is stopped when its context ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.net import free_port

REPO = Path(__file__).resolve().parent.parent


def _load_store_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("tauon_hack_s3_store", REPO / "hack" / "s3" / "store.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


_store = _load_store_module()
S3Store = _store.S3Store
seaweedfs = _store.seaweedfs


@contextlib.contextmanager
def moto_server() -> Iterator[S3Store]:
    """moto's S3 in a thread on loopback: for injecting faults a real store will not produce on demand."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Store(f"http://127.0.0.1:{port}", "testing", "testing")
    finally:
        server.stop()


class _Unavailable(BaseHTTPRequestHandler):
    """Answers every request 503 SlowDown, as a throttling or failing S3 does."""

    hits = 0
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def _answer(self) -> None:
        type(self).hits += 1
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def unavailable_store() -> Iterator[tuple[S3Store, type[_Unavailable]]]:
    """An endpoint that throttles everything (503 SlowDown); the handler class counts the hits."""
    handler = type("Unavailable", (_Unavailable,), {"hits": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield S3Store(f"http://127.0.0.1:{server.server_address[1]}", "testing", "testing"), handler
    finally:
        server.shutdown()
        server.server_close()
