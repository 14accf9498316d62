"""Prometheus metrics at ``/metrics``: requests by route and status, inference latency, images by risk.

Each app has its own registry (so several apps in one process, as in tests, do not mix counts). With
several worker processes (``oncolens serve --workers N``) the server runs in Prometheus multiprocess
mode: ``PROMETHEUS_MULTIPROC_DIR`` names a folder where each worker keeps its values, and
``/metrics`` (whichever worker answers) sums them over every worker.
Routes are labelled by their template (``/api/v1/cases/{case_id}``), never by the raw path, so
ids do not explode the label set; paths that match no route are counted as ``unmatched``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from oncolens.decision import CaseResult
from oncolens.runtime.memory import resident_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "oncolens_http_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "oncolens_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "oncolens_inference_duration_seconds",
            "Model inference time per request (queueing in the batcher included), by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "oncolens_images_analysed",
            "Images analysed, by model and the risk level of the image's own result.",
            ["model", "risk_level"],
            registry=self.registry,
        )
        self.out_of_domain = Counter(
            "oncolens_images_out_of_domain",
            "Images the model flagged as unlike its training images (answered 'indeterminate'), by model.",
            ["model"],
            registry=self.registry,
        )
        self.quality_warnings = Counter(
            "oncolens_image_quality_warnings",
            "Image-quality warnings given, by model and code (blurred, underexposed, too_small, ...).",
            ["model", "code"],
            registry=self.registry,
        )
        self.memory_releases = Counter(
            "oncolens_memory_releases",
            "Times the idle server gave ONNX Runtime's unused working memory back to the system.",
            registry=self.registry,
        )
        self.resident_memory = Gauge(
            "oncolens_resident_memory_bytes",
            "Resident memory (RSS) of the server process, as of its last scrape or of 15 s ago at most; "
            "under --workers N one series per worker (label pid): sum them for the server.",
            multiprocess_mode="liveall",
            registry=self.registry,
        )

    def record_memory(self) -> None:
        rss = resident_bytes()
        if rss is not None:
            self.resident_memory.set(rss)

    def record_case(self, result: CaseResult, inference_s: float) -> None:
        self.inference_seconds.labels(result.model_id).observe(inference_s)
        for image in result.images:
            assessment = image.assessment
            self.images.labels(result.model_id, assessment.risk_level).inc()
            if assessment.domain is not None and not assessment.domain["in_domain"]:
                self.out_of_domain.labels(result.model_id).inc()
            for issue in assessment.quality:
                self.quality_warnings.labels(result.model_id, issue["code"]).inc()


class MetricsMiddleware:
    """Counts every HTTP request once its status is known (pure ASGI: streaming is untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            template = route_template(scope)
            self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(time.perf_counter() - start)


def forget_this_process() -> None:
    """On a worker's shutdown in multiprocess mode: drop its live gauges (its resident memory)."""
    if os.environ.get(MULTIPROCESS_ENV):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def route_template(scope: Scope) -> str:
    """The matched route's path with each path parameter's value put back as ``{name}``."""
    if scope.get("route") is None:
        return "unmatched"
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    segments = []
    for segment in str(scope.get("path", "")).split("/"):
        name = params.get(segment)
        if name is None:
            stem, dot, suffix = segment.partition(".")
            name = params.get(stem)
            segment = f"{{{name}}}.{suffix}" if name and dot else segment
        else:
            segment = f"{{{name}}}"
        segments.append(segment)
    return "/".join(segments)


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    include_in_schema=True,
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "The metrics."}},
)
def metrics(request: Request) -> Response:
    request.app.state.metrics.record_memory()
    registry: CollectorRegistry = request.app.state.metrics.registry
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
