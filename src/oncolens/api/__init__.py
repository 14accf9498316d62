"""The HTTP API: ``create_app()`` builds the FastAPI application (versioned under /api/v1)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from sqlmodel import Session

from oncolens import __version__
from oncolens.api.compat import include_compat
from oncolens.api.errors import install_error_handlers
from oncolens.api.metrics import MetricsMiddleware, ServerMetrics
from oncolens.api.metrics import router as metrics_router
from oncolens.api.routes import audit, auth, cases, health, models, predict, users
from oncolens.auth import load_or_create_secret
from oncolens.cases import CaseStore
from oncolens.config import Settings
from oncolens.db import make_engine, upgrade
from oncolens.zoo import BUILTIN_DIR, Zoo

API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None, zoo: Zoo | None = None) -> FastAPI:
    """Build the app; models are discovered now and (by default) loaded before the first request."""
    settings = settings or Settings()
    if zoo is None:
        dirs = [BUILTIN_DIR] + ([settings.extra_model_dir] if settings.extra_model_dir else [])
        zoo = Zoo(dirs, threads=settings.threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = time.perf_counter()
        upgrade(app.state.engine)
        with Session(app.state.engine) as session:
            app.state.store.sweep_orphans(session)
        if settings.preload_models:
            zoo.load_all()
        app.state.startup_s = time.perf_counter() - start
        yield
        for batcher in app.state.batchers.values():
            await batcher.stop()
        app.state.executor.shutdown(wait=False)
        app.state.engine.dispose()

    app = FastAPI(
        title="OncoLens API",
        version=__version__,
        description=(
            "Calibrated, explained cancer screening on medical images. **Decision support, not a "
            "diagnosis**: every result must be interpreted by a qualified clinician."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.zoo = zoo
    app.state.batchers = {}
    app.state.engine = make_engine(settings.resolved_database_url)
    app.state.secret = settings.secret_key or load_or_create_secret(settings.data_dir)
    app.state.store = CaseStore(settings.images_dir)
    # One thread runs the ONNX sessions; ONNX Runtime spreads each batch over the cores itself.
    app.state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.state.metrics = ServerMetrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(metrics_router)
    install_error_handlers(app)
    routers = (health.router, auth.router, users.router, models.router, predict.router, cases.router, audit.router)
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
    if settings.web_enabled:
        from oncolens.web.pages import install_web

        install_web(app)
    return app
