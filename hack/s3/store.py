"""SeaweedFS on loopback for the S3 demo and the tests: `weed mini` (master, volume, filer and the S3
gateway in one process), built from the Go module proxy by build.sh beside this file (cached outside
git), on free 127.0.0.1 ports, with the credentials it takes from AWS_* env, stopped by its PID.

Standard library only (boto3 only when `client()` is called), so `make demo-s3` and the tests share it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ACCESS_KEY = "tauontestaccess"
SECRET_KEY = "tauontestsecret0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    out = subprocess.run(["bash", str(HERE / "build.sh")], check=True, stdout=subprocess.PIPE, text=True)
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
