"""The HTTP API, versioned under /api/v1 (OpenAPI at /docs), and the compat routes of the five apps
OncoLens replaces. ``install_api`` adds them to the app that ``oncolens.app.create_app`` builds."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

from oncolens.api.compat import include_compat
from oncolens.api.openapi import install_docs, install_openapi
from oncolens.api.routes import audit, auth, cases, health, models, predict, users, versions
from oncolens.config import Settings
from oncolens.http.metrics import router as metrics_router

API_PREFIX = "/api/v1"


def install_api(app: FastAPI, settings: Settings) -> None:
    """The /api/v1 routes, /metrics, the OpenAPI document and its offline docs, and (when enabled) the
    compat routes, which never shadow a route of the API."""
    app.include_router(metrics_router)
    install_openapi(app)
    install_docs(app)
    routers = (
        health.router,
        auth.router,
        users.router,
        models.router,
        versions.router,
        predict.router,
        cases.router,
        audit.router,
    )
    if settings.compat_enabled:
        own = {
            (method, API_PREFIX + route.path)
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute)
            for method in route.methods or ()
        }
        include_compat(app, settings, own)
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
