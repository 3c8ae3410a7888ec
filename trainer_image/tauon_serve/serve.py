"""tauon model server: KServe V1 + Open Inference Protocol (V2) REST over a Hugging Face model directory,
plus the OpenAI completions/chat API (with continuous batching) for causal LMs.

    python -m tauon_serve.serve --model DIR --name NAME [--port 8080] [--max-batch-size 32]
                                  [--max-latency-ms 10] ...

Every flag can also be set through the environment (see ``--help`` and trainer_image/SERVING.md); a flag
on the command line wins over the environment. The socket listens at once; the model loads in the
background and ``/v2/health/ready`` answers 503 until it has loaded (and again once shutdown begins).
With ``--health-port`` the two probes are also served on a port of their own, which --limit-concurrency
does not cover. A connection that sends no complete request head within --header-timeout-seconds is
closed. On SIGTERM/SIGINT the server stops accepting connections, reports not-ready, and lets queued and
in-flight requests finish for --graceful-timeout-seconds; streams still running then end with an error
frame and ``[DONE]``, other requests with 503; then it exits 0. A model that fails to load makes the
process exit 1.

This module is the entry point and assembles the app; the parts are split by role, as KServe's server:

* :mod:`.config`: flags and environment -> :class:`~.config.ServerConfig`;
* :mod:`.metrics`: the Prometheus registry;
* :mod:`.state`: the predictor's life (load, ready, drain, close) and the per-request checks;
* :mod:`.predictor`: the interface both back-ends implement, :mod:`.loading` builds one;
  :mod:`.classifier` (dynamic batching, :mod:`.batching`) and :mod:`.llm` (continuous batching:
  :mod:`.generation`, :mod:`.scheduler`, :mod:`.detokenizer`; the OpenAI service) are the back-ends;
* :mod:`.protocol` (V1/V2 parsing and the V2 schema) and :mod:`.openai_api` (OpenAI parsing and
  response bodies): the protocols' data, pure;
* :mod:`.rest`: the routes, one module per protocol (:mod:`.rest.v1`, :mod:`.rest.v2`,
  :mod:`.rest.openai`) over :mod:`.rest.common`, and :mod:`.rest.metrics` (the request middleware,
  ``GET /metrics``). Only :mod:`.rest` and this module import FastAPI/starlette/uvicorn.

This package never imports the operator package (``tauon``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tauon_core.sources import ModelSourceError

from .config import SERVER_NAME, parse_args
from .predictor import resolve_model_source
from .rest import common, metrics, openai, v1, v2
from .state import ServerState

log = logging.getLogger("tauon.serve")


# -- application ---------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
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
    app.add_middleware(metrics.MetricsMiddleware, metrics=state.metrics, router=app.router)
    common.add_error_handlers(app)
    v2.add_routes(app, state)
    v1.add_routes(app, state)
    openai.add_routes(app, state)
    metrics.add_routes(app, state.metrics)
    return app


# -- process -------------------------------------------------------------------------------------


# Past --graceful-timeout-seconds the routes end what is still in flight (state.cut); uvicorn cancels
# whatever has not ended this much later, so a stream has time to send its last frame.
HARD_STOP_MARGIN_SECONDS = 3


def header_timeout_protocol(timeout: float) -> type:
    """uvicorn's HTTP protocol (httptools), plus a deadline for the request head: a connection that has
    not sent a complete request line and headers ``timeout`` seconds after it opened, or after the first
    byte of its next request, is closed. uvicorn's keep-alive timeout does not cover a connection that
    never sends a byte, nor one that sends a few and stops; each holds a --limit-concurrency slot."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

    return HeaderTimeoutProtocol


def health_server(state: ServerState, protocol: type) -> Any:
    """The probes alone on --health-port: no --limit-concurrency, no body, so neither idle connections
    nor load on the main port make the kubelet restart the container or mark it unready."""
    import uvicorn
    from starlette.applications import Starlette

    cfg = state.config
    app = Starlette()
    v2.add_health_routes(app, state)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.health_port,
        http=protocol,
        lifespan="off",
        log_level=cfg.log_level,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    return server


def _make_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's graceful shutdown, plus: readiness goes false and the batcher drains at once, the
        process exits 0 after a signal-initiated shutdown (uvicorn would re-raise the signal), and the
        --health-port listener runs from before the main one opens until after it has drained."""

        state: ServerState
        health: Any = None

        async def startup(self, sockets: Any = None) -> None:
            if self.health is not None:
                await self.health.startup()
            await super().startup(sockets)

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            if self.health is not None and self.health.started:
                await self.health.shutdown()

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
    protocol = header_timeout_protocol(cfg.header_timeout_seconds)
    server_cls = _make_server_class()
    server = server_cls(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            http=protocol,
            log_level=cfg.log_level,
            access_log=cfg.access_log,
            timeout_graceful_shutdown=math.ceil(cfg.graceful_timeout_seconds) + HARD_STOP_MARGIN_SECONDS,
            limit_concurrency=cfg.limit_concurrency or None,
            lifespan="on",
        )
    )
    server.state = state
    if cfg.health_port:
        server.health = health_server(state, protocol)

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
