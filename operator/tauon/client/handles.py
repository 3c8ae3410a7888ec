"""Handles on a created FineTuneJob, FineTuneSweep or InferenceService: wait, status, logs, best, predict,
chat, delete."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from tauon.api import FineTuneJobStatus, FineTuneSweepStatus, InferenceServiceStatus, find_condition, is_true
from tauon.api.finetunesweep import SweepBest, SweepTrial
from tauon.api.names import FAILED, FINETUNEJOB, FINETUNESWEEP, INFERENCESERVICE, READY, Manifest
from tauon.client.errors import (
    JobFailed,
    MissingDependency,
    NotFound,
    ServiceFailed,
    SweepFailed,
    TauonError,
)

if TYPE_CHECKING:
    import openai


class Backend(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def where(self) -> str: ...

    def create(self, obj: Manifest) -> Manifest: ...
    def get(self, kind: str, name: str) -> Manifest | None: ...
    def delete(self, kind: str, name: str) -> None: ...
    def logs(self, name: str, follow: bool) -> Iterator[str]: ...
    def endpoint(self, name: str) -> str: ...
    def close(self) -> None: ...


class FineTuneJobHandle:
    """A FineTuneJob: `wait()` for it (progress bar), read `status()`, stream `logs()`, `delete()` it."""

    kind = FINETUNEJOB

    def __init__(self, backend: Backend, name: str, poll: float = 1.0):
        self._backend = backend
        self.name = name
        self.poll = poll

    def __repr__(self) -> str:
        return f"FineTuneJobHandle({self.name!r})"

    def get(self) -> Manifest:
        obj = self._backend.get(self.kind, self.name)
        if obj is None:
            raise NotFound(self.kind, self.name, self._backend.where)
        return obj

    def status(self) -> FineTuneJobStatus:
        return FineTuneJobStatus.model_validate(self.get().get("status") or {})

    @property
    def phase(self) -> str:
        return self.status().phase

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.status().output.metrics)

    @property
    def model_uri(self) -> str | None:
        return self.status().output.model

    def raise_if_failed(self, status: FineTuneJobStatus | None = None) -> None:
        status = status or self.status()
        if status.phase == "Failed":
            c = find_condition(status.conditions, FAILED) if is_true(status.conditions, FAILED) else None
            reason = (
                c.reason if c else (status.last_failure.reason if status.last_failure else "") or "Failed"
            )
            message = c.message if c else (status.last_failure.message if status.last_failure else "") or ""
            raise JobFailed(self.name, reason, message)

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> FineTuneJobStatus:
        """Block until the job succeeds (returns its status) or fails (raises JobFailed).
        A progress bar shows step, loss and ETA from status.progress (default: when stderr is a terminal
        or in a notebook). TimeoutError after `timeout` seconds."""
        show = _interactive() if progress is None else progress
        deadline = None if timeout is None else time.monotonic() + timeout
        with _ProgressBar(self.name, show) as bar:
            while True:
                status = self.status()
                bar.update(status)
                if status.phase == "Succeeded":
                    return status
                self.raise_if_failed(status)
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"FineTuneJob {self.name!r} still {status.phase} after {timeout}s "
                        f"(step {status.progress.step}/{status.progress.total_steps})"
                    )
                time.sleep(self.poll)

    def logs(self, follow: bool = False) -> Iterator[str]:
        """Log lines of every rank, prefixed `[rank N]`; follow=True streams until the job ends."""
        return self._backend.logs(self.name, follow)

    def delete(self) -> None:
        self._backend.delete(self.kind, self.name)


class SweepHandle:
    """A FineTuneSweep: `wait()` for it, then `best()` (the best trial: its parameters, objective and
    model); `trials()`, `status()`, `delete()`. Its status is the cluster's (status.json locally)."""

    kind = FINETUNESWEEP

    def __init__(self, backend: Backend, name: str, poll: float = 1.0):
        self._backend = backend
        self.name = name
        self.poll = poll

    def __repr__(self) -> str:
        return f"SweepHandle({self.name!r})"

    def get(self) -> Manifest:
        obj = self._backend.get(self.kind, self.name)
        if obj is None:
            raise NotFound(self.kind, self.name, self._backend.where)
        return obj

    def status(self) -> FineTuneSweepStatus:
        return FineTuneSweepStatus.model_validate(self.get().get("status") or {})

    @property
    def phase(self) -> str:
        return self.status().phase

    def best(self) -> SweepBest | None:
        """The best succeeded trial so far (status.best): trial, parameters, objective, model; None before
        any trial succeeded."""
        return self.status().best

    def trials(self) -> list[SweepTrial]:
        """Every trial created, by index: name, parameters, phase, step, objective, message."""
        return list(self.status().trials)

    def raise_if_failed(self, status: FineTuneSweepStatus | None = None) -> None:
        status = status or self.status()
        if status.phase == "Failed":
            c = find_condition(status.conditions, FAILED) if is_true(status.conditions, FAILED) else None
            raise SweepFailed(self.name, c.reason if c else "Failed", c.message if c else "")

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> FineTuneSweepStatus:
        """Block until the sweep succeeds (returns its status; `.best` is set) or fails (raises
        SweepFailed). With progress (default: when stderr is a terminal or in a notebook) one line per
        change: phase, trials finished, the best so far. TimeoutError after `timeout` seconds."""
        show = _interactive() if progress is None else progress
        deadline = None if timeout is None else time.monotonic() + timeout
        last = ""
        while True:
            status = self.status()
            line = sweep_line(self.name, status)
            if show and line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            if status.phase == "Succeeded":
                return status
            self.raise_if_failed(status)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"FineTuneSweep {self.name!r} not finished after {timeout}s ({line})")
            time.sleep(self.poll)

    def delete(self) -> None:
        """Delete the sweep (on a cluster its trials go with it; locally its run directory is removed)."""
        self._backend.delete(self.kind, self.name)


