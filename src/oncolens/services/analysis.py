"""The one predict path every edge calls: decoded images -> model outputs -> calibrated case result."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import numpy as np

from oncolens import decision
from oncolens.config import Settings
from oncolens.decision import CaseResult
from oncolens.errors import InvalidInput
from oncolens.vision.decode import ImageTooLarge
from oncolens.vision.prepare import PreparedImages, RawImage, prepare
from oncolens.zoo import ModelPackage
from oncolens.zoo.preprocess import InputSpec


class Runner(Protocol):
    """Runs the model on a batch: the server's batcher, or the package itself (CLI)."""

    async def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class DirectRunner:
    """The package's own session, called on the current thread (CLI, tests)."""

    def __init__(self, model: ModelPackage, max_batch: int | None = None) -> None:
        self.model, self.max_batch = model, max_batch

    async def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.run_now(inputs)

    def run_now(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.model.run(inputs, with_features=True, max_batch=self.max_batch)
        assert features is not None  # asked for with_features
        return logits, features


@dataclass(frozen=True)
class Analysed:
    """A case result with what heat-maps need: the prepared images and their [N, K, h, w] features."""

    result: CaseResult
    prepared: PreparedImages
    features: np.ndarray
    result_spec: InputSpec | None = None  # the input the images were prepared for (the answering model's)


Recorder = Callable[[CaseResult, float], None]


def check_count(raw: list[RawImage], settings: Settings) -> None:
    """At least one image and no more than a request may hold (413)."""
    if not raw:
        raise InvalidInput("no image in the request")
    if len(raw) > settings.max_images_per_request:
        raise ImageTooLarge(f"{len(raw)} images sent; at most {settings.max_images_per_request} per request")


_decode_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, anyio.CapacityLimiter]] = (
    weakref.WeakKeyDictionary()
)


def _decode_limiter(threads: int) -> anyio.CapacityLimiter:
    """The running event loop's limit on decoding threads (one limiter per loop: tests run several)."""
    loop = asyncio.get_running_loop()
    entry = _decode_limiters.get(loop)
    if entry is None or entry[0] != threads:
        entry = (threads, anyio.CapacityLimiter(threads))
        _decode_limiters[loop] = entry
    return entry[1]


async def prepare_off_loop(raw: list[RawImage], model: ModelPackage, settings: Settings) -> PreparedImages:
    """``prepare`` on a worker thread, so the event loop stays free, with at most
    ``settings.resolved_decode_threads`` decoding at once: under 16 concurrent requests, a thread per
    request only fought the event loop and ONNX Runtime for the cores and the GIL (README, Performance)."""
    limiter = _decode_limiter(settings.resolved_decode_threads)
    return await anyio.to_thread.run_sync(prepare, raw, model, settings, limiter=limiter)


async def run_prepared(
    model: ModelPackage, runner: Runner, prepared: PreparedImages, record: Recorder | None = None
) -> Analysed:
    """Model outputs of already prepared images -> calibrated per-image and case results."""
    start = time.perf_counter()
    logits, features = await runner.run(prepared.inputs)
    return _analysed(model, prepared, logits, features, time.perf_counter() - start, record)


def case_result_of(
    model: ModelPackage,
    prepared: PreparedImages,
    logits: np.ndarray,
    features: np.ndarray | None,
    timings: dict[str, float] | None = None,
) -> CaseResult:
    """The case result of ``model``'s outputs on prepared images (the serving model's, or a shadow's)."""
    return decision.case_result(
        model,
        logits.astype("float64"),
        [(d.width, d.height) for d in prepared.decoded],
        prepared.filenames,
        timings or {},
        features=features,
        stats=prepared.stats or None,
    )


def _analysed(
    model: ModelPackage,
    prepared: PreparedImages,
    logits: np.ndarray,
    features: np.ndarray,
    inference_s: float,
    record: Recorder | None,
) -> Analysed:
    timings = {"decode": round(prepared.decode_ms, 2), "inference": round(inference_s * 1000, 2)}
    result = case_result_of(model, prepared, logits, features, timings)
    if record is not None:
        record(result, inference_s)
    return Analysed(result, prepared, features, model.input_spec)


async def analyse(
    model: ModelPackage, raw: list[RawImage], settings: Settings, runner: Runner, record: Recorder | None = None
) -> Analysed:
    """Decode and check the images (on a worker thread), run the model, build the case result."""
    check_count(raw, settings)
    prepared = await prepare_off_loop(raw, model, settings)
    return await run_prepared(model, runner, prepared, record)


def analyse_now(model: ModelPackage, raw: list[RawImage], settings: Settings) -> Analysed:
    """``analyse`` for a caller without an event loop (the CLI): the package's session, this thread."""
    check_count(raw, settings)
    prepared = prepare(raw, model, settings)
    # No event loop here: starting one (anyio.run) cost about 8 ms per call, most of it Python's
    # signal module formatting the repr of the loop's SIGINT handler, prepared images included.
    start = time.perf_counter()
    logits, features = DirectRunner(model, model.images_per_run(settings.batch_max)).run_now(prepared.inputs)
    return _analysed(model, prepared, logits, features, time.perf_counter() - start, None)
