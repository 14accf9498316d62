"""Batch screening on Ray: files read by Ray Data, screened in actors that each hold one ONNX session.

The same rows as the local engine (``oncolens.batch.local``): the rows are built by the same ``screen``,
appended to the same output by the driver as they come back (in file order), and a run that is
stopped resumes from the rows already written. The source is a folder or ``s3://BUCKET/PREFIX``
(the ``ONCOLENS_S3_*`` settings say where and how to log in). The model package travels to the
actors with the job, so a cluster's nodes need OncoLens installed, not the model files; heat-maps
come back to the driver, which writes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oncolens.batch.local import (
    BatchError,
    BatchSummary,
    Results,
    Screened,
    decode_bytes,
    find_files,
    looks_like_an_image,
    plan,
    screen,
)
from oncolens.config import Settings
from oncolens.runtime.cpu import single_threaded_blas
from oncolens.store.images import parse_s3_url
from oncolens.zoo.package import ModelPackage

# The settings the actors take from the driver (no secret travels to the cluster): the decoder's
# limits and the most backbone passes in one model run.
LIMITS = (
    "max_image_bytes",
    "max_image_pixels",
    "max_images_per_request",
    "max_request_pixels",
    "max_request_bytes",
    "batch_max",
)
# CPUs a read task reserves: reading is I/O, and the actors must leave room for it.
READ_CPUS = 0.25


@dataclass
class Source:
    """Files to screen: a pyarrow filesystem, the base path in it, and each file's name under the base."""

    filesystem: Any
    base: str
    names: list[str]

    def path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def name(self, path: str) -> str:
        return path[len(self.base) + 1 :]


def list_source(source: str, settings: Settings, exclude: list[Path]) -> Source:
    """The files under a folder or an ``s3://BUCKET/PREFIX`` (hidden ones left out), sorted."""
    from pyarrow import fs

    if not source.startswith("s3://"):
        root = Path(source)
        if not root.is_dir():
            raise BatchError(f"{root} is not a folder")
        names = [p.relative_to(root).as_posix() for p in find_files(root, exclude)]
        return Source(fs.LocalFileSystem(), root.resolve().as_posix(), names)
    try:
        bucket, prefix = parse_s3_url(source)
    except ValueError as exc:
        raise BatchError(str(exc)) from None
    filesystem = s3_filesystem(settings)
    base = f"{bucket}/{prefix}".rstrip("/")
    try:
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=False))
    except (OSError, FileNotFoundError) as exc:
        raise BatchError(f"cannot list {source}: {str(exc).splitlines()[0]}") from None
    names = sorted(
        info.path[len(base) + 1 :]
        for info in infos
        if info.type == fs.FileType.File and not any(p.startswith(".") for p in info.path[len(base) + 1 :].split("/"))
    )
    return Source(filesystem, base, names)


def s3_filesystem(settings: Settings) -> Any:
    """A pyarrow S3 filesystem for the ``ONCOLENS_S3_*`` settings."""
    from pyarrow import fs

    kwargs: dict[str, Any] = {"region": settings.s3_region}
    if settings.s3_access_key_id:
        kwargs["access_key"] = settings.s3_access_key_id
    if settings.s3_secret_access_key:
        kwargs["secret_key"] = settings.s3_secret_access_key.get_secret_value()
    if settings.s3_endpoint_url:
        scheme, _, host = settings.s3_endpoint_url.partition("://")
        kwargs |= {"endpoint_override": host.rstrip("/"), "scheme": scheme}
    return fs.S3FileSystem(**kwargs)


