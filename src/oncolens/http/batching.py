"""Micro-batching of concurrent requests: one model call serves every image waiting for it.

Requests put their preprocessed images on a queue; one worker per model takes everything that is
waiting (up to ``max_batch`` images, waiting at most ``wait_ms`` for more), runs the ONNX session
on a dedicated thread (so the event loop never blocks) and hands each request its rows back.
Once the server has been idle for a while after a batch of several images, one of them gives the
shared ONNX Runtime arena's unused memory back to the system (``IdleRelease``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from oncolens.runtime.memory import trim_heaps
from oncolens.zoo.package import ModelPackage

if TYPE_CHECKING:
    from oncolens.http.metrics import ServerMetrics

log = logging.getLogger(__name__)


class IdleRelease:
    """When the arena's unused memory goes back to the system: once no model has run for ``idle_s``.

    The shared arena keeps what the largest batch of any model needed, so a burst of traffic leaves
    the server holding twice its loaded size or more. Only a run of more than one image can have grown
    it past what single images need, so only such a run arms the release; one-image traffic never
    pays for mapping memory again. Shared by every batcher of a process (the arena is the process's),
    its methods are called on the thread that runs the sessions. ``idle_s`` 0 never releases.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._last_run = time.monotonic()
        self._armed = False

    def ran(self, images: int) -> None:
        with self._lock:
            self._last_run = time.monotonic()
            self._armed = self._armed or images > 1

    def due_in(self) -> float | None:
        """Seconds until a release is due; None when there is nothing to release."""
        with self._lock:
            if not self._armed or self.idle_s <= 0:
                return None
            return max(0.0, self._last_run + self.idle_s - time.monotonic())

    def release_if_idle(self, package: ModelPackage) -> bool:
        """Release now if still due (another batcher may have run or released meanwhile)."""
        with self._lock:
            if not self._armed or self.idle_s <= 0 or time.monotonic() - self._last_run < self.idle_s:
                return False
            self._armed = False
        package.release_memory()
        trim_heaps()
        return True


@dataclass
class _Job:
    inputs: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, np.ndarray]]


class InferenceBatcher:
    """Batches ``run`` calls for one model; start it inside the event loop that will use it."""

    def __init__(
        self,
        package: ModelPackage,
        executor: Executor,
        max_batch: int,
        wait_ms: float,
        metrics: ServerMetrics | None = None,
        release: IdleRelease | None = None,
    ) -> None:
        self.package = package
        self.metrics = metrics
        self.release = release
        self.executor = executor
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.package.id}")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n, 3, S, S] preprocessed images -> (logits [n, C], features [n, K, h, w])."""
        self.start()
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(inputs, future))
        return await future

    async def _next_job(self) -> _Job:
        """The next request's job; while none comes, the idle release when it falls due."""
        loop = asyncio.get_running_loop()
        while True:
            due = self.release.due_in() if self.release is not None else None
            if due is None:
                return await self._queue.get()
            try:
                return await asyncio.wait_for(self._queue.get(), due)
            except TimeoutError:
                assert self.release is not None
                try:
                    released = await loop.run_in_executor(self.executor, self.release.release_if_idle, self.package)
                except Exception:  # never worth a request: log it and serve on
                    log.exception("releasing ONNX Runtime's unused memory failed")
                    continue
                if released and self.metrics is not None:
                    self.metrics.memory_releases.inc()

    async def _collect(self) -> list[_Job]:
        jobs = [await self._next_job()]
        count = len(jobs[0].inputs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while count < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            jobs.append(job)
            count += len(job.inputs)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            batch = np.concatenate([job.inputs for job in jobs])
            try:
                logits, features = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as exc:  # the session failed: every waiting request gets the error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                end = start + len(job.inputs)
                if not job.future.done():
                    job.future.set_result((logits[start:end], features[start:end]))
                start = end

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            logits, features = self.package.run(batch, with_features=True, max_batch=self.max_batch)
        finally:
            if self.release is not None:
                self.release.ran(len(batch))
        assert features is not None
        return logits, features
