"""Prometheus metrics of the model server: :class:`ServerMetrics`, one registry per server, every series
prefixed ``tauon_server_`` and documented in docs/metrics.md.

The back-ends report into it (the dynamic batcher through :meth:`ServerMetrics.observe_batch` and the
queue-depth gauge, the continuous-batching engine through :meth:`ServerMetrics.engine_metrics`), the
HTTP layer through :class:`tauon_serve.rest.metrics.MetricsMiddleware`, which also serves ``GET
/metrics``. Nothing here imports FastAPI or starlette.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    gc_collector,
    platform_collector,
    process_collector,
)

from .scheduler import EngineMetrics


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
