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
    return Response(generate_latest(registry) + model_gauges(request), media_type=CONTENT_TYPE_LATEST)


MODEL_GAUGES_EVERY_S = 60.0  # the monitoring gauges read the database at most this often per process
MODEL_GAUGES = {
    "cases": ("oncolens_model_cases", "Cases of the model in the last 30 days."),
    "reviewed_cases": ("oncolens_model_reviewed_cases", "... of which reviewed with a reference class."),
    "sensitivity": ("oncolens_model_sensitivity", "Sensitivity of the answers on the reviewed cases, last 30 days."),
    "specificity": ("oncolens_model_specificity", "Specificity of the answers on the reviewed cases, last 30 days."),
    "auroc": ("oncolens_model_auroc", "AUROC of P(malignant) on the reviewed cases, last 30 days."),
    "out_of_domain_rate": ("oncolens_model_out_of_domain_rate", "Share of images out of domain, last 30 days."),
    "quality_warning_rate": ("oncolens_model_quality_warning_rate", "Share of images with a quality warning."),
    "psi": ("oncolens_model_drift_psi", "PSI of P(malignant), last 30 days, against the card's test distribution."),
    "ks_p": ("oncolens_model_drift_ks_p", "Kolmogorov-Smirnov p-value of the same comparison."),
    "drift": ("oncolens_model_drift_flag", "1 when the drift thresholds (ONCOLENS_DRIFT_*) are passed."),
    "performance": ("oncolens_model_performance_flag", "1 when sensitivity or AUROC fell past ONCOLENS_MONITOR_*."),
}


def model_gauges(request: Request) -> bytes:
    """The monitoring figures of every loaded model over the last 30 days (services.monitoring), read
    from the database every replica shares, at most once a minute per process."""
    from sqlmodel import Session

    from oncolens.services.monitoring import recent

    state = request.app.state
    cached = getattr(state, "model_gauges", None)
    if cached is not None and time.monotonic() - cached[0] < MODEL_GAUGES_EVERY_S:
        return bytes(cached[1])
    registry = CollectorRegistry()
    gauges = {key: Gauge(name, text, ["model"], registry=registry) for key, (name, text) in MODEL_GAUGES.items()}
    with Session(state.engine) as session:
        for model_id in state.zoo.loaded_ids():
            figures = recent(session, state.zoo.get(model_id).card, state.settings)
            values = figures | {
                "psi": figures["drift"]["psi"],
                "ks_p": figures["drift"]["ks_p"],
                "drift": float(figures["drift"]["flag"]),
                "performance": float(figures["performance"]["flag"]),
            }
            for key, gauge in gauges.items():
                value = values.get(key)
                gauge.labels(model_id).set(float("nan") if value is None else float(value))
    body = generate_latest(registry)
    state.model_gauges = (time.monotonic(), body)
    return body
