"""Configuration of the model server: :class:`ServerConfig`, filled from command-line flags and the
environment by :func:`parse_args`.

Every flag can also be set through an environment variable (``_OPTIONS`` lists them; ``--help`` shows
them and trainer_image/SERVING.md documents them); a flag on the command line wins over the environment.
Invalid values end the process with argparse's usage error (exit 2) before anything is loaded.

Pure: argparse and the task names only (no torch, no FastAPI), so ``serve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from .predictor import TASKS
from .scheduler import DEFAULT_MAX_BATCHED_TOKENS

SERVER_NAME = "tauon-model-server"
LOAD_DELAY_ENV = "TAUON_LOAD_DELAY_SECONDS"  # test-only: sleep this long before loading the model
# An s3:// model is downloaded here (tauon_serve.download); the operator mounts a volume sized for it.
DEFAULT_MODEL_CACHE_DIR = os.path.join(tempfile.gettempdir(), "tauon-models")
DEFAULT_MODEL_DOWNLOAD_TIMEOUT_SECONDS = 1800.0
DEFAULT_MODEL_DOWNLOAD_CONCURRENCY = 4
MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 16 * MIB  # V1/V2: up to --max-instances texts of --max-text-chars each
DEFAULT_MAX_OPENAI_BODY_BYTES = 2 * MIB  # OpenAI: one prompt or conversation within the model length
DEFAULT_MAX_INFLIGHT_BODY_BYTES = 32 * MIB  # bodies being read and parsed, all requests together
DEFAULT_GRACEFUL_TIMEOUT_SECONDS = 25.0
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_V1_NEW_TOKENS = 32  # V1/V2 tokens per text when --max-new-tokens is 0 (no cap)


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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_openai_body_bytes: int = DEFAULT_MAX_OPENAI_BODY_BYTES
    max_inflight_body_bytes: int = DEFAULT_MAX_INFLIGHT_BODY_BYTES
    max_queued_instances: int = 4096
    task: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_seq_length: int = 0
    max_new_tokens: int = 0  # 0: no server-wide cap (V1/V2 then generate DEFAULT_V1_NEW_TOKENS)
    max_model_length: int = 0
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS
    max_concurrent_sequences: int = 64
    max_queued_sequences: int = 256
    max_queue_wait_seconds: float = 60.0
    limit_concurrency: int = 1024
    threads: int = 0
    gil_switch_interval_ms: float = 0.5
    graceful_timeout_seconds: float = DEFAULT_GRACEFUL_TIMEOUT_SECONDS
    health_port: int = 0
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    log_level: str = "info"
    access_log: bool = False
    load_delay_seconds: float = 0.0
    model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR
    model_download_timeout_seconds: float = DEFAULT_MODEL_DOWNLOAD_TIMEOUT_SECONDS
    model_download_concurrency: int = DEFAULT_MODEL_DOWNLOAD_CONCURRENCY

    @property
    def v1_new_tokens(self) -> int:
        """Tokens a V1/V2 text generates: the cap, or DEFAULT_V1_NEW_TOKENS without one."""
        return self.max_new_tokens or DEFAULT_V1_NEW_TOKENS


# (flag, env var, type, default, help)
_OPTIONS: list[tuple[str, str, Any, Any, str]] = [
    (
        "--model",
        "TAUON_MODEL_DIR",
        str,
        None,
        "model directory (Hugging Face format), file://PATH, hf://ORG/NAME or s3://BUCKET/PREFIX/ "
        "(downloaded into --model-cache-dir before loading)",
    ),
    (
        "--model-cache-dir",
        "TAUON_MODEL_CACHE_DIR",
        str,
        DEFAULT_MODEL_CACHE_DIR,
        "s3:// models: the directory they are downloaded into (a volume sized for the model); a complete "
        "copy there is reused",
    ),
    (
        "--model-download-timeout-seconds",
        "TAUON_MODEL_DOWNLOAD_TIMEOUT_SECONDS",
        float,
        DEFAULT_MODEL_DOWNLOAD_TIMEOUT_SECONDS,
        "s3:// models: longest download (listing and verification included); beyond it the server exits 1",
    ),
    (
        "--model-download-concurrency",
        "TAUON_MODEL_DOWNLOAD_CONCURRENCY",
        int,
        DEFAULT_MODEL_DOWNLOAD_CONCURRENCY,
        "s3:// models: objects downloaded at once",
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
    (
        "--max-body-bytes",
        "TAUON_MAX_BODY_BYTES",
        int,
        DEFAULT_MAX_BODY_BYTES,
        "largest KServe V1/V2 request body (413 beyond)",
    ),
    (
        "--max-openai-body-bytes",
        "TAUON_MAX_OPENAI_BODY_BYTES",
        int,
        DEFAULT_MAX_OPENAI_BODY_BYTES,
        "largest OpenAI completions/chat request body (413 beyond)",
    ),
    (
        "--max-inflight-body-bytes",
        "TAUON_MAX_INFLIGHT_BODY_BYTES",
        int,
        DEFAULT_MAX_INFLIGHT_BODY_BYTES,
        "request bodies over 64 KiB being read and parsed, all requests together; a body that would "
        "exceed it is answered 503 + Retry-After",
    ),
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
        0,
        "causal-lm: a server-wide cap on generated tokens per sequence (OpenAI max_tokens above it is "
        "clamped, as on vLLM); 0 = no cap beyond the model length. V1/V2 generate this many tokens per "
        f"text ({DEFAULT_V1_NEW_TOKENS} when 0)",
    ),
    (
        "--max-batched-tokens",
        "TAUON_MAX_BATCHED_TOKENS",
        int,
        DEFAULT_MAX_BATCHED_TOKENS,
        "causal-lm: KV budget of the running batch in token slots (rows x longest sequence); a sequence "
        "that would exceed it waits (one sequence alone is always admitted)",
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
        DEFAULT_GRACEFUL_TIMEOUT_SECONDS,
        "on SIGTERM, how long in-flight requests and streams may take to finish (readiness is false "
        "meanwhile); then streams end with an error frame and [DONE], other requests answer 503",
    ),
    (
        "--health-port",
        "TAUON_HEALTH_PORT",
        int,
        0,
        "also serve /v2/health/live and /v2/health/ready on this port, outside --limit-concurrency "
        "(0 = only on --port)",
    ),
    (
        "--header-timeout-seconds",
        "TAUON_HEADER_TIMEOUT_SECONDS",
        float,
        DEFAULT_HEADER_TIMEOUT_SECONDS,
        "a connection that has not sent a complete request head this long after connecting (or after "
        "its previous response) is closed",
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


def _check(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Refuse out-of-range values with argparse's usage error (exit 2)."""
    checks = [
        (ns.max_batch_size >= 1, "--max-batch-size must be >= 1"),
        (ns.max_latency_ms >= 0, "--max-latency-ms must be >= 0"),
        (ns.max_instances >= 1, "--max-instances must be >= 1"),
        (ns.max_text_chars >= 1, "--max-text-chars must be >= 1"),
        (ns.max_body_bytes >= 1024, "--max-body-bytes must be >= 1024"),
        (ns.max_openai_body_bytes >= 1024, "--max-openai-body-bytes must be >= 1024"),
        (
            ns.max_inflight_body_bytes >= max(ns.max_body_bytes, ns.max_openai_body_bytes),
            "--max-inflight-body-bytes must be >= --max-body-bytes and --max-openai-body-bytes",
        ),
        (ns.graceful_timeout_seconds >= 0, "--graceful-timeout-seconds must be >= 0"),
        (ns.header_timeout_seconds > 0, "--header-timeout-seconds must be > 0"),
        (0 <= ns.health_port <= 65535, "--health-port must be 0..65535"),
        (ns.health_port == 0 or ns.health_port != ns.port, "--health-port must differ from --port"),
        (ns.task in ("auto", *TASKS), f"--task must be auto or one of {', '.join(TASKS)}"),
        (ns.dtype in ("auto", "fp32", "bf16", "fp16"), "--dtype must be auto, fp32, bf16 or fp16"),
        (ns.max_new_tokens >= 0, "--max-new-tokens must be >= 0"),
        (ns.max_batched_tokens >= 1, "--max-batched-tokens must be >= 1"),
        (ns.max_model_length >= 0, "--max-model-length must be >= 0"),
        (ns.max_concurrent_sequences >= 1, "--max-concurrent-sequences must be >= 1"),
        (ns.max_queued_sequences >= 1, "--max-queued-sequences must be >= 1"),
        (ns.max_queue_wait_seconds >= 0, "--max-queue-wait-seconds must be >= 0"),
        (ns.limit_concurrency >= 0, "--limit-concurrency must be >= 0"),
        (ns.threads >= 0, "--threads must be >= 0"),
        (ns.gil_switch_interval_ms >= 0, "--gil-switch-interval-ms must be >= 0"),
        (0 <= ns.port <= 65535, "--port must be 0..65535"),
        (ns.model_download_timeout_seconds > 0, "--model-download-timeout-seconds must be > 0"),
        (ns.model_download_concurrency >= 1, "--model-download-concurrency must be >= 1"),
        (bool(ns.model_cache_dir), "--model-cache-dir must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)


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
    _check(parser, ns)
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
        max_openai_body_bytes=ns.max_openai_body_bytes,
        max_inflight_body_bytes=ns.max_inflight_body_bytes,
        max_queued_instances=max(ns.max_queued_instances, ns.max_instances),
        task=ns.task,
        device=ns.device,
        dtype=ns.dtype,
        max_seq_length=ns.max_seq_length,
        max_new_tokens=ns.max_new_tokens,
        max_batched_tokens=ns.max_batched_tokens,
        max_model_length=ns.max_model_length,
        max_concurrent_sequences=ns.max_concurrent_sequences,
        max_queued_sequences=ns.max_queued_sequences,
        max_queue_wait_seconds=ns.max_queue_wait_seconds,
        limit_concurrency=ns.limit_concurrency,
        threads=ns.threads,
        gil_switch_interval_ms=ns.gil_switch_interval_ms,
        graceful_timeout_seconds=ns.graceful_timeout_seconds,
        health_port=ns.health_port,
        header_timeout_seconds=ns.header_timeout_seconds,
        log_level=ns.log_level.lower(),
        access_log=ns.access_log,
        load_delay_seconds=delay,
        model_cache_dir=ns.model_cache_dir,
        model_download_timeout_seconds=ns.model_download_timeout_seconds,
        model_download_concurrency=ns.model_download_concurrency,
    )
