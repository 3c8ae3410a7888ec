"""The HTTP side of the metrics: :class:`MetricsMiddleware` counts and times every request into
:class:`~tauon_serve.metrics.ServerMetrics`, labelled with the matched route template (a bounded label:
``/v1/models/{name}:predict``, ``unmatched``), and ``GET /metrics`` serves the registry as text.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Match

from ..metrics import ServerMetrics


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


def add_routes(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
