"""Micro-batching of concurrent requests: one model call serves every image waiting for it.

Requests put their preprocessed images on a queue; one worker per model takes everything that is
waiting (up to ``max_batch`` images, waiting at most ``wait_ms`` for more), runs the ONNX session
on a dedicated thread (so the event loop never blocks) and hands each request its rows back.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from oncolens.zoo.package import ModelPackage

if TYPE_CHECKING:
    from oncolens.api.metrics import ServerMetrics


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
    ) -> None:
        self.package = package
        self.metrics = metrics
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

    async def _collect(self) -> list[_Job]:
        jobs = [await self._queue.get()]
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
        logits, features = self.package.run(batch, with_features=True, max_batch=self.max_batch)
        assert features is not None
        return logits, features
