"""Training progress: Prometheus metrics, ``/progress`` over HTTP, ``progress.json`` and log lines.

Local rank 0 of every node serves ``GET /metrics`` (Prometheus text format) and ``GET /progress``
(the progress JSON) on ``$TAUON_METRICS_PORT`` (default 9090; 0 disables; a busy port logs a warning
and training goes on). All values are job-global (the step loss and throughput are all-reduced across
ranks every optimizer step), so any node answers the same; the only label is ``node_rank``.

Global rank 0 also writes ``<output>/progress.json`` atomically and prints one log line per interval:

    tauon-progress {"step": 3, "totalSteps": 39, "percent": 7.69, ...}

i.e. the literal prefix ``tauon-progress`` and a space, then the same JSON object as progress.json, except
that the periodic evaluations' history (``evaluations``) is reduced to its newest point
(``lastEvaluation``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from tauon_core import storage
from tauon_core.errors import PermanentError, RetryableError

LOG_PREFIX = "tauon-progress "
DEFAULT_PORT = 9090


def rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def atomic_write_json(path: str, obj: object) -> None:
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _round(x: float | None, nd: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, nd)


def progress_record(
    step: int,
    total: int,
    epoch: int,
    loss: float | None,
    samples_per_second: float | None,
    tokens_per_second: float | None,
    eta_seconds: float | None,
    evaluations: list[dict[str, float | int | None]] | None = None,
) -> dict[str, Any]:
    """The progress JSON (``/progress``, progress.json, the log line). ``evaluations``: the periodic
    evaluations (evaluate.PeriodicEvaluations.records()), included when given."""
    rec: dict[str, Any] = {
        "step": step,
        "totalSteps": total,
        "percent": round(100.0 * step / total, 2) if total > 0 else 0.0,
        "epoch": epoch,
        "loss": _round(loss, 6),
        "samplesPerSecond": _round(samples_per_second, 3),
        "tokensPerSecond": _round(tokens_per_second, 1),
        "etaSeconds": None if eta_seconds is None else max(0, int(round(eta_seconds))),
        "updatedAt": rfc3339_now(),
    }
    if evaluations is not None:
        rec["evaluations"] = [dict(e) for e in evaluations]
    return rec


def compile_extra_seconds(step_seconds: list[float], compiled: list[int]) -> float:
    """The time torch.compile added to a run: for each step in ``compiled`` (indices into
    ``step_seconds``: the steps during which new graphs were built) its time beyond the median of the
    other steps (0 when every step compiled, so the whole of those steps counts)."""
    marked = set(compiled)
    rest = sorted(t for i, t in enumerate(step_seconds) if i not in marked)
    base = rest[len(rest) // 2] if rest else 0.0
    return sum(max(0.0, step_seconds[i] - base) for i in marked if 0 <= i < len(step_seconds))


class TrainerMetrics:
    """Prometheus collectors in a private registry (no global state; tests can create many)."""

    def __init__(self, node_rank: int, with_gpu: bool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        lbl = ["node_rank"]
        self.node = str(node_rank)
        r = self.registry
        self.step = Gauge("tauon_trainer_step", "Optimizer steps completed.", lbl, registry=r).labels(
            self.node
        )
        self.total_steps = Gauge(
            "tauon_trainer_total_steps", "Optimizer steps planned.", lbl, registry=r
        ).labels(self.node)
        self.loss = Gauge(
            "tauon_trainer_loss",
            "Training loss of the latest optimizer step (mean over ranks).",
            lbl,
            registry=r,
        ).labels(self.node)
        self.sps = Gauge(
            "tauon_trainer_samples_per_second", "Training samples per second, all ranks.", lbl, registry=r
        ).labels(self.node)
        self.tps = Gauge(
            "tauon_trainer_tokens_per_second",
            "Training tokens (non-padding) per second, all ranks.",
            lbl,
            registry=r,
        ).labels(self.node)
        self.samples = Counter(
            "tauon_trainer_samples",
            "Training samples processed by all ranks since this process started.",
            lbl,
            registry=r,
        ).labels(self.node)
        self.checkpoints = Counter(
            "tauon_trainer_checkpoints", "Checkpoints written since this process started.", lbl, registry=r
        ).labels(self.node)
        self.gpu_mem = None
        if with_gpu:
            self.gpu_mem = Gauge(
                "tauon_trainer_gpu_memory_allocated_bytes",
                "torch.cuda.memory_allocated() of local rank 0.",
                lbl,
                registry=r,
            ).labels(self.node)
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = progress_record(0, 0, 0, None, None, None, None)

    def set_progress(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self._progress = dict(rec)
        self.step.set(rec["step"])
        self.total_steps.set(rec["totalSteps"])
        if rec.get("loss") is not None:
            self.loss.set(rec["loss"])
        if rec.get("samplesPerSecond") is not None:
            self.sps.set(rec["samplesPerSecond"])
        if rec.get("tokensPerSecond") is not None:
            self.tps.set(rec["tokensPerSecond"])

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` and ``GET /progress`` on a daemon thread."""

    def __init__(self, metrics: TrainerMetrics, port: int, host: str = "") -> None:
        self.metrics = metrics
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = m.exposition(), CONTENT_TYPE_LATEST, 200
                elif path == "/progress":
                    body, ctype, code = json.dumps(m.progress()).encode(), "application/json", 200
                elif path in ("/", "/healthz"):
                    body, ctype, code = b"ok\n", "text/plain", 200
                else:
                    body, ctype, code = b'{"error": "not found"}', "application/json", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tauon-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics_server(metrics: TrainerMetrics, port: int) -> MetricsServer | None:
    if port <= 0:
        return None
    try:
        return MetricsServer(metrics, port)
    except OSError as e:
        print(
            f"tauon-trainer: warning: metrics port {port} unavailable ({e.strerror}); metrics disabled",
            file=sys.stderr,
            flush=True,
        )
        return None


def metrics_port_from_env() -> int:
    raw = os.environ.get("TAUON_METRICS_PORT", "")
    if not raw.strip():
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        print(
            f"tauon-trainer: warning: TAUON_METRICS_PORT={raw!r} is not an integer; metrics disabled",
            file=sys.stderr,
            flush=True,
        )
        return 0


class ProgressReporter:
    """Throttled progress output on global rank 0 (file + log line) and metrics on local rank 0."""

    def __init__(self, output: str | None, metrics: TrainerMetrics | None, interval_s: float = 2.0) -> None:
        self.path = storage.join(output, "progress.json") if output else None
        self.metrics = metrics
        self.interval = interval_s
        self._last = 0.0

    def update(self, rec: dict[str, Any], force: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.set_progress(rec)
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        try:
            if storage.is_remote(self.path):
                storage.write_bytes(self.path, json.dumps(rec).encode())  # one PUT: atomic
            else:
                atomic_write_json(self.path, rec)
        except (OSError, PermanentError, RetryableError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            print(f"tauon-trainer: warning: cannot write {self.path}: {why}", file=sys.stderr, flush=True)
        print(LOG_PREFIX + json.dumps(log_record(rec), sort_keys=True), flush=True)


def log_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The log line's object: the progress record, with the evaluation history (up to 100 points, in every
    line) reduced to its newest point, ``lastEvaluation``."""
    if "evaluations" not in rec:
        return rec
    out = {k: v for k, v in rec.items() if k != "evaluations"}
    if rec["evaluations"]:
        out["lastEvaluation"] = rec["evaluations"][-1]
    return out
