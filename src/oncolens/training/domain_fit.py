"""Fit a package's out-of-domain model and quality limits from its dataset, and measure them.

Used by ``oncolens fit-domain`` (packages already shipped get it without retraining) and by the
training pipeline. The distance model is fitted on the model's own train split, the other-domain detector on its own
train split against the other datasets' train and val splits; the thresholds are chosen on its own
val split (and its train images out of fold); test splits are scored once, for the card.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from oncolens.evaluation.datasets import (
    ManifestError,
    Sample,
    drop_labels,
    encode_labels,
    open_rgb,
    read_manifest,
    select_split,
)
from oncolens.vision.decode import WrongModality
from oncolens.vision.domain import (
    DEFAULT_DIMS,
    DEFAULT_PASS_RATE,
    DOMAIN_FILE,
    DomainFitError,
    DomainModel,
    LinearDetector,
    QualityLimits,
    pooled,
    quality_stats,
    root_features,
    threshold_for,
)
from oncolens.vision.prepare import check_modality
from oncolens.zoo.card import parse_card
from oncolens.zoo.package import CARD, ModelPackage, sha256_of
from oncolens.zoo.preprocess import model_pixels, normalize

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}


@dataclass
class Extracted:
    """Per image: pooled features [N, K], quality stats, original min side; refused images counted."""

    features: np.ndarray
    stats: dict[str, np.ndarray]
    min_sides: np.ndarray
    refused: int = 0

    @property
    def n(self) -> int:
        return len(self.features) + self.refused


def extract(package: ModelPackage, files: Iterable[Path], batch: int = 32, check: bool = False) -> Extracted:
    """Run ``package`` over image files; with ``check``, an image of the wrong modality (or one that cannot
    be decoded) is counted as refused instead of scored, as serving refuses it."""
    spec = package.input_spec
    feats: list[np.ndarray] = []
    pixels: list[np.ndarray] = []
    sides: list[int] = []
    refused = 0
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            block = np.stack(pending)
            _, features = package.run(normalize(block, spec), with_features=True)
            assert features is not None
            feats.append(pooled(features))
            pixels.append(block)
            pending.clear()

    for path in files:
        try:
            image = open_rgb(path)  # the serving decoder, with the dataset limits
            if check:
                check_modality(image, package)
        except (ManifestError, WrongModality):
            if not check:
                raise
            refused += 1
            continue
        sides.append(min(image.size))
        pending.append(model_pixels(image, spec))
        if len(pending) == batch:
            flush()
    flush()
    k = int(package.head_weight.shape[1])
    all_pixels = np.concatenate(pixels) if pixels else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    return Extracted(
        np.concatenate(feats) if feats else np.zeros((0, k)),
        quality_stats(all_pixels) if len(all_pixels) else {},
        np.asarray(sides),
        refused,
    )


def _files(samples: list[Sample]) -> list[Path]:
    return [s.file for s in samples]


def _split(dataset: Path, split: str) -> list[Sample]:
    return select_split(read_manifest(dataset), split)


def flagged_share(model: DomainModel, data: Extracted) -> float:
    """Share of images flagged: refused by the modality check, or scored out of domain (score > 1)."""
    if data.n == 0:
        return float("nan")
    above = int((model.score(data.features) > 1.0).sum()) if len(data.features) else 0
    return (above + data.refused) / data.n


def _balanced_pass(passed: np.ndarray, labels: np.ndarray) -> float:
    """The mean over classes of each class's passing share (a rare class counts as much as a common one)."""
    return float(np.mean([passed[labels == c].mean() for c in np.unique(labels)]))


