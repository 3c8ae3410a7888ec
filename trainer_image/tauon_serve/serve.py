"""tauon model server: KServe V1 + Open Inference Protocol (V2) REST over a Hugging Face model directory,
plus the OpenAI completions/chat API (with continuous batching) for causal LMs.

    python -m tauon_serve.serve --model DIR --name NAME [--port 8080] [--max-batch-size 32]
                                  [--max-latency-ms 10] ...

Every flag can also be set through the environment (see ``--help`` and trainer_image/SERVING.md); a flag
on the command line wins over the environment. The socket listens at once; the model loads in the
background and ``/v2/health/ready`` answers 503 until it has loaded (and again once shutdown begins).
On SIGTERM/SIGINT the server stops accepting connections, reports not-ready, finishes queued and
in-flight requests, then exits 0. A model that fails to load makes the process exit 1.

This module never imports the operator package (``tauon``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tauon_core.sources import ModelSourceError

from .batching import BatcherClosed, DynamicBatcher, QueueFull, QueueTimeout
from .generation import GenerationEngine
from .llm import ClientGone, LLMService, until_disconnect
from .openai_api import OpenAIError, models_list
from .predictor import (
    CAUSAL_LM,
    SEQUENCE_CLASSIFICATION,
    TASKS,
    Classification,
    Predictor,
    load_predictor,
    resolve_model_source,
)
from .protocol import (
    CLASSIFICATION_OUTPUTS,
    GENERATION_OUTPUTS,
    TEXT_INPUT,
    Limits,
    RequestError,
    check_content_type,
    parse_json_body,
    parse_v1_predict,
    parse_v2_infer,
)
from .scheduler import EngineClosed, EngineMetrics, SamplingParams
from .scheduler import QueueFull as SequenceQueueFull

log = logging.getLogger("tauon.serve")

SERVER_NAME = "tauon-model-server"
MODEL_VERSION = "1"
LOAD_DELAY_ENV = "TAUON_LOAD_DELAY_SECONDS"  # test-only: sleep this long before loading the model


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version("tauon")
    except Exception:
        return "0.1.0"


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    model: str
    name: str
    host: str = "0.0.0.0"
    port: int = 8080
    max_batch_size: int = 32
    max_latency_ms: float = 10.0
    max_instances: int = 256
    max_text_chars: int = 20000
    max_body_bytes: int = 16 * 1024 * 1024
    max_queued_instances: int = 4096
    task: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_seq_length: int = 0
    max_new_tokens: int = 32
    max_model_length: int = 0
    max_concurrent_sequences: int = 64
    max_queued_sequences: int = 256
    max_queue_wait_seconds: float = 60.0
    limit_concurrency: int = 1024
    threads: int = 0
    gil_switch_interval_ms: float = 0.5
    graceful_timeout_seconds: float = 25.0
    log_level: str = "info"
    access_log: bool = False
    load_delay_seconds: float = 0.0


# (flag, env var, type, default, help)
_OPTIONS: list[tuple[str, str, Any, Any, str]] = [
    (
        "--model",
        "TAUON_MODEL_DIR",
        str,
        None,
        "model directory (Hugging Face format), file://PATH or hf://ORG/NAME",
    ),
    ("--name", "TAUON_MODEL_NAME", str, None, "model name in the URLs (/v2/models/NAME/...)"),
    ("--host", "TAUON_HOST", str, "0.0.0.0", "listen address"),
    ("--port", "TAUON_PORT", int, 8080, "listen port"),
    (
        "--max-batch-size",
        "TAUON_MAX_BATCH_SIZE",
        int,
        32,
        "most instances in one forward pass (1 = no batching)",
    ),
    (
        "--max-latency-ms",
        "TAUON_MAX_LATENCY_MS",
        float,
        10.0,
        "longest wait for a batch to fill, from the oldest queued instance (0 = no cross-request batching)",
    ),
    ("--max-instances", "TAUON_MAX_INSTANCES", int, 256, "most instances in one request (413 beyond)"),
    (
        "--max-text-chars",
        "TAUON_MAX_TEXT_CHARS",
        int,
        20000,
        "longest single text in characters (413 beyond)",
    ),
    ("--max-body-bytes", "TAUON_MAX_BODY_BYTES", int, 16 * 1024 * 1024, "largest request body (413 beyond)"),
    (
        "--max-queued-instances",
        "TAUON_MAX_QUEUED_INSTANCES",
        int,
        4096,
        "most instances waiting for a forward pass (503 beyond; raised to --max-instances if smaller)",
    ),
    ("--task", "TAUON_TASK", str, "auto", "auto (from config.json architectures) | " + " | ".join(TASKS)),
    ("--device", "TAUON_DEVICE", str, "auto", "auto (cuda when available) | cpu | cuda | cuda:N"),
    ("--dtype", "TAUON_DTYPE", str, "auto", "auto (bf16/fp16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16"),
    (
        "--max-seq-length",
        "TAUON_MAX_SEQ_LENGTH",
        int,
        0,
        "truncate inputs to this many tokens (0 = the model's)",
    ),
    (
        "--max-new-tokens",
        "TAUON_MAX_NEW_TOKENS",
        int,
        32,
        "causal-lm: tokens generated per prompt by V1/V2 (greedy), and the OpenAI max_tokens default",
    ),
    (
        "--max-model-length",
        "TAUON_MAX_MODEL_LENGTH",
        int,
        0,
        "causal-lm: most prompt + generated tokens per sequence (0 = the model's max_position_embeddings)",
    ),
    (
        "--max-concurrent-sequences",
        "TAUON_MAX_CONCURRENT_SEQUENCES",
        int,
        64,
        "causal-lm: sequences decoded together (continuous batching)",
    ),
    (
        "--max-queued-sequences",
        "TAUON_MAX_QUEUED_SEQUENCES",
        int,
        256,
        "causal-lm: sequences waiting for a slot; beyond it OpenAI requests get 429 + Retry-After",
    ),
    (
        "--max-queue-wait-seconds",
        "TAUON_MAX_QUEUE_WAIT_SECONDS",
        float,
        60.0,
        "longest wait in the queue before the request is answered 503 (0 = no limit)",
    ),
    (
        "--limit-concurrency",
        "TAUON_LIMIT_CONCURRENCY",
        int,
        1024,
        "most connections and tasks at once; uvicorn answers 503 beyond (0 = no limit)",
    ),
    ("--threads", "TAUON_TORCH_THREADS", int, 0, "torch intra-op threads (0 = torch's default)"),
    (
        "--gil-switch-interval-ms",
        "TAUON_GIL_SWITCH_INTERVAL_MS",
        float,
        0.5,
        "Python thread switch interval (0 = Python's default, 5 ms)",
    ),
    (
        "--graceful-timeout-seconds",
        "TAUON_GRACEFUL_TIMEOUT_SECONDS",
        float,
        25.0,
        "on SIGTERM, how long to wait for in-flight requests",
    ),
    ("--log-level", "TAUON_LOG_LEVEL", str, "info", "debug | info | warning | error"),
]


def _env_value(env: MutableMapping[str, str], var: str, typ: Any, flag: str) -> Any:
    raw = env.get(var)
    if raw is None or raw == "":
        return None
    try:
        return typ(raw)
    except ValueError:
        raise SystemExit(f"serve: error: ${var} ({flag}) must be {typ.__name__}, got {raw!r}") from None


def parse_args(argv: list[str] | None = None, env: MutableMapping[str, str] | None = None) -> ServerConfig:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m tauon_serve.serve",
        description="tauon model server (KServe V1 + Open Inference Protocol V2). "
        "Every option can also be set by the environment variable shown; the flag wins.",
    )
    for flag, var, typ, default, help_text in _OPTIONS:
        value = _env_value(env, var, typ, flag)
        parser.add_argument(
            flag,
            type=typ,
            default=value if value is not None else default,
            help=f"{help_text} [env {var}; default {default}]",
        )
    parser.add_argument(
        "--access-log",
        action="store_true",
        default=env.get("TAUON_ACCESS_LOG", "") in ("1", "true"),
        help="log every request (uvicorn's access log) [env TAUON_ACCESS_LOG=1]",
    )
    ns = parser.parse_args(argv)
    if not ns.model:
        parser.error("--model (or $TAUON_MODEL_DIR) is required")
    if not ns.name:
        parser.error("--name (or $TAUON_MODEL_NAME) is required")
    checks = [
        (ns.max_batch_size >= 1, "--max-batch-size must be >= 1"),
        (ns.max_latency_ms >= 0, "--max-latency-ms must be >= 0"),
        (ns.max_instances >= 1, "--max-instances must be >= 1"),
        (ns.max_text_chars >= 1, "--max-text-chars must be >= 1"),
        (ns.max_body_bytes >= 1024, "--max-body-bytes must be >= 1024"),
        (ns.task in ("auto", *TASKS), f"--task must be auto or one of {', '.join(TASKS)}"),
        (ns.dtype in ("auto", "fp32", "bf16", "fp16"), "--dtype must be auto, fp32, bf16 or fp16"),
        (ns.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (ns.max_model_length >= 0, "--max-model-length must be >= 0"),
        (ns.max_concurrent_sequences >= 1, "--max-concurrent-sequences must be >= 1"),
        (ns.max_queued_sequences >= 1, "--max-queued-sequences must be >= 1"),
        (ns.max_queue_wait_seconds >= 0, "--max-queue-wait-seconds must be >= 0"),
        (ns.limit_concurrency >= 0, "--limit-concurrency must be >= 0"),
        (ns.threads >= 0, "--threads must be >= 0"),
        (ns.gil_switch_interval_ms >= 0, "--gil-switch-interval-ms must be >= 0"),
        (0 <= ns.port <= 65535, "--port must be 0..65535"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    delay = _env_value(env, LOAD_DELAY_ENV, float, LOAD_DELAY_ENV) or 0.0
    return ServerConfig(
        model=ns.model,
        name=ns.name,
        host=ns.host,
        port=ns.port,
        max_batch_size=ns.max_batch_size,
        max_latency_ms=ns.max_latency_ms,
        max_instances=ns.max_instances,
        max_text_chars=ns.max_text_chars,
        max_body_bytes=ns.max_body_bytes,
        max_queued_instances=max(ns.max_queued_instances, ns.max_instances),
        task=ns.task,
        device=ns.device,
        dtype=ns.dtype,
        max_seq_length=ns.max_seq_length,
        max_new_tokens=ns.max_new_tokens,
        max_model_length=ns.max_model_length,
        max_concurrent_sequences=ns.max_concurrent_sequences,
        max_queued_sequences=ns.max_queued_sequences,
        max_queue_wait_seconds=ns.max_queue_wait_seconds,
        limit_concurrency=ns.limit_concurrency,
        threads=ns.threads,
        gil_switch_interval_ms=ns.gil_switch_interval_ms,
        graceful_timeout_seconds=ns.graceful_timeout_seconds,
        log_level=ns.log_level.lower(),
        access_log=ns.access_log,
        load_delay_seconds=delay,
    )


# -- metrics -------------------------------------------------------------------------------------


class ServerMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: less noise, same information
        self.registry = CollectorRegistry()
        r = self.registry
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        self.requests = Counter(
            "tauon_server_requests",
            "HTTP requests by endpoint (route template) and status code.",
            ["endpoint", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tauon_server_request_duration_seconds",
            "HTTP request duration by endpoint (route template).",
            ["endpoint"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_size = Histogram(
            "tauon_server_batch_size",
            "Instances per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.queue_depth = Gauge(
            "tauon_server_queue_depth", "Instances queued and waiting for a forward pass.", registry=r
        )
        self.inference_duration = Histogram(
            "tauon_server_inference_duration_seconds",
            "Duration of one forward pass (tokenization included).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.model_ready = Gauge(
            "tauon_server_model_ready",
            "1 when the model is loaded and the server takes requests.",
            registry=r,
        )

        self.time_to_first_token = Histogram(
            "tauon_server_time_to_first_token_seconds",
            "causal-lm: time from a sequence's arrival to its first generated token (queueing and prefill).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "tauon_server_time_per_output_token_seconds",
            "causal-lm: mean time between a sequence's generated tokens after the first.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.generated_tokens = Counter(
            "tauon_server_generated_tokens", "causal-lm: tokens generated (all endpoints).", registry=r
        )
        self.running_sequences = Gauge(
            "tauon_server_running_sequences", "causal-lm: sequences in the running batch.", registry=r
        )
        self.waiting_sequences = Gauge(
            "tauon_server_waiting_sequences", "causal-lm: sequences waiting for a slot.", registry=r
        )

    def engine_metrics(self) -> EngineMetrics:
        return EngineMetrics(
            on_first_token=self.time_to_first_token.observe,
            on_finish=lambda _n, per_token: self.time_per_output_token.observe(per_token),
            on_tokens=self.generated_tokens.inc,
            on_running=self.running_sequences.set,
            on_waiting=self.waiting_sequences.set,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled with the matched route template (bounded)."""

    ENDPOINT_CACHE = 1024  # (method, path) pairs remembered; unknown paths beyond that are matched each time

    def __init__(self, app: Any, metrics: ServerMetrics, router: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router
        self._endpoints: dict[tuple[str, str], str] = {}

    def _endpoint(self, scope: dict[str, Any]) -> str:
        # Matching walks every route's regex; the routes never change, so the answer per path is cached.
        key = (scope.get("method", ""), scope.get("path", ""))
        found = self._endpoints.get(key)
        if found is None:
            found = self._match(scope)
            if len(self._endpoints) < self.ENDPOINT_CACHE:
                self._endpoints[key] = found
        return found

    def _match(self, scope: dict[str, Any]) -> str:
        partial = None
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(route.path)
            if match == Match.PARTIAL and partial is None:
                partial = str(route.path)  # path matched, method did not (405)
        return partial or "unmatched"

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self._endpoint(scope)
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - t0)


