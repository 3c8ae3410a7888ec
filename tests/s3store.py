"""S3 stores for tests: a real SeaweedFS (`weed mini`) and moto's in-process server (fault injection only).

SeaweedFS is built from the Go module proxy by hack/s3/build.sh (cached outside git). Every store listens
on 127.0.0.1 only, on free ports, and is stopped by the PID it was started with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.net import free_port

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "tauontestaccess"
SECRET_KEY = "tauontestsecret0123456789"


@dataclass
class S3Store:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a workload needs to reach this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "TAUON_S3_MAX_ATTEMPTS": "2",
            **extra,
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def weed_binary() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "s3" / "build.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1]) / "weed"


def _wait_s3(endpoint: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint + "/healthz", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # the S3 gateway answers (an error status is fine: it is up)
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"weed mini not ready in {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def seaweedfs() -> Iterator[S3Store]:
    """A real SeaweedFS (master, volume, filer and S3 gateway in one `weed mini`) on loopback."""
    weed = weed_binary()
    d = Path(tempfile.mkdtemp(prefix="tauon-weed-"))
    names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
    ports = {k: free_port() for k in names}
    log = d / "weed.log"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    cmd = [
        str(weed),
        "mini",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={d / 'data'}",
        *(
            f"-{k.replace('.grpc', '.port.grpc') if '.grpc' in k else k + '.port'}={p}"
            for k, p in ports.items()
        ),
        # only S3: no admin UI, WebDAV, Iceberg or Lance endpoints (each would take a fixed port)
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    (d / "data").mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_s3(endpoint, proc, log)
        yield S3Store(endpoint, ACCESS_KEY, SECRET_KEY)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


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
