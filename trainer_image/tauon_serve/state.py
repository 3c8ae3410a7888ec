"""The model server's state: one :class:`~tauon_serve.predictor.Predictor` through its life, and the
checks every route makes.

The socket listens at once; :meth:`ServerState.load` loads the model in the single inference thread
(``--threads``, :func:`~tauon_serve.loading.load_predictor`, one warm-up pass), then starts the predictor
on the event loop; until then ``ready`` is false and inference answers 503 ("still loading", or the load
error). A model that fails to load calls ``on_fatal`` (the process exits 1). :meth:`begin_shutdown`
makes the server not ready and lets the predictor drain; ``--graceful-timeout-seconds`` later
:attr:`ServerState.cut` is set, and whatever is still in flight ends (a stream with an error frame and
``[DONE]``, a request with 503). :meth:`close` waits for queued and in-flight work. The state never
looks at the task: what differs between back-ends is behind the predictor.

:class:`BodyBudget` bounds the request bodies being read and parsed, all requests together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .config import LOAD_DELAY_ENV, ServerConfig
from .loading import load_predictor
from .metrics import ServerMetrics
from .predictor import Predictor
from .protocol import MODEL_VERSION, Limits, RequestError

log = logging.getLogger("tauon.serve")


# A body up to this size is never charged to the in-flight budget: small requests are always read (their
# total is bounded by --limit-concurrency), so big bodies cannot starve them.
BUDGET_FREE_BYTES = 64 * 1024


class BodyBudget:
    """Bytes of request bodies being read and parsed at once, all requests together (--max-inflight-body-
    bytes). A request charges its body once it passes :data:`BUDGET_FREE_BYTES`, chunk by chunk, and
    gives it all back when its body is parsed or it fails, on every path."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "body budget given back more than taken"


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.limits = Limits(max_instances=config.max_instances, max_text_chars=config.max_text_chars)
        # One worker thread: loads the model, then runs every forward pass (never two at once).
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tauon-infer")
        self.predictor: Predictor | None = None  # set once loaded AND started
        self.created = int(time.time())
        self.draining = False
        self.body_budget = BodyBudget(config.max_inflight_body_bytes)
        # Set --graceful-timeout-seconds after shutdown begins: in-flight work still running ends then.
        self.cut = asyncio.Event()
        self._cut_timer: asyncio.TimerHandle | None = None
        self.load_error: str | None = None
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.metrics.model_ready.set(0)

    @property
    def ready(self) -> bool:
        return self.predictor is not None and not self.draining

    def _load_blocking(self) -> Predictor:
        if self.config.threads > 0:
            import torch

            torch.set_num_threads(self.config.threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass
        predictor = load_predictor(self.config)
        predictor.warm_up()  # first-call allocations happen before readiness, not in a request
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
        predictor.start(self.executor, self.metrics)
        if self.draining:
            predictor.begin_drain()
        self.predictor = predictor
        if not self.draining:
            self.metrics.model_ready.set(1)
        log.info(
            "model %r ready in %.1fs (%s)", self.config.name, time.perf_counter() - t0, predictor.describe()
        )

    def health_error(self) -> str | None:
        """Why the server is not live (the liveness probe answers 503 with it), or None."""
        return self.predictor.health_error() if self.predictor is not None else None

    def begin_shutdown(self) -> None:
        if not self.draining:
            grace = self.config.graceful_timeout_seconds
            log.info(
                "shutdown requested: not ready; draining queued and in-flight requests (up to %gs)", grace
            )
            if self.loop is not None and not self.loop.is_closed():
                self._cut_timer = self.loop.call_later(grace, self._cut)
        self.draining = True
        self.metrics.model_ready.set(0)
        if self.predictor is not None:
            self.predictor.begin_drain()

    def _cut(self) -> None:
        log.warning("graceful shutdown timeout: ending the requests still in flight")
        self.cut.set()

    async def close(self) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        if self.predictor is not None:
            await self.predictor.close(self.config.graceful_timeout_seconds)

    # request checks ------------------------------------------------------------------------------

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
        if self.predictor is None:
            if self.load_error:
                raise RequestError(503, f"model {self.config.name!r} failed to load: {self.load_error}")
            raise RequestError(503, f"model {self.config.name!r} is not ready (still loading)")
        return self.predictor
