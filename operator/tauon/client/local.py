"""Local backend: the objects run through `tauon run --local` (the operator's own rendered pods as local
processes), one `tauon run` process per object. No cluster, no kubelet.

Layout under the work directory (default ./runs, the same as `tauon run --local`):
  <workdir>/<job>/               the FineTuneJob's output: model/, checkpoints/, metrics.json, progress.json,
                                 logs/ and status.json
  <workdir>/<sweep>/              a FineTuneSweep's run directory: status.json, and each trial's output
                                 <sweep>-t<k>/ (see tauon.local.sweep)
  <workdir>/<name>-server.status.json  an InferenceService's status
  <workdir>/.sdk/<name>.yaml     the manifest handed to `tauon run`
  <workdir>/.sdk/<name>.stderr   what `tauon run` printed
Status is what `tauon run --local` writes to status.json (the object's status as the cluster would show it,
kept current, replaced atomically), parsed with the API's status models; the SDK adds nothing to it but a
Failed status when `tauon run` ended without a final one (it crashed or could not start).
A run left in the work directory with status Succeeded is found again by a later Client; an unfinished
one is resumed from its latest checkpoint by the next fine_tune of that name, as the operator resumes a
restarted gang; an unfinished (e.g. interrupted) sweep is resumed by the next sweep of that name: its
finished trials are read back, not run again. delete() removes a job's or a sweep's run directory.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tauon.api import FineTuneJobStatus, FineTuneSweepStatus, InferenceServiceStatus
from tauon.api.common import NAME_MAX, NAME_PATTERN
from tauon.api.names import (
    API_VERSION,
    FAILED,
    FINETUNEJOB,
    FINETUNESWEEP,
    INFERENCESERVICE,
    LOCAL_STATUS_FILE,
    LOCAL_SWEEP_STATE_DIR,
    READY,
    SUCCEEDED,
    Manifest,
    local_service_status_file,
)
from tauon.client.errors import AlreadyExists, NotFound, SpecError
from tauon.client.logs import merge_files

# where `tauon run --local` keeps an object's status (tauon.local.run, which this package may not import)
STATUS_FILE = LOCAL_STATUS_FILE
RUN_DIRS = (FINETUNEJOB, FINETUNESWEEP)  # kinds whose local run is a directory <workdir>/<name>


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


@dataclass
class LocalRun:
    kind: str
    manifest: Manifest
    proc: subprocess.Popen[bytes]
    stderr: Path
    port: int | None = None  # InferenceService: where the model server listens


def service_status_path(workdir: Path, name: str) -> Path:
    return workdir / local_service_status_file(name)


def ended(kind: str, code: int, stderr_text: str) -> Manifest:
    """The status of an object whose `tauon run` ended without writing a final one (it crashed, or failed
    before the object was planned): Failed, with the end of what it printed."""
    tail = " | ".join(stderr_text.strip().splitlines()[-3:])
    message = f"tauon run exited with code {code}" + (f": {tail}" if tail else "")
    ctype, status = (FAILED, "True") if kind in RUN_DIRS else (READY, "False")
    condition = {"type": ctype, "status": status, "reason": "LocalRunFailed", "message": message}
    return {"phase": "Failed", "conditions": [condition]}


def read_status(
    path: Path, kind: str
) -> FineTuneJobStatus | FineTuneSweepStatus | InferenceServiceStatus | None:
    """status.json parsed with the API's status model; None when absent or unreadable."""
    data = _read_json(path)
    if data is None:
        return None
    models: dict[str, type[FineTuneJobStatus | FineTuneSweepStatus | InferenceServiceStatus]] = {
        FINETUNEJOB: FineTuneJobStatus,
        FINETUNESWEEP: FineTuneSweepStatus,
    }
    model = models.get(kind, InferenceServiceStatus)
    try:
        return model.model_validate(data)
    except ValueError:
        return None


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

    def _checked_dir(self, kind: str, name: str) -> Path:
        """``output_dir(name)`` for a name that may be removed: a DNS label (as the API requires) whose
        resolved directory is directly inside the run directory (no ``..``, no absolute path, no symlink
        out of it); anything else is refused before any file is touched."""
        if not (re.fullmatch(NAME_PATTERN, name) and len(name) <= NAME_MAX):
            raise SpecError(kind, name, {"metadata.name": f"must match {NAME_PATTERN} (at most {NAME_MAX})"})
        path = self.output_dir(name)
        if path.resolve().parent != self.workdir:
            raise SpecError(kind, name, {"metadata.name": f"{path} resolves outside {self.workdir}"})
        return path

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
        if kind in RUN_DIRS:
            argv += ["--quiet", "--output", str(self.output_dir(name))]
        else:
            port = free_port()
            argv += ["--output", str(self.workdir), "--port", str(port)]
        self._status_path(kind, name).unlink(missing_ok=True)  # an earlier run's is not this one's
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

    def _status_path(self, kind: str, name: str) -> Path:
        if kind in RUN_DIRS:
            return self.output_dir(name) / STATUS_FILE
        return service_status_path(self.workdir, name)

    def get(self, kind: str, name: str) -> Manifest | None:
        run = self.runs.get((kind, name))
        code = run.proc.poll() if run is not None else None  # first: an ended run wrote its last status
        status = read_status(self._status_path(kind, name), kind)
        if run is None:
            if kind not in RUN_DIRS or status is None or status.phase != SUCCEEDED:
                return None
            if self._dir_kind(name) != kind:  # a sweep's run directory is not a job's, nor the reverse
                return None
            return {**self._finished_manifest(kind, name), "status": status.dump()}
        terminal = status is not None and status.phase in (SUCCEEDED, FAILED)
        if code is not None and not terminal:  # `tauon run` ended without a final status
            return {**run.manifest, "status": ended(kind, code, run.stderr.read_text(errors="replace"))}
        return {**run.manifest, "status": status.dump() if status is not None else {}}

    def _dir_kind(self, name: str) -> str:
        """The kind a run directory holds: a sweep's keeps its state in LOCAL_SWEEP_STATE_DIR."""
        return FINETUNESWEEP if (self.output_dir(name) / LOCAL_SWEEP_STATE_DIR).is_dir() else FINETUNEJOB

    def _finished_manifest(self, kind: str, name: str) -> Manifest:
        """A job or sweep finished by an earlier process: what it ran is in the manifest it handed to
        `tauon run`."""
        saved = _read_json(self.workdir / ".sdk" / f"{name}.{kind.lower()}.yaml") or {}
        return {
            "apiVersion": API_VERSION,
            "kind": kind,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": saved.get("spec", {}),
        }

    def delete(self, kind: str, name: str) -> None:
        target = self._checked_dir(kind, name)
        run = self.runs.pop((kind, name), None)
        if run is None and self.get(kind, name) is None:
            raise NotFound(kind, name, self.where)
        if run is not None:
            _stop(run.proc)
        if kind in RUN_DIRS:  # a local job's or sweep's only state is its run directory
            shutil.rmtree(target, ignore_errors=True)

    # -- logs and endpoints ------------------------------------------------------------------------------
    def logs(self, name: str, follow: bool) -> Iterator[str]:
        """Every rank's log file under <workdir>/<job>/logs. A run of another process (`tauon run --local`)
        is followed while its logs keep growing and its status.json is not Succeeded or Failed."""
        run = self.runs.get((FINETUNEJOB, name))
        logs = self.output_dir(name) / "logs"
        found = sorted(logs.glob("node-*.log"))
        if run is None and not found:
            raise NotFound(FINETUNEJOB, name, self.where)
        ranks = int((run.manifest["spec"].get("numNodes") if run else None) or len(found) or 1)
        files = {r: logs / f"node-{r}.log" for r in range(ranks)}
        status_path = self.output_dir(name) / STATUS_FILE

        def running() -> bool:
            if run is not None:
                return run.proc.poll() is None
            status = read_status(status_path, FINETUNEJOB)
            if status is not None and status.phase in (SUCCEEDED, FAILED):
                return False
            newest = max((f.stat().st_mtime for f in files.values() if f.exists()), default=0.0)
            return time.time() - newest < 30

        return merge_files(files, follow=follow, running=running)

    def endpoint(self, name: str) -> str:
        run = self.runs.get((INFERENCESERVICE, name))
        if run is None:
            raise NotFound(INFERENCESERVICE, name, self.where)
        return f"http://127.0.0.1:{run.port}"

    def close(self) -> None:
        for key in list(self.runs):
            _stop(self.runs.pop(key).proc)


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