# -- server state --------------------------------------------------------------------------------


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.limits = Limits(max_instances=config.max_instances, max_text_chars=config.max_text_chars)
        # One worker thread: loads the model, then runs every forward pass (never two at once).
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tauon-infer")
        self.predictor: Predictor | None = None
        self.batcher: DynamicBatcher[str, Any] | None = None
        self.engine: GenerationEngine | None = None
        self.llm: LLMService | None = None
        self.created = int(time.time())
        self.draining = False
        self.load_error: str | None = None
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.metrics.model_ready.set(0)

    @property
    def ready(self) -> bool:
        return self.predictor is not None and self._serving and not self.draining

    @property
    def _serving(self) -> bool:
        return self.batcher is not None or self.engine is not None

    def output_names(self) -> tuple[str, ...]:
        assert self.predictor is not None
        return (
            CLASSIFICATION_OUTPUTS if self.predictor.task == SEQUENCE_CLASSIFICATION else GENERATION_OUTPUTS
        )

    def _load_blocking(self) -> Predictor:
        cfg = self.config
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass
        predictor = load_predictor(
            cfg.model,
            task=cfg.task,
            device=cfg.device,
            dtype=cfg.dtype,
            max_seq_length=cfg.max_seq_length,
            max_new_tokens=cfg.max_new_tokens,
        )
        predictor.predict(["warm up"])  # first-call allocations happen before readiness, not in a request
        return predictor

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            if self.config.load_delay_seconds > 0:
                log.warning(
                    "%s=%s (test-only): delaying the model load",
                    LOAD_DELAY_ENV,
                    self.config.load_delay_seconds,
                )
                await asyncio.sleep(self.config.load_delay_seconds)
            predictor = await loop.run_in_executor(self.executor, self._load_blocking)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("cannot load model %s: %s", self.config.model, self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self.predictor = predictor
        cfg = self.config
        wait = cfg.max_queue_wait_seconds or None
        if predictor.task == CAUSAL_LM:
            self._start_engine(predictor)
        else:
            self.batcher = DynamicBatcher(
                predictor.predict,
                max_batch_size=cfg.max_batch_size,
                max_latency_s=cfg.max_latency_ms / 1000.0,
                executor=self.executor,
                max_queued_items=cfg.max_queued_instances,
                on_batch=self.metrics.observe_batch,
                on_queue_depth=self.metrics.queue_depth.set,
                max_queue_wait_s=wait,
            )
            self.batcher.start()
            if self.draining:
                self.batcher.begin_drain()
        if not self.draining:
            self.metrics.model_ready.set(1)
        log.info(
            "model %r ready in %.1fs (%s)",
            cfg.name,
            time.perf_counter() - t0,
            f"continuous batching: max_concurrent_sequences={cfg.max_concurrent_sequences} "
            f"max_model_length={self.engine.max_model_length}"
            if self.engine is not None
            else f"max_batch_size={cfg.max_batch_size} max_latency_ms={cfg.max_latency_ms:g}; batching "
            + ("on" if self.batcher is not None and self.batcher.merging else "off"),
        )

    def _start_engine(self, predictor: Predictor) -> None:
        cfg = self.config
        model_length = predictor.model_length
        if cfg.max_model_length > 0:
            model_length = min(model_length, cfg.max_model_length) if model_length else cfg.max_model_length
        self.engine = GenerationEngine(
            predictor.model,
            predictor.tokenizer,
            device=predictor.device,
            max_model_length=model_length,
            max_running=cfg.max_concurrent_sequences,
            max_waiting=cfg.max_queued_sequences,
            max_queue_wait_s=cfg.max_queue_wait_seconds or None,
            metrics=self.metrics.engine_metrics(),
        )
        self.engine.start()
        self.llm = LLMService(
            self.engine,
            predictor.tokenizer,
            served_name=cfg.name,
            max_new_tokens=cfg.max_new_tokens,
            max_model_length=model_length,
        )

    def begin_shutdown(self) -> None:
        if not self.draining:
            log.info("shutdown requested: not ready; draining queued and in-flight requests")
        self.draining = True
        self.metrics.model_ready.set(0)
        if self.batcher is not None:
            self.batcher.begin_drain()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()  # drains what is still queued
        if self.engine is not None:
            engine = self.engine
            await asyncio.to_thread(engine.close, self.config.graceful_timeout_seconds)

    # request helpers -----------------------------------------------------------------------------

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.config.name:
            raise RequestError(
                404, f"model {name!r} is not served here (this server serves {self.config.name!r})"
            )
        if version is not None and version != MODEL_VERSION:
            raise RequestError(404, f"model {name!r} has no version {version!r} (versions: {MODEL_VERSION})")

    def check_ready(self) -> Predictor:
        if self.draining:
            raise RequestError(503, "the server is shutting down")
        if self.predictor is None or not self._serving:
            if self.load_error:
                raise RequestError(503, f"model {self.config.name!r} failed to load: {self.load_error}")
            raise RequestError(503, f"model {self.config.name!r} is not ready (still loading)")
        return self.predictor

    def check_prompts(self, predictor: Predictor, texts: list[str], where: Callable[[int], str]) -> None:
        if predictor.task == CAUSAL_LM:
            for i, t in enumerate(texts):
                if t == "":
                    raise RequestError(400, f"{where(i)} is empty; a causal-lm prompt must not be empty")

    async def infer(self, texts: list[str]) -> list[Any]:
        if self.engine is not None:
            return await self._generate(texts)
        assert self.batcher is not None
        try:
            return await self.batcher.submit(texts)
        except BatcherClosed:
            raise RequestError(503, "the server is shutting down") from None
        except (QueueFull, QueueTimeout) as exc:
            raise RequestError(503, f"the server is overloaded: {exc}; retry later") from None
        except Exception as exc:
            log.exception("inference failed")
            raise RequestError(500, f"inference failed: {type(exc).__name__}: {exc}") from None

    async def _generate(self, texts: list[str]) -> list[str]:
        """V1/V2 on a causal LM: every text is a greedy sequence of --max-new-tokens (or fewer when the
        model length leaves less room) in the continuous batch; the prompt is truncated from the left."""
        assert self.engine is not None and self.predictor is not None
        tokenizer = self.predictor.tokenizer
        engine = self.engine
        jobs = []
        for text in texts:
            ids = list(tokenizer(text)["input_ids"])[-(engine.max_model_length - 1) :]
            room = engine.max_model_length - len(ids)
            params = SamplingParams(max_tokens=max(1, min(self.config.max_new_tokens, room)))
            jobs.append(engine.generate(ids, params))
        try:
            done = await asyncio.gather(*jobs)
        except SequenceQueueFull as exc:
            raise RequestError(503, f"the server is overloaded: {exc}; retry later") from None
        except EngineClosed:
            raise RequestError(503, "the server is shutting down") from None
        out: list[str] = []
        for text, event in done:
            if event.finish_reason == "timeout":
                raise RequestError(503, f"the server is overloaded: {event.error}; retry later")
            if event.finish_reason == "error":
                raise RequestError(500, f"inference failed: {event.error}")
            out.append(text)
        return out


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {declared!r}") from None
        if n > limit:
            raise RequestError(413, f"request body is {n} bytes; the limit is {limit} (--max-body-bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


PARSE_OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in a thread, not on the event loop


async def _json_request(state: ServerState, request: Request) -> Any:
    check_content_type(request.headers.get("content-type"))
    body = await _read_body(request, state.config.max_body_bytes)
    if len(body) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json_body, body)
    return parse_json_body(body)


async def _openai_request(state: ServerState, request: Request) -> tuple[LLMService, Any]:
    """The LLM service and the parsed body, or an OpenAI-shaped error."""
    try:
        predictor = state.check_ready()
        if state.llm is None:
            raise OpenAIError(
                404,
                f"model {state.config.name!r} is a {predictor.task} model; the OpenAI API serves causal LMs",
                param="model",
                code="model_not_found",
            )
        return state.llm, await _json_request(state, request)
    except RequestError as exc:
        raise OpenAIError(
            exc.status, exc.message, param="body" if exc.status in (400, 413) else None
        ) from None


def _v1_prediction(predictor: Predictor, result: Any) -> dict[str, Any]:
    if isinstance(result, Classification):
        return {
            "label": result.label,
            "labelName": predictor.label_name(result.label),
            "probabilities": result.probabilities,
        }
    return {"generatedText": result}


def _v2_outputs(predictor: Predictor, results: list[Any], names: list[str] | None) -> list[dict[str, Any]]:
    n = len(results)
    if predictor.task == SEQUENCE_CLASSIFICATION:
        k = predictor.num_labels
        available: dict[str, Callable[[], dict[str, Any]]] = {
            "label": lambda: {
                "name": "label",
                "datatype": "INT64",
                "shape": [n],
                "data": [r.label for r in results],
            },
            "probabilities": lambda: {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [n, k],
                "data": [p for r in results for p in r.probabilities],
            },
            "label_name": lambda: {
                "name": "label_name",
                "datatype": "BYTES",
                "shape": [n],
                "data": [predictor.label_name(r.label) for r in results],
            },
        }
    else:
        available = {
            "generated_text": lambda: {
                "name": "generated_text",
                "datatype": "BYTES",
                "shape": [n],
                "data": list(results),
            }
        }
    return [available[name]() for name in (names or list(available))]


def _model_metadata(state: ServerState, predictor: Predictor) -> dict[str, Any]:
    if predictor.task == SEQUENCE_CLASSIFICATION:
        outputs = [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, predictor.num_labels]},
            {"name": "label_name", "datatype": "BYTES", "shape": [-1]},
        ]
    else:
        outputs = [{"name": "generated_text", "datatype": "BYTES", "shape": [-1]}]
    return {
        "name": state.config.name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch",
        "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        "parameters": {
            "task": predictor.task,
            "labels": [predictor.label_name(i) for i in range(predictor.num_labels)],
            "max_batch_size": state.config.max_batch_size,
            "max_latency_ms": state.config.max_latency_ms,
        },
    }


