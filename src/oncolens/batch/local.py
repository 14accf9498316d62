"""Batch screening: one model over every image under a folder, one row per image, resumable.

Rows go to CSV or JSON Lines (by the output's suffix) and are flushed after every batch, so a run
that is stopped loses at most the batch in flight; running again with the same output skips the
files it already holds (a half-written last line is cut off first). A file that cannot be read as
an image gets a row with ``status=error`` and the reason, and the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from oncolens.config import Settings
from oncolens.decision import case_result, probability_columns
from oncolens.runtime.cpu import single_threaded_blas
from oncolens.vision.cam import explanation
from oncolens.vision.decode import ImageDecodeError, sniff_format
from oncolens.vision.prepare import PreparedImages, RawImage, prepare
from oncolens.zoo.package import ModelPackage

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


class BatchError(ValueError):
    """The output cannot be used (wrong suffix, or written by another model)."""


@dataclass
class BatchSummary:
    total: int = 0
    skipped: int = 0
    analysed: int = 0
    # files whose first bytes are no image format (README.md, manifest.csv): left out, not errors
    not_images: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.analysed / self.seconds if self.seconds > 0 else 0.0


def find_files(root: Path, exclude: list[Path]) -> list[Path]:
    """Every regular file under ``root`` (hidden ones and ``exclude`` left out), sorted."""
    skip = [p.resolve() for p in exclude]
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        resolved = path.resolve()
        if any(resolved == s or s in resolved.parents for s in skip):
            continue
        out.append(path)
    return out


def columns(package: ModelPackage) -> list[str]:
    fixed = ["file", "status", "error", "model_id", "model_version", "top_class", "confidence", "p_malignant"]
    checks = ["in_domain", "ood_score", "quality"]
    return [*fixed, "risk_level", "statement", *checks, *probability_columns(package.class_ids).values(), "heatmap"]


def _done_rows(out: Path, kind: str, package: ModelPackage) -> set[str]:
    """Files already in ``out``; a partial last line (an interrupted write) is removed first."""
    if not out.exists() or out.stat().st_size == 0:
        return set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
    text = data.decode("utf-8")
    if kind == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        header = text.splitlines()[0].split(",") if text else []
        if header and header != columns(package):
            raise BatchError(f"{out} has other columns (another model?); write to a new file")
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    other = {str(r["model_id"]) for r in rows if r.get("model_id")} - {package.id}
    if other:
        raise BatchError(f"{out} holds results of model {sorted(other)}, not {package.id}; write to a new file")
    return {csv_text(str(r["file"])) if kind == "csv" else str(r["file"]) for r in rows}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet will not run: one starting like a formula gets a leading apostrophe
    (numbers are left alone)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(value: str) -> str:
    """The text ``csv_cell`` was given back (for reading a results file to resume it)."""
    return value[1:] if value.startswith("'") and value[1:].startswith(FORMULA_START) else value


class _Writer:
    def __init__(self, out: Path, kind: str, package: ModelPackage) -> None:
        new = not out.exists() or out.stat().st_size == 0
        out.parent.mkdir(parents=True, exist_ok=True)
        self.kind, self.handle = kind, out.open("a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.handle, fieldnames=columns(package)) if kind == "csv" else None
        if self.csv is not None and new:
            self.csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.csv is not None:
            flat = {k: v for k, v in row.items() if k != "probabilities"}
            flat["quality"] = ";".join(issue["code"] for issue in row.get("quality", []))
            names = probability_columns(list(row.get("probabilities", {})))
            flat |= {names[c]: round(p, 6) for c, p in row.get("probabilities", {}).items()}
            self.csv.writerow({key: csv_cell(value) for key, value in flat.items()})
        else:
            self.handle.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.handle.flush()

    @property
    def file(self) -> TextIO:
        return self.handle


def looks_like_an_image(head: bytes) -> bool:
    """Whether a file's first bytes are an image format (the decoder's own sniffing; PDF is not)."""
    return sniff_format(head[:160]) not in (None, "PDF")


def _file_looks_like_an_image(path: Path) -> bool:
    """``looks_like_an_image`` on a file; one that cannot be read counts as an image, so its error is reported."""
    try:
        with path.open("rb") as f:
            return looks_like_an_image(f.read(160))
    except OSError:
        return True


def decode_bytes(data: bytes, name: str, package: ModelPackage, settings: Settings) -> PreparedImages | str:
    """One file's bytes through the API's own ``prepare``, or the reason it cannot be used.

    Only a display-size copy of the image waits for the heat-map: a batch of large scans stays small.
    """
    if len(data) > settings.max_image_bytes:
        return f"larger than the {settings.max_image_bytes:,}-byte limit"
    try:
        return prepare([RawImage(data, name)], package, settings)
    except ImageDecodeError as exc:
        return str(exc)


def _decode(path: Path, package: ModelPackage, settings: Settings) -> PreparedImages | str:
    try:
        if path.stat().st_size > settings.max_image_bytes:
            return f"larger than the {settings.max_image_bytes:,}-byte limit"
        return decode_bytes(path.read_bytes(), path.name, package, settings)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"


@dataclass
class Screened:
    """One file's row, and its heat-map overlay (PNG) when asked for."""

    row: dict[str, Any]
    overlay: bytes | None = None

    @property
    def failed(self) -> bool:
        return bool(self.row["status"] == "error")


