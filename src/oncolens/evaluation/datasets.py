"""Dataset manifests and the in-memory image tensors that training runs on.

A dataset directory holds ``manifest.csv`` (``file,label[,group_id][,split]`` plus any metadata
columns) and the image files it names. Splits are taken as given: the manifest keeps a patient's or
lesion's images together, and re-splitting here would leak them across train/val/test.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from oncolens.vision.decode import ImageDecodeError, decode_image
from oncolens.zoo.preprocess import InputSpec, model_pixels

SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Dataset files are the project's own, not a client's upload: the decoder's limits are set wide.
DATASET_MAX_BYTES = 512 * 1024 * 1024
DATASET_MAX_PIXELS = 400_000_000


class ManifestError(ValueError):
    """The manifest is missing, malformed, or names labels or files that do not exist."""


@dataclass(frozen=True)
class Sample:
    file: Path
    label: str
    split: str
    group_id: str
    metadata: dict[str, str] = field(default_factory=dict)


def read_manifest(dataset_dir: Path) -> list[Sample]:
    """Rows of ``dataset_dir/manifest.csv``; ``split`` is ``"all"`` when the column is absent."""
    path = dataset_dir / "manifest.csv"
    if not path.is_file():
        raise ManifestError(f"{path} not found: a dataset directory needs a manifest.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        missing = {"file", "label"} - columns
        if missing:
            raise ManifestError(f"{path} lacks column(s) {sorted(missing)}; found {sorted(columns)}")
        samples = []
        for line, row in enumerate(reader, start=2):
            if not row["file"] or not row["label"]:
                raise ManifestError(f"{path}:{line}: empty file or label")
            split = row.get("split") or "all"
            if "split" in columns and (split == "all" or not SPLIT_NAME.match(split)):
                raise ManifestError(
                    f"{path}:{line}: split {row.get('split') or ''!r} is not a split name "
                    "(letters, digits, _ . -; 'all' is reserved)"
                )
            extra = {k: v for k, v in row.items() if k not in {"file", "label", "split", "group_id"}}
            samples.append(
                Sample(
                    file=dataset_dir / row["file"],
                    label=row["label"],
                    split=split,
                    group_id=row.get("group_id") or row["file"],
                    metadata={k: v or "" for k, v in extra.items() if k},
                )
            )
    if not samples:
        raise ManifestError(f"{path} has no rows")
    return samples


def select_split(samples: list[Sample], split: str) -> list[Sample]:
    """Rows whose ``split`` is ``split``, whatever the name (``holdout``, ``site-b``); ``"all"`` keeps every row."""
    if split == "all":
        return list(samples)
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        found = sorted({s.split for s in samples})
        raise ManifestError(f"no rows in split {split!r}; the manifest has {found}")
    return chosen


def drop_labels(samples: list[Sample], labels: list[str]) -> tuple[list[Sample], int]:
    """The samples whose label is not in ``labels``, and how many were dropped."""
    leave_out = set(labels)
    kept = [s for s in samples if s.label not in leave_out]
    return kept, len(samples) - len(kept)


def class_counts(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {c: counts.get(c, 0) for c in classes}


def encode_labels(samples: list[Sample], classes: list[str]) -> np.ndarray:
    """[N] int64 class indices; a label outside ``classes`` is a ManifestError naming it."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({s.label for s in samples} - index.keys())
    if unknown:
        raise ManifestError(f"labels not known to the model: {unknown}; it knows {classes}")
    return np.array([index[s.label] for s in samples], dtype=np.int64)


def open_rgb(path: Path) -> Image.Image:
    """An image file through the serving decoder (``imaging.decode_image``: EXIF orientation, 16-bit
    scaling, alpha over black, DICOM), so training and evaluation see the pixels patients' images get."""
    try:
        return decode_image(path.read_bytes(), DATASET_MAX_BYTES, DATASET_MAX_PIXELS).image
    except ImageDecodeError as exc:
        raise ManifestError(f"cannot read image {path}: {exc}") from exc


def load_pixels(samples: list[Sample], spec: InputSpec) -> np.ndarray:
    """[N, size, size, 3] uint8, each image decoded and resized by the card's rule."""
    out = np.empty((len(samples), spec.size, spec.size, 3), dtype=np.uint8)
    for i, sample in enumerate(samples):
        try:
            out[i] = model_pixels(open_rgb(sample.file), spec)
        except OSError as exc:
            raise ManifestError(f"cannot read {sample.file}: {exc}") from exc
    return out