def _thresholds(
    distance: np.ndarray, other: np.ndarray, labels: np.ndarray, pass_rate: float
) -> tuple[float, float, float]:
    """(distance threshold, P(other) threshold, class-balanced share passing both): the two thresholds at
    the same quantile of the in-domain scores, the lowest from 0.975 up at which both together pass
    ``pass_rate`` of every class on average."""
    for quantile in [*np.arange(0.975, 1.0, 0.0025).tolist(), 1.0]:
        t_distance, t_other = threshold_for(distance, quantile), threshold_for(other, quantile)
        passed = _balanced_pass((distance <= t_distance) & (other <= t_other), labels)
        if passed >= pass_rate:
            return t_distance, max(t_other, 1e-6), passed
    return float(distance.max()), max(float(other.max()), 1e-6), 1.0


@dataclass(frozen=True)
class DomainFit:
    model: DomainModel
    quality: QualityLimits
    card_section: dict[str, Any]


def _other_images(package: ModelPackage, others: list[Path], per_dataset: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of up to ``per_dataset`` train and val images of each other dataset (those the
    modality check lets through: the ones the model would otherwise answer for), and which dataset each
    is from. Their test splits stay unseen, to measure the detector on."""
    blocks, sources = [], []
    for index, path in enumerate(others):
        files = _files(_split(path, "train") + _split(path, "val"))
        step = max(1, len(files) // per_dataset)
        features = extract(package, files[::step][:per_dataset], check=True).features
        blocks.append(features)
        sources.append(np.full(len(features), index))
    k = int(package.head_weight.shape[1])
    if not blocks:
        return np.zeros((0, k)), np.zeros(0, dtype=np.int64)
    return np.concatenate(blocks), np.concatenate(sources)


def _method(dims: int, others: list[Path], detector: bool) -> str:
    known = (
        f" and a linear detector of {len(others)} known other domains (train and val images of "
        + ", ".join(p.name for p in others)
        + ")"
        if detector
        else " (no other-domain detector: no other datasets were given)"
    )
    return (
        "pooled, square-rooted last feature map: Mahalanobis distance to the nearest class centre of the train "
        f"images (shared probabilistic-PCA covariance, top {dims} directions + one residual variance){known}; "
        "score = the larger ratio "
        "of each test to its threshold, out of domain above 1"
    )


def _fit_model(own: np.ndarray, labels: np.ndarray, other: np.ndarray, sources: np.ndarray, dims: int) -> DomainModel:
    model = DomainModel.fit(own, dims, labels)
    if not len(other):
        return model
    x = root_features(np.concatenate([own, other]))
    y = np.r_[np.zeros(len(own)), np.ones(len(other))]
    return replace(model, other=LinearDetector.fit(x, y, np.r_[labels, sources]))


def _out_of_fold(
    own: np.ndarray, labels: np.ndarray, other: np.ndarray, sources: np.ndarray, dims: int, folds: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Distance and P(other) of every own train image from a model fitted on the other folds."""
    order = np.random.default_rng(0).permutation(len(own))
    distance, other_p = np.zeros(len(own)), np.zeros(len(own))
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        model = _fit_model(own[rest], labels[rest], other, sources, dims)
        distance[fold], other_p[fold] = model.distance(own[fold]), model.other_probability(own[fold])
    return distance, other_p


def fit_domain(
    package: ModelPackage,
    samples: list[Sample],
    others: list[Path],
    natural: Path | None = None,
    pass_rate: float = DEFAULT_PASS_RATE,
    per_other: int = 2000,
    log: Any = print,
) -> DomainFit:
    """Fit on the train splits (own, and up to ``per_other`` images of each other dataset), choose the
    thresholds on the own val split, measure on the test splits."""
    start = time.perf_counter()
    samples, _ = drop_labels(samples, list(package.card.dataset.excluded_labels))
    train_samples = select_split(samples, "train")
    train = extract(package, _files(train_samples))
    labels = encode_labels(train_samples, package.class_ids)
    val_samples = select_split(samples, "val")
    val = extract(package, _files(val_samples))
    log(f"{package.id}: features of {train.n} train and {val.n} val images")
    if len(val.features) < 5:
        raise DomainFitError(f"{len(val.features)} val images are too few to choose a threshold (need at least 5)")
    dims = min(DEFAULT_DIMS, max(1, len(train.features) // 3))
    other_train, sources = _other_images(package, others, per_other)
    model = _fit_model(train.features, labels, other_train, sources, dims)
    if model.other is not None:
        log(f"  other-domain detector: {len(train.features)} own, {len(other_train)} other train + val images")
    # Thresholds from val and from out-of-fold scores of the train images (each scored by a model fitted
    # without it): several hundred in-domain scores instead of val's few dozen.
    oof_distance, oof_other = _out_of_fold(train.features, labels, other_train, sources, dims)
    distance = np.r_[oof_distance, model.distance(val.features)]
    other_p = np.r_[oof_other, model.other_probability(val.features)]
    in_domain_labels = np.r_[labels, encode_labels(val_samples, package.class_ids)]
    t_distance, t_other, _ = _thresholds(distance, other_p, in_domain_labels, pass_rate)
    model = replace(model, distance_threshold=t_distance, other_threshold=t_other)
    passed = float((model.score(val.features) <= 1.0).mean())
    own_test = extract(package, _files(select_split(samples, "test")))
    flagged: dict[str, Any] = {"own_test": flagged_share(model, own_test), "own_test_n": own_test.n}
    others_test = {}
    for path in others:
        data = extract(package, _files(_split(path, "test")), check=True)
        others_test[path.name] = {"flagged": flagged_share(model, data), "n": data.n, "refused": data.refused}
    flagged["other_datasets_test"] = others_test
    if natural is not None:
        files = sorted(p for p in natural.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        data = extract(package, files, check=True)
        flagged["natural_photos"] = {"flagged": flagged_share(model, data), "n": data.n, "refused": data.refused}
    dims = int(model.components.shape[0])
    section = {
        "method": _method(dims, others, model.other is not None),
        "file": DOMAIN_FILE,
        "dims": dims,
        "threshold": 1.0,
        "distance_threshold": t_distance,
        "other_threshold": t_other if model.other is not None else None,
        "threshold_chosen_on": "own in-domain scores (val, and the train images out of fold, 5 folds): both at the "
        f"lowest quantile from 97.5% that passes {pass_rate:.0%} of every class on average (class-balanced)",
        "val_pass_rate": passed,
        "fitted_on": {"own_train": train.n, "other_train": len(other_train)},
        "flagged": flagged,
        "fit_seconds": round(time.perf_counter() - start, 1),
    }
    min_side = int(min(package.input_spec.size, np.percentile(train.min_sides, 1)))
    return DomainFit(model, QualityLimits.fit(train.stats, min_side), section)


def install_domain(package_dir: Path, fit: DomainFit) -> None:
    """Write ``domain.npz`` and the card's ``domain`` and ``quality`` sections (the ONNX is untouched)."""
    card_path = package_dir / CARD
    data = json.loads(card_path.read_text(encoding="utf-8"))
    data["domain"] = fit.card_section
    data["quality"] = fit.quality.to_dict()
    fit.model.save(package_dir / DOMAIN_FILE)
    data["domain"]["sha256"] = sha256_of(package_dir / DOMAIN_FILE)
    parse_card(data, str(card_path))  # refuse to write a card that would not load
    card_path.write_text(json.dumps(data, indent=2) + "\n")


def other_domains(datasets_root: Path, model_id: str, organ_of: dict[str, str]) -> list[Path]:
    """The datasets of another organ or modality than ``model_id``'s (folders named by model id)."""
    mine = organ_of.get(model_id)
    found = [p for p in sorted(datasets_root.iterdir()) if (p / "manifest.csv").is_file()]
    if not found:
        raise ManifestError(f"no dataset folders with a manifest.csv under {datasets_root}")
    return [p for p in found if p.name != model_id and organ_of.get(p.name) != mine]
