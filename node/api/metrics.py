"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class NodeMetrics:
    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dcml_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("dcml_http_request_duration_seconds", "HTTP request duration, "
                                         "streams until their last byte", ["route"], buckets=_LATENCY_BUCKETS,
                                         registry=r)
        self.ttft = Histogram("dcml_time_to_first_token_seconds", "From request accepted to first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("dcml_generation_duration_seconds", "From request accepted to "
                                            "last token; rate(output_tokens)/rate(sum) = tokens/s",
                                            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dcml_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.output_tokens = Counter("dcml_output_tokens", "Output tokens generated", ["model"], registry=r)
        self.token_mismatch = Counter("dcml_upstream_token_mismatch", "Answers whose upstream usage disagreed "
                                      "with the node's own token count (billing keeps the node's)", ["kind"],
                                      registry=r)
        self.errors = Counter("dcml_errors", "Error responses and aborted streams by kind", ["kind"], registry=r)
        self.in_flight = Gauge("dcml_in_flight_requests", "Requests being served now", registry=r)
        self.queue_depth = Gauge("dcml_engine_queue_depth", "Requests waiting in the engine's queue", registry=r)
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}  # see `count`

    def count(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished request (route: its template, so ids don't explode cardinality)."""
        children = self._children.get((route, method, status))
        if children is None:  # a label lookup costs as much as the update: once per route, method and status
            children = self._children[(route, method, status)] = (
                self.requests.labels(route, method, str(status)), self.request_seconds.labels(route),
                self.errors.labels(f"http_{status}") if status >= 400 else None)
        requests, request_seconds, errors = children
        requests.inc()
        request_seconds.observe(seconds)
        if errors is not None:
            errors.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer and slow streams): counts by route template."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            label = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.count(label, scope["method"], status, time.perf_counter() - start)