# -- application ---------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    cfg = state.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        state.loop = asyncio.get_running_loop()
        load_task = asyncio.create_task(state.load(), name="tauon-load")
        try:
            yield
        finally:
            state.begin_shutdown()
            if not load_task.done():
                load_task.cancel()
            await state.close()
            state.executor.shutdown(wait=False, cancel_futures=True)
            log.info("shutdown complete")

    app = FastAPI(title=SERVER_NAME, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, router=app.router)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; counted in the metrics as 499

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    # health / metadata ----------------------------------------------------------------------------

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": _server_version(), "extensions": []}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        state.check_model(name, version)
        return _model_metadata(state, state.check_ready())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        state.check_model(name, version)
        return JSONResponse({"name": name, "ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/v1/models")
    async def v1_list() -> dict[str, Any]:
        # KServe V1's body plus OpenAI's list keys, so both kinds of client read it.
        return {"models": [cfg.name], **models_list(cfg.name, state.created)}

    @app.get("/openai/v1/models")
    async def openai_models() -> dict[str, Any]:
        return models_list(cfg.name, state.created)

    @app.post("/v1/completions")
    @app.post("/openai/v1/completions")
    async def completions(request: Request) -> Response:
        llm, body = await _openai_request(state, request)
        return await llm.handle("completion", body, request)

    @app.post("/v1/chat/completions")
    @app.post("/openai/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        llm, body = await _openai_request(state, request)
        return await llm.handle("chat", body, request)

    @app.get("/v1/models/{name}")
    async def v1_model(name: str) -> JSONResponse:
        state.check_model(name)
        return JSONResponse({"name": name, "ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # inference ------------------------------------------------------------------------------------

    # The two inference routes are plain Starlette routes: they take the request and return a response,
    # so FastAPI's per-request dependency solving and endpoint wrapping buy nothing there (about a
    # third of the event loop's time per request at 32 clients, measured with py-spy).

    async def v1_predict(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        state.check_model(name)
        predictor = state.check_ready()
        texts = parse_v1_predict(await _json_request(state, request), state.limits)
        state.check_prompts(predictor, texts, lambda i: f"instances[{i}]")
        results = await until_disconnect(request, state.infer(texts))
        # JSONResponse directly: skips FastAPI's jsonable_encoder walk over every float
        return JSONResponse({"predictions": [_v1_prediction(predictor, r) for r in results]})

    async def v2_infer(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        state.check_model(name, version)
        predictor = state.check_ready()
        req = parse_v2_infer(await _json_request(state, request), state.limits, state.output_names())
        state.check_prompts(predictor, req.texts, lambda i: f"inputs[0].data[{i}]")
        results = await until_disconnect(request, state.infer(req.texts))
        response: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
        if req.id is not None:
            response["id"] = req.id
        response["outputs"] = _v2_outputs(predictor, results, req.outputs)
        return JSONResponse(response)

    app.add_route("/v1/models/{name}:predict", v1_predict, methods=["POST"])
    app.add_route("/v2/models/{name}/infer", v2_infer, methods=["POST"])
    app.add_route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"])
    return app


# -- process -------------------------------------------------------------------------------------


def _make_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's graceful shutdown, plus: readiness goes false and the batcher drains at once, and
        the process exits 0 after a signal-initiated shutdown (uvicorn would re-raise the signal)."""

        state: ServerState

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()
            loop = self.state.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self.state.begin_shutdown)

    return GracefulServer


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        resolve_model_source(cfg.model)  # fail fast on a missing directory, before listening
    except ModelSourceError as exc:
        log.error("%s", exc)
        return 1

    import uvicorn

    if cfg.gil_switch_interval_ms > 0:
        # The event loop and the inference thread share the GIL. Every torch op releases it and must
        # take it back; with Python's default 5 ms interval a busy event loop stalls each forward pass.
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000.0)
    state = ServerState(cfg)
    app = create_app(state)
    server_cls = _make_server_class()
    server = server_cls(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=cfg.log_level,
            access_log=cfg.access_log,
            timeout_graceful_shutdown=int(cfg.graceful_timeout_seconds) or None,
            limit_concurrency=cfg.limit_concurrency or None,
            lifespan="on",
        )
    )
    server.state = state

    def fatal(exc: BaseException) -> None:
        state.exit_code = 1
        server.should_exit = True

    state.on_fatal = fatal
    log.info(
        "serving %r from %s on %s:%d (max_batch_size=%d max_latency_ms=%g max_instances=%d)",
        cfg.name,
        cfg.model,
        cfg.host,
        cfg.port,
        cfg.max_batch_size,
        cfg.max_latency_ms,
        cfg.max_instances,
    )
    server.run()
    return state.exit_code


def _exit_now(code: int) -> None:
    """Exit without interpreter teardown, which takes seconds once torch is loaded. Everything that
    matters is done by then: requests drained, the batcher and uvicorn stopped, logs flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
