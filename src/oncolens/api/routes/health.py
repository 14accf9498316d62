"""Liveness and the state of what the server depends on, answered within a second whatever they do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from sqlalchemy import text
from sqlmodel import Session

from oncolens import __version__
from oncolens.api.schemas import HealthPublic
from oncolens.config import Settings
from oncolens.http.deps import ZooDep
from oncolens.http.errors import first_line
from oncolens.store.images import StoreError, free_mb

router = APIRouter(tags=["health"])

ANSWER_WITHIN_S = 0.5  # each probe's share of the one second health may take, with room for a loaded machine


@dataclass
class Probes:
    """One probe per dependency on threads of its own: a dependency that hangs keeps its own thread
    busy (and is reported as not answering) but never the request threads or the event loop."""

    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="health"))
    running: dict[str, tuple[float, Future[str]]] = field(default_factory=dict)

    async def check(self, name: str, probe: Callable[[], str]) -> str:
        started, future = self.running.get(name, (0.0, None))
        if future is None or future.done():
            started, future = time.monotonic(), self.executor.submit(_safely, probe)
            self.running[name] = (started, future)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), ANSWER_WITHIN_S)
        except TimeoutError:
            return f"not answering for {time.monotonic() - started:.0f} s"


def _safely(probe: Callable[[], str]) -> str:
    try:
        return probe()
    except StoreError as exc:
        return exc.detail
    except Exception as exc:
        return f"failing: {first_line(exc)[:200]}"


def _probes(request: Request) -> Probes:
    probes: Probes | None = getattr(request.app.state, "health_probes", None)
    if probes is None:
        probes = request.app.state.health_probes = Probes()
    return probes


@router.get("/health", response_model=HealthPublic)
async def health(request: Request, zoo: ZooDep) -> HealthPublic:
    """Liveness, the models this server has loaded, and its dependencies: ``status`` is ``degraded``
    and the failing one named when the database, the image store or the data folder's free space
    is not right. Answers within a second whatever they do."""
    settings: Settings = request.app.state.settings
    engine, store = request.app.state.engine, request.app.state.store

    def database() -> str:
        with Session(engine) as session:
            session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        return "ok"

    def image_store() -> str:
        store.check()
        return "ok"

    def disk() -> str:
        left = free_mb(settings.data_dir)
        if settings.min_free_mb and left < settings.min_free_mb:
            return f"{left:.0f} MB free, under ONCOLENS_MIN_FREE_MB={settings.min_free_mb}: new cases are refused"
        return "ok"

    probes = _probes(request)
    names = ("database", "image_store", "disk")
    answers = await asyncio.gather(
        *(probes.check(n, p) for n, p in zip(names, (database, image_store, disk), strict=True))
    )
    dependencies = dict(zip(names, answers, strict=True))
    status = "ok" if all(value == "ok" for value in answers) else "degraded"
    loaded = zoo.loaded_ids()
    return HealthPublic(
        status=status, version=__version__, models_loaded=len(loaded), models=zoo.ids(), dependencies=dependencies
    )