class Screener:
    """A Ray actor: one model package, one ONNX session; a batch of (path, bytes) in, rows out."""

    def __init__(self, files: Any, limits: dict[str, int], base: str, heatmaps: bool, threads: int) -> None:
        import ray

        folder = Path(tempfile.mkdtemp(prefix="oncolens-ray-package-"))
        for name, data in ray.get(files).items():  # the package, put once in the object store
            (folder / name).write_bytes(data)
        self.package = ModelPackage.load(folder, threads=threads)
        single_threaded_blas()
        # decoding (PIL releases the GIL) overlaps on as many threads as the actor has CPUs
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.settings = Settings(**limits)  # type: ignore[arg-type]
        self.source = Source(None, base, [])
        self.heatmaps = heatmaps
        self.max_batch = self.package.images_per_run(self.settings.batch_max)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [self.source.name(str(p)) for p in batch["path"]]
        images = [looks_like_an_image(bytes(data[:160])) for data in batch["bytes"]]
        wanted = [(name, bytes(data)) for name, data, image in zip(names, batch["bytes"], images, strict=True) if image]
        decoded = self.pool.map(lambda item: decode_bytes(item[1], item[0], self.package, self.settings), wanted)
        items = [(name, one) for (name, _), one in zip(wanted, decoded, strict=True)]
        screened = iter(screen(self.package, items, self.heatmaps, self.max_batch))
        rows, overlays = [], []
        for image in images:
            one = next(screened) if image else None
            rows.append("" if one is None else json.dumps(one.row))
            overlays.append(b"" if one is None or one.overlay is None else one.overlay)
        return {
            "file": np.array(names, dtype=object),
            "row": np.array(rows, dtype=object),
            "overlay": np.array(overlays, dtype=object),
        }


def package_files(package: ModelPackage) -> dict[str, bytes]:
    """The files a package loads from (card, ONNX model, domain model), to ship to the actors."""
    return {p.name: p.read_bytes() for p in sorted(package.directory.iterdir()) if p.is_file()}


def run_batch_ray(
    package: ModelPackage,
    source: str,
    out: Path,
    heatmaps: Path | None = None,
    batch_size: int = 16,
    settings: Settings | None = None,
    address: str | None = None,
    actors: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    started: Callable[[int], None] | None = None,
) -> BatchSummary:
    """Screen every file of ``source`` not yet in ``out`` on a Ray cluster.

    Uses the Ray session this process already has, else joins ``address`` (``auto``, ``ray://...``)
    or, with none, starts a local one. ``actors`` (default one per CPU of the cluster, less the
    share reading needs) each hold one ONNX session.
    """
    # Ray Data reports every execution on the console; the run's own progress bar says enough.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    settings = settings or Settings()
    found = list_source(source, settings, [out] + ([heatmaps] if heatmaps else []))
    run = plan(out, package, found.names)
    todo = [n for n in found.names if n not in run.done]
    if started is not None:
        started(len(todo))
    results = Results(out, run.kind, package, heatmaps, run.summary)
    start = time.perf_counter()
    ours = not ray.is_initialized()
    try:
        if not todo:
            return run.summary
        if ours:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        files = ray.put(package_files(package))  # held here until the run ends, so the actors can load it
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows in file order, as the local engine writes them
        context.enable_progress_bars = False
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        count = actors or max(1, int(cpus - READ_CPUS * 2))
        per_actor = max(0.1, (cpus - READ_CPUS * 2) / count)
        dataset = ray.data.read_binary_files(
            [found.path(n) for n in todo], include_paths=True, filesystem=found.filesystem, num_cpus=READ_CPUS
        ).map_batches(
            Screener,
            fn_constructor_kwargs={
                "files": files,
                "limits": {name: getattr(settings, name) for name in LIMITS},
                "base": found.base,
                "heatmaps": heatmaps is not None,
                "threads": max(1, math.ceil(per_actor)),
            },
            batch_size=batch_size,
            concurrency=count,
            num_cpus=per_actor,
            batch_format="numpy",
        )
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            failed = 0
            for name, row, overlay in zip(batch["file"], batch["row"], batch["overlay"], strict=True):
                if not row:
                    run.summary.not_images.append(str(name))
                    continue
                one = Screened(json.loads(row), bytes(overlay) or None)
                failed += one.failed
                results.add(one)
            results.flush()
            if progress is not None:
                progress(len(batch["file"]), failed)
    finally:
        results.close()
        run.summary.seconds = time.perf_counter() - start
        if ours and ray.is_initialized():
            ray.shutdown()
    return run.summary
