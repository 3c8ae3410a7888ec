"""Local backend: the objects run through `tauon run --local` (the operator's own rendered pods as local
processes), one `tauon run` process per object. No cluster, no kubelet.

Layout under the work directory (default ./runs, the same as `tauon run --local`):
  <workdir>/<job>/               the FineTuneJob's output: model/, checkpoints/, metrics.json, progress.json, logs/
  <workdir>/.sdk/<name>.yaml     the manifest handed to `tauon run`
  <workdir>/.sdk/<name>.stderr   what `tauon run` printed (the failure summary of a failed gang)
A finished run left in the work directory is found again by a later Client (status Succeeded); an
unfinished one is resumed from its latest checkpoint by the next fine_tune of that name, as the operator
resumes a restarted gang. delete() removes a job's run directory.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tauon.client.errors import AlreadyExists, NotFound
from tauon.client.logs import merge_files

Manifest = dict[str, Any]
_FAILED = re.compile(r"rank (\d+) failed with exit code (\d+)(?::\s*(.*))?")
_SPEC = re.compile(r"^tauon: [^:]+: (.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


PROGRESS_KEYS = ("step", "totalSteps", "epoch", "loss", "samplesPerSecond", "etaSeconds", "updatedAt")


def progress(record: dict[str, Any]) -> dict[str, Any]:
    """The trainer's progress.json as status.progress (what the operator publishes from it)."""
    out = {k: record[k] for k in PROGRESS_KEYS if record.get(k) is not None}
    step, total = out.get("step"), out.get("totalSteps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        out["percent"] = max(0, min(100, int(100 * step / total)))  # as the operator computes it
    return out


@dataclass
class LocalRun:
    kind: str
    manifest: Manifest
    proc: subprocess.Popen[bytes]
    stderr: Path
    port: int | None = None  # InferenceService: where the model server listens


def failure(stderr_text: str, code: int) -> tuple[str, str]:
    """(reason, message) of a failed `tauon run`: the failed rank's termination message when there is one."""
    for line in stderr_text.splitlines():
        m = _FAILED.search(line)
        if not m:
            continue
        rank, exit_code, rest = m.group(1), m.group(2), (m.group(3) or "").strip()
        try:
            term = json.loads(rest) if rest.startswith("{") else None
        except ValueError:
            term = None
        if isinstance(term, dict) and term.get("reason"):
            return str(term["reason"]), f"rank {rank}: {term.get('message', '')}".strip()
        return "RankFailed", f"rank {rank} exited with code {exit_code}" + (f": {rest}" if rest else "")
    if code == 130:
        return "Interrupted", "the local run was interrupted"
    for line in stderr_text.splitlines():
        m = _SPEC.match(line.strip())
        if m:
            return "InvalidSpec", m.group(1)
    tail = " | ".join(stderr_text.strip().splitlines()[-3:])
    return "LocalRunFailed", f"tauon run exited with code {code}" + (f": {tail}" if tail else "")


class LocalBackend:
    """Runs FineTuneJobs and InferenceServices as local processes. Objects live as long as this process
    (a finished training run stays on disk and is found again)."""

    def __init__(self, workdir: str | Path = "runs", namespace: str = "default"):
        self.workdir = Path(workdir).resolve()
        self.namespace = namespace
        self.runs: dict[tuple[str, str], LocalRun] = {}
        atexit.register(self.close)

    @property
    def where(self) -> str:
        return f"local run directory {self.workdir}"

    def output_dir(self, name: str) -> Path:
        return self.workdir / name

    def default_output(self, name: str) -> str:
        return f"file://{self.output_dir(name)}"

    # -- objects ---------------------------------------------------------------------------------------
    def create(self, obj: Manifest) -> Manifest:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if self.get(kind, name) is not None:
            raise AlreadyExists(kind, name, self.where)
        sdk = self.workdir / ".sdk"
        sdk.mkdir(parents=True, exist_ok=True)
        path = sdk / f"{name}.{kind.lower()}.yaml"
        path.write_text(json.dumps(obj, indent=2))  # JSON is YAML
        stderr = sdk / f"{name}.{kind.lower()}.stderr"
        argv = [sys.executable, "-m", "tauon.cli", "run", str(path), "--local"]
        port = None
        if kind == "FineTuneJob":
            argv += ["--quiet", "--output", str(self.output_dir(name))]
        else:
            port = free_port()
            argv += ["--output", str(self.workdir), "--port", str(port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C in a notebook does not reach it; delete()/exit stops it
            )
        self.runs[(kind, name)] = LocalRun(kind, obj, proc, stderr, port)
        return obj

    def get(self, kind: str, name: str) -> Manifest | None:
        run = self.runs.get((kind, name))
        if kind == "FineTuneJob":
            return self._job(name, run)
        if run is None:
            return None
        return {**run.manifest, "status": self._service_status(run)}

    def _job(self, name: str, run: LocalRun | None) -> Manifest | None:
        out = self.output_dir(name)
        status: Manifest = {"progress": progress(_read_json(out / "progress.json") or {})}
        if run is None:
            if not (out / "metrics.json").exists() or not (out / "model").is_dir():
                return None
            # finished by an earlier process: what it ran is in the manifest it handed to `tauon run`
            saved = _read_json(self.workdir / ".sdk" / f"{name}.finetunejob.yaml") or {}
            manifest: Manifest = {
                "apiVersion": "tauon.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": saved.get("spec", {}),
            }
            code: int | None = 0
        else:
            manifest = dict(run.manifest)
            code = run.proc.poll()
        if code is None:
            status["phase"] = "Running"
            status["conditions"] = [{"type": "Running", "status": "True", "reason": "RanksRunning"}]
        elif code == 0:
            status["phase"] = "Succeeded"
            status["conditions"] = [{"type": "Succeeded", "status": "True", "reason": "Completed"}]
            status["output"] = {
                "model": f"file://{out / 'model'}",
                "metrics": _read_json(out / "metrics.json") or {},
            }
        else:
            assert run is not None
            reason, message = failure(run.stderr.read_text(errors="replace"), code)
            status["phase"] = "Failed"
            status["conditions"] = [
                {"type": "Failed", "status": "True", "reason": reason, "message": message}
            ]
        manifest["status"] = status
        return manifest

    def _service_status(self, run: LocalRun) -> Manifest:
        url = f"http://127.0.0.1:{run.port}"
        code = run.proc.poll()
        if code is not None:
            tail = " | ".join(run.stderr.read_text(errors="replace").strip().splitlines()[-3:])
            return {
                "phase": "Failed",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": "ServerExited",
                        "message": f"the model server exited with code {code}: {tail}",
                    }
                ],
            }
        ready = _ready(url)
        return {
            "phase": "Ready" if ready else "Pending",
            "url": url,
            "replicas": 1,
            "readyReplicas": int(ready),
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "Local"}],
        }

    def delete(self, kind: str, name: str) -> None:
        run = self.runs.pop((kind, name), None)
        if run is None and self.get(kind, name) is None:
            raise NotFound(kind, name, self.where)
        if run is not None:
            _stop(run.proc)
        if kind == "FineTuneJob":  # a local job's only state is its run directory
            shutil.rmtree(self.output_dir(name), ignore_errors=True)

    # -- logs and endpoints ------------------------------------------------------------------------------
    def logs(self, name: str, follow: bool) -> Iterator[str]:
        """Every rank's log file under <workdir>/<job>/logs. A run of another process (`tauon run --local`)
        is followed while its logs keep growing and it has not written metrics.json."""
        run = self.runs.get(("FineTuneJob", name))
        logs = self.output_dir(name) / "logs"
        found = sorted(logs.glob("node-*.log"))
        if run is None and not found:
            raise NotFound("FineTuneJob", name, self.where)
        ranks = int((run.manifest["spec"].get("numNodes") if run else None) or len(found) or 1)
        files = {r: logs / f"node-{r}.log" for r in range(ranks)}
        metrics = self.output_dir(name) / "metrics.json"

        def running() -> bool:
            if run is not None:
                return run.proc.poll() is None
            newest = max((f.stat().st_mtime for f in files.values() if f.exists()), default=0.0)
            return not metrics.exists() and time.time() - newest < 30

        return merge_files(files, follow=follow, running=running)

    def endpoint(self, name: str) -> str:
        run = self.runs.get(("InferenceService", name))
        if run is None:
            raise NotFound("InferenceService", name, self.where)
        return f"http://127.0.0.1:{run.port}"

    def close(self) -> None:
        for key in list(self.runs):
            _stop(self.runs.pop(key).proc)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM `tauon run` (it stops its ranks or server), then the whole group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    time.sleep(0)