def sweep_line(name: str, status: FineTuneSweepStatus) -> str:
    """One line on a sweep: phase, trials finished and running, the best so far."""
    running = sum(1 for t in status.trials if t.phase in ("Pending", "Running"))
    line = f"{name}: {status.phase}, {status.finished_trials} trials finished, {running} running"
    best = status.best
    if best is not None and best.trial:
        line += f"; best {best.trial} ({best.objective}, {json.dumps(best.parameters, sort_keys=True)})"
    return line


class InferenceServiceHandle:
    """An InferenceService: `wait_ready()`, `predict()` (V2), `chat()`/`complete()` (OpenAI API), `delete()`."""

    kind = INFERENCESERVICE

    def __init__(self, backend: Backend, name: str, poll: float = 1.0):
        self._backend = backend
        self.name = name
        self.poll = poll

    def __repr__(self) -> str:
        return f"InferenceServiceHandle({self.name!r})"

    def get(self) -> Manifest:
        obj = self._backend.get(self.kind, self.name)
        if obj is None:
            raise NotFound(self.kind, self.name, self._backend.where)
        return obj

    def status(self) -> InferenceServiceStatus:
        return InferenceServiceStatus.model_validate(self.get().get("status") or {})

    def wait_ready(self, timeout: float | None = 600) -> InferenceServiceStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if is_true(status.conditions, READY):
                return status
            if status.phase == "Failed":
                c = next((c for c in status.conditions if c.status == "False"), None)
                raise ServiceFailed(
                    f"InferenceService {self.name!r} failed" + (f": {c.reason}: {c.message}" if c else "")
                )
            if deadline is not None and time.monotonic() >= deadline:
                why = "; ".join(f"{c.type}={c.status} {c.reason}: {c.message}" for c in status.conditions)
                raise TimeoutError(
                    f"InferenceService {self.name!r} not Ready after {timeout}s ({why or status.phase})"
                )
            time.sleep(self.poll)

    @property
    def url(self) -> str:
        """A base URL reachable from this process (port-forward on a cluster, the local server locally)."""
        return self._backend.endpoint(self.name)

    def _post(self, path: str, body: Manifest, timeout: float = 120) -> Manifest:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data: Manifest = json.loads(r.read())
                return data
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise TauonError(f"InferenceService {self.name!r}: POST {path} -> {e.code}: {detail}") from None
        except OSError as e:
            raise TauonError(f"InferenceService {self.name!r} unreachable at {self.url}: {e}") from None

    def predict(self, texts: list[str], timeout: float = 120) -> list[dict[str, Any]]:
        """Open Inference Protocol V2: one dict per text, keyed by output name (e.g. label, probabilities)."""
        if isinstance(texts, str):
            texts = [texts]
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}]}
        out = self._post(f"/v2/models/{self.name}/infer", body, timeout)
        return split_outputs(out.get("outputs") or [], len(texts))

    @property
    def openai_base_url(self) -> str:
        """The OpenAI API's base URL, reachable from this process: the path of status.openai.baseURL (where
        the service's runtime serves it, /v1 on both) on `url` (its host is in-cluster); `url` + /v1
        when the status names none."""
        return openai_base(self.url, self.status().openai.base_url)

    def openai_client(self, **kwargs: Any) -> openai.OpenAI:
        """An `openai.OpenAI` client pointed at the service's OpenAI API (`openai_base_url`)."""
        try:
            import openai
        except ImportError:
            raise MissingDependency("openai", "chat()/complete()/openai_client()") from None
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.openai_base_url, **kwargs)

    def chat(
        self, messages: list[dict[str, str]] | str, stream: bool = False, **kwargs: Any
    ) -> str | Iterator[str]:
        """Chat completion; with stream=True an iterator of text pieces as they are generated."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        api = self.openai_client()
        msgs: Any = messages  # the openai client's TypedDicts; plain dicts are what it sends
        if not stream:
            r = api.chat.completions.create(model=self.name, messages=msgs, **kwargs)
            return r.choices[0].message.content or ""

        def pieces() -> Iterator[str]:
            for chunk in api.chat.completions.create(
                model=self.name,
                messages=msgs,
                stream=True,
                **kwargs,
            ):
                choices = getattr(chunk, "choices", None)
                if choices and choices[0].delta.content:
                    yield str(choices[0].delta.content)

        return pieces()

    def complete(self, prompt: str, **kwargs: Any) -> str:
        r = self.openai_client().completions.create(model=self.name, prompt=prompt, **kwargs)
        return str(r.choices[0].text)

    def delete(self) -> None:
        self._backend.delete(self.kind, self.name)


def openai_base(reachable: str, status_base_url: str | None) -> str:
    """`reachable` (a base URL of the service from here) with the path of `status_base_url` (the status'
    in-cluster OpenAI base URL, e.g. http://svc.ns.svc.cluster.local/v1), else with /v1."""
    path = urllib.parse.urlsplit(status_base_url).path.rstrip("/") if status_base_url else "/v1"
    return reachable.rstrip("/") + (path or "/v1")


def split_outputs(outputs: list[Manifest], n: int) -> list[dict[str, Any]]:
    """V2 outputs (flat data + shape) -> one dict per instance."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for o in outputs:
        data = list(o.get("data") or [])
        per = len(data) // n if n else 0
        for i in range(n):
            chunk = data[i * per : (i + 1) * per]
            rows[i][o["name"]] = chunk[0] if len(o.get("shape") or []) <= 1 and per == 1 else chunk
    return rows


def _duration(seconds: int) -> str:
    m, s = divmod(max(0, int(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    return sys.stderr.isatty()


class _ProgressBar:
    """rich progress bar when rich is installed, else one plain line per change."""

    def __init__(self, name: str, show: bool):
        self.name = name
        self.show = show
        self.rich: Any = None
        self.task: Any = None
        self.last = ""

    def __enter__(self) -> _ProgressBar:
        if not self.show:
            return self
        try:
            from rich.progress import BarColumn, Progress, TextColumn
        except ImportError:
            return self
        self.rich = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[phase]}"),
            transient=False,
        )
        self.rich.__enter__()
        self.task = self.rich.add_task(self.name, total=None, loss="-", eta="-", phase="Pending")
        return self

    def update(self, status: FineTuneJobStatus) -> None:
        if not self.show:
            return
        p = status.progress
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        eta = _duration(p.eta_seconds) if p.eta_seconds is not None and status.phase == "Running" else "-"
        if self.rich is not None:
            self.rich.update(
                self.task,
                completed=p.step,
                total=p.total_steps or None,
                loss=loss,
                eta=eta,
                phase=status.phase,
            )
            return
        eta = f", ETA {eta}" if eta != "-" else ""
        line = f"{self.name}: {status.phase} step {p.step}/{p.total_steps} loss {loss}{eta}"
        if line != self.last:
            print(line, file=sys.stderr, flush=True)
            self.last = line

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.__exit__(None, None, None)
