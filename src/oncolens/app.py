"""The ASGI application: ``create_app()`` builds one FastAPI app from the HTTP API (``api``), the web
pages (``web``) and the middleware, state and background tasks they share. It sits above both edges,
so neither installs the other."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlmodel import Session

from oncolens import __version__
from oncolens.accounts.auth import server_secret
from oncolens.accounts.mail import Mailer
from oncolens.api import install_api
from oncolens.api.compat.skin7 import sweep_uploads
from oncolens.config import Settings
from oncolens.http.batching import IdleRelease
from oncolens.http.errors import install_error_handlers
from oncolens.http.metrics import MetricsMiddleware, ServerMetrics, forget_this_process
from oncolens.http.middleware import BodySizeLimit, SecurityHeaders, redact_access_log
from oncolens.runtime.cpu import single_threaded_blas
from oncolens.runtime.memory import return_large_allocations
from oncolens.services import mailqueue
from oncolens.services.audit import deferred_audit
from oncolens.services.versions import VersionSync
from oncolens.store.db import make_engine, upgrade
from oncolens.store.images import StoreError, open_store
from oncolens.zoo import Zoo

log = logging.getLogger("oncolens.app")
MEMORY_GAUGE_EVERY_S = 15.0  # how often the resident-memory gauge is read


def create_app(settings: Settings | None = None, zoo: Zoo | None = None) -> FastAPI:
    """Build the app; models are discovered now and (by default) loaded before the first request."""
    settings = settings or Settings()
    return_large_allocations()
    single_threaded_blas()
    redact_access_log()
    if zoo is None:
        zoo = Zoo.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = time.perf_counter()
        upgrade(app.state.engine)
        try:
            sweep_stored_files(app)
        except StoreError as exc:  # the store is down for now: serve what does not need it, sweep later
            log.error("the start-up sweep of stored files failed: %s", exc.detail)
        try:
            app.state.versions.run()  # an installed version promoted earlier serves from the first request
        except Exception:  # the database briefly down: the shipped packages serve until the next round
            log.exception("reading the models' serving states failed")
        if settings.preload_models:
            zoo.load_all()
        app.state.startup_s = time.perf_counter() - start
        sweeper = asyncio.create_task(periodic_sweep(app, settings.orphan_sweep_minutes * 60))
        queues = asyncio.create_task(periodic_queues(app, settings.mail_poll_s))
        memory_gauge = asyncio.create_task(periodic_memory_gauge(app.state.metrics, MEMORY_GAUGE_EVERY_S))
        versions = asyncio.create_task(periodic_versions(app.state.versions, settings.model_poll_s))
        yield
        versions.cancel()
        sweeper.cancel()
        queues.cancel()
        memory_gauge.cancel()
        forget_this_process()
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
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.zoo = zoo
    app.state.batchers = {}
    app.state.retired_batchers = set()
    app.state.engine = make_engine(settings.resolved_database_url)
    app.state.versions = VersionSync(app.state.engine, zoo, settings.data_dir / "models")
    app.state.secret = server_secret(settings.secret_key, settings.data_dir, settings.on_sqlite)
    app.state.store = open_store(settings)
    app.state.mailer = Mailer(settings)
    # One thread runs the ONNX sessions; ONNX Runtime spreads each batch over the cores itself.
    app.state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
    app.state.idle_release = IdleRelease(settings.release_memory_idle_s)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.state.metrics = ServerMetrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    install_error_handlers(app)
    install_api(app, settings)
    if settings.web_enabled:
        from oncolens.web.pages import install_web

        install_web(app)
    return app


def sweep_stored_files(app: FastAPI) -> None:
    """Remove case files no row refers to (a crash between write and commit) and expired compat uploads."""
    settings: Settings = app.state.settings
    with Session(app.state.engine) as session:
        removed = app.state.store.sweep_orphans(session)
    expired = sweep_uploads(settings.data_dir, settings.compat_upload_keep_minutes)
    if removed or expired:
        log.info("swept %d orphaned case file(s) and %d expired compat upload(s)", removed, expired)


async def periodic_versions(sync: VersionSync, every_s: float) -> None:
    """Serve a promotion, a rollback or a shadow change made anywhere (CLI, API, another replica)
    within ``every_s`` seconds: one cheap query per round, the packages loaded only when a state changed."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await anyio.to_thread.run_sync(sync.run)
        except Exception:  # the database briefly down: the models keep serving what they served
            log.exception("reading the models' serving states failed")


async def periodic_memory_gauge(metrics: ServerMetrics, every_s: float) -> None:
    """Keep the resident-memory gauge fresh (under several workers, each keeps its own series)."""
    while True:
        metrics.record_memory()
        await asyncio.sleep(every_s)


async def periodic_queues(app: FastAPI, every_s: float) -> None:
    """Every ``every_s`` seconds: send the e-mail that requests queued (never inside a request, and not
    when a letter arrives, so no answer's timing tells whether it queued one), and write the audit
    events of reads that a full disk could not take, once it can."""
    mailer: Mailer = app.state.mailer
    while True:
        await asyncio.sleep(every_s)
        try:
            if mailer.settings.mail_configured:
                await anyio.to_thread.run_sync(mailqueue.drain, app.state.engine, mailer)
            if len(deferred_audit):
                await anyio.to_thread.run_sync(deferred_audit.flush, app.state.engine)
        except Exception:  # the database briefly down: the letters and events wait for the next round
            log.exception("sending queued e-mail or writing deferred audit events failed")


async def periodic_sweep(app: FastAPI, every_s: float) -> None:
    """Run the sweep every ``every_s`` seconds while the server runs (not only at start-up)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await anyio.to_thread.run_sync(sweep_stored_files, app)
        except Exception:  # a failed sweep (e.g. the database briefly down) is retried next round
            log.exception("the periodic sweep of stored files failed")