def screen(
    package: ModelPackage,
    items: list[tuple[str, PreparedImages | str]],
    with_heatmaps: bool = False,
    max_batch: int | None = None,
) -> list[Screened]:
    """The rows of decoded files (name, decoded or the reason it failed), in order: one model call,
    in session runs of at most ``max_batch`` images."""
    good = [item for _, item in items if isinstance(item, PreparedImages)]
    logits, features = np.zeros((0, len(package.class_ids))), None
    if good:
        inputs = np.concatenate([d.inputs for d in good])
        logits, features = package.run(inputs, with_features=True, max_batch=max_batch)
    out, i = [], 0
    for name, item in items:
        base: dict[str, Any] = {"file": name, "model_id": package.id, "model_version": package.version}
        if isinstance(item, str):
            out.append(Screened(base | {"status": "error", "error": item}))
            continue
        image = item.decoded[0]
        size = (image.width, image.height)
        image_features = features[i : i + 1] if features is not None else None
        one = case_result(
            package, logits[i : i + 1].astype("float64"), [size], features=image_features, stats=item.stats
        )
        assessment = one.images[0].assessment
        domain = assessment.domain
        row = base | {
            "status": "ok",
            "error": "",
            "top_class": assessment.top_class,
            "confidence": round(assessment.confidence, 6),
            "p_malignant": round(assessment.p_malignant, 6),
            "risk_level": assessment.risk_level.value,
            "statement": assessment.statement,
            "in_domain": "" if domain is None else domain["in_domain"],
            "ood_score": "" if domain is None else round(domain["score"], 4),
            "quality": assessment.quality,
            "probabilities": assessment.probabilities,
            "heatmap": "",
        }
        overlay = None
        if with_heatmaps and features is not None:
            overlay = explanation(package, image.image, features[i], assessment.top_class, size).overlay_png
        out.append(Screened(row, overlay))
        i += 1
    return out


@dataclass
class Plan:
    """What a run will do: its output, the files left to screen, and the writer appending rows."""

    kind: str
    done: set[str]
    summary: BatchSummary


def plan(out: Path, package: ModelPackage, names: list[str]) -> Plan:
    """Check the output, read which of ``names`` it already holds (resume), start the summary."""
    kind = FORMATS.get(out.suffix.lower())
    if kind is None:
        raise BatchError(f"--out must end in .csv or .jsonl, got {out.name!r}")
    done = _done_rows(out, kind, package)
    left = [n for n in names if n not in done]
    return Plan(kind, done, BatchSummary(total=len(names), skipped=len(names) - len(left)))


class Results:
    """Appends screened rows to the output (heat-maps beside), keeping the summary's counts."""

    def __init__(self, out: Path, kind: str, package: ModelPackage, heatmaps: Path | None, summary: BatchSummary):
        self.writer, self.heatmaps, self.summary = _Writer(out, kind, package), heatmaps, summary

    def add(self, screened: Screened) -> None:
        row = screened.row
        if screened.failed:
            self.summary.errors.append((row["file"], row["error"]))
        else:
            self.summary.analysed += 1
            if self.heatmaps is not None and screened.overlay is not None:
                target = self.heatmaps / (row["file"] + ".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(screened.overlay)
                row["heatmap"] = str(target)
        self.writer.write(row)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.file.close()


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_batch(
    package: ModelPackage,
    root: Path,
    out: Path,
    heatmaps: Path | None = None,
    workers: int = 2,
    batch_size: int = 16,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
    started: Callable[[int], None] | None = None,
) -> BatchSummary:
    """Analyse every file under ``root`` not yet in ``out`` (this process: decoding threads, one session).

    ``started(n)`` is told how many files are left to do; ``progress(done, errors)`` is called after
    each batch with the files it handled and how many of them could not be read.
    """
    settings = settings or Settings()
    single_threaded_blas()
    if not root.is_dir():
        raise BatchError(f"{root} is not a folder")
    files = find_files(root, [out] + ([heatmaps] if heatmaps else []))
    names = {p: p.relative_to(root).as_posix() for p in files}
    run = plan(out, package, list(names.values()))
    todo = [p for p in files if names[p] not in run.done]
    run.summary.not_images = [names[p] for p in todo if not _file_looks_like_an_image(p)]
    todo = [p for p in todo if names[p] not in run.summary.not_images]
    if started is not None:
        started(len(todo))
    results = Results(out, run.kind, package, heatmaps, run.summary)
    max_batch = package.images_per_run(settings.batch_max)
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for chunk in _chunks(todo, batch_size):
                decoded = list(pool.map(lambda p: _decode(p, package, settings), chunk))
                screened = screen(
                    package,
                    [(names[p], d) for p, d in zip(chunk, decoded, strict=True)],
                    heatmaps is not None,
                    max_batch,
                )
                for one in screened:
                    results.add(one)
                results.flush()
                if progress is not None:
                    progress(len(chunk), sum(1 for one in screened if one.failed))
    finally:
        results.close()
        run.summary.seconds = time.perf_counter() - start
    return run.summary
