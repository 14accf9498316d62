"""Knowing when not to answer: an out-of-domain score and image-quality checks (NumPy only).

Out of domain: the model's own last feature map, average-pooled to [K] and square-rooted (the
activations are non-negative and heavy-tailed; the root evens them out and separated other
ultrasound organs better than raw or L2-normalised features, or a k-nearest-neighbour distance),
goes through two tests (``DomainModel``): its Mahalanobis distance to the nearest class centre of
the training images' features, under a shared probabilistic-PCA covariance (the top ``d`` principal
directions with their own variances, one shared variance for the rest: a shrunk covariance that 1280
dimensions and a few hundred images can estimate; one centre per class, so that rare classes such as
vascular lesions are not flagged for being rare), catches images unlike anything the model has
seen; a linear detector of the known other domains (the other datasets' images, seen through this
model's features) catches those that the distance alone lets through. Thresholds are chosen on the
model's own in-domain images (val, and train out of fold) so that at least 95% of every class, on
average, pass both. The fitted model lives in the package as ``domain.npz`` (~0.3 MB).

Quality: blur (variance of the Laplacian), darkness, brightness and clipping, all measured on the
model's own input pixels (the resized image the model sees) against the training images'
distribution, plus an image smaller than the model's input size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DOMAIN_FILE = "domain.npz"
DEFAULT_DIMS = 64
DEFAULT_PASS_RATE = 0.95  # share of val images that must pass the threshold


class DomainFitError(ValueError):
    """The features cannot support a domain model (too few images)."""


def pooled(features: np.ndarray) -> np.ndarray:
    """[N, K, h, w] feature maps -> [N, K] float64 global averages (what the linear head reads)."""
    averaged: np.ndarray = np.asarray(features, dtype=np.float64).mean(axis=(2, 3))
    return averaged


@dataclass(frozen=True)
class DomainModel:
    """Two tests over the pooled, square-rooted features; an image passes when it passes both.

    1. Distance: a Gaussian with a probabilistic-PCA covariance; the squared Mahalanobis distance / K
       must stay under ``distance_threshold`` (an image unlike anything the model has seen).
    2. Known other domains (optional): a linear classifier of this model's own images against the
       other datasets' images (other organs and modalities), seen through this model's features;
       P(other domain) must stay under ``other_threshold``.

    ``score`` reports the larger of the two ratios to their thresholds: in domain when <= 1.
    """

    mean: np.ndarray  # [C, K] one centre per class (the distance is to the nearest), or [1, K]
    components: np.ndarray  # [d, K] orthonormal rows
    variances: np.ndarray  # [d]
    residual_variance: float
    distance_threshold: float = float("inf")
    other: LinearDetector | None = None
    other_threshold: float = 1.0

    @classmethod
    def fit(cls, train: np.ndarray, dims: int = DEFAULT_DIMS, labels: np.ndarray | None = None) -> DomainModel:
        """Fit the distance on [N, K] pooled training features (``dims`` is capped at N - 2).

        With [N] class ``labels``, each class gets its own centre and the covariance is shared (fitted on
        the features less their class centre): a rare class is not far from "the" centre just for being rare.
        """
        train = root_features(train)
        n, k = train.shape
        if n < 10:
            raise DomainFitError(f"{n} training images are too few to fit a domain model (need at least 10)")
        d = max(1, min(dims, n - 2, k - 1))
        if labels is None:
            labels = np.zeros(n, dtype=np.int64)
        classes = np.unique(labels)
        mean = np.stack([train[labels == c].mean(axis=0) for c in classes])
        centred = train - mean[np.searchsorted(classes, labels)]
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        eigen = singular**2 / (n - 1)
        rest = eigen[d:]
        # The variance left outside the top d directions, spread over the remaining K - d dimensions.
        residual = float(rest.sum() / max(1, k - d)) if rest.size else float(eigen[-1])
        floor = max(residual, 1e-12)
        return cls(mean, vt[:d].copy(), np.maximum(eigen[:d], floor), floor)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """[N, K] pooled features -> [N] squared Mahalanobis distance to the nearest centre / K (≈ 1 in domain)."""
        rooted = root_features(features)
        out = np.empty(len(rooted))
        for start in range(0, len(rooted), 256):  # [chunk, C, K] stays small
            centred = rooted[start : start + 256, None, :] - self.mean[None, :, :]
            z = centred @ self.components.T
            inside = (z**2 / self.variances).sum(axis=2)
            residual = np.maximum((centred**2).sum(axis=2) - (z**2).sum(axis=2), 0.0) / self.residual_variance
            out[start : start + 256] = (inside + residual).min(axis=1) / self.mean.shape[1]
        return out

    def other_probability(self, features: np.ndarray) -> np.ndarray:
        """[N, K] pooled features -> [N] P(one of the known other domains); 0 without a detector."""
        if self.other is None:
            return np.zeros(len(features))
        return self.other.probability(root_features(features))

    def score(self, features: np.ndarray) -> np.ndarray:
        """[N, K] pooled features -> [N] max(distance / its threshold, P(other) / its threshold)."""
        ratio: np.ndarray = self.distance(features) / self.distance_threshold
        if self.other is not None:
            ratio = np.maximum(ratio, self.other_probability(features) / self.other_threshold)
        return ratio

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "variances": self.variances.astype(np.float64),
            "residual_variance": np.float64(self.residual_variance),
            "distance_threshold": np.float64(self.distance_threshold),
            "other_threshold": np.float64(self.other_threshold),
        }
        if self.other is not None:
            arrays |= {
                "other_centre": self.other.centre.astype(np.float32),
                "other_scale": self.other.scale.astype(np.float32),
                "other_weight": self.other.weight.astype(np.float32),
                "other_bias": np.float64(self.other.bias),
            }
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> DomainModel:
        with np.load(path) as data:
            mean = data["mean"].astype(np.float64)
            other = None
            if "other_weight" in data:
                other = LinearDetector(
                    data["other_centre"].astype(np.float64),
                    data["other_scale"].astype(np.float64),
                    data["other_weight"].astype(np.float64),
                    float(data["other_bias"]),
                )
            return cls(
                mean if mean.ndim == 2 else mean[None, :],
                data["components"].astype(np.float64),
                data["variances"].astype(np.float64),
                float(data["residual_variance"]),
                float(data["distance_threshold"]),
                other,
                float(data["other_threshold"]),
            )


@dataclass(frozen=True)
class LinearDetector:
    """Logistic regression on standardised features: P(label 1) = sigmoid(w . (x - centre) / scale + b)."""

    centre: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, l2: float = 0.05, steps: int = 600
    ) -> LinearDetector:
        """Fit on [N, K] features and [N] 0/1 labels, L2 penalty ``l2``. The two labels weigh the same;
        within a label every group (a class of the model, another dataset) weighs the same, so a rare
        class is not given up to the other side."""
        centre, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = (x - centre) / scale
        groups = np.zeros(len(y), dtype=np.int64) if groups is None else groups
        weights = np.zeros(len(y))
        for label in (0, 1):
            inside = y == label
            names = np.unique(groups[inside])
            for name in names:
                members = inside & (groups == name)
                weights[members] = 0.5 / len(names) / members.sum()
        w, b = np.zeros(z.shape[1]), 0.0
        m_w, v_w, m_b, v_b = np.zeros_like(w), np.zeros_like(w), 0.0, 0.0
        rate, beta1, beta2 = 0.05, 0.9, 0.999
        for step in range(1, steps + 1):  # Adam on the weighted log-loss (convex: any path reaches it)
            p = _sigmoid(z @ w + b)
            error = weights * (p - y)
            grad_w, grad_b = z.T @ error + l2 * w, float(error.sum())
            m_w, v_w = beta1 * m_w + (1 - beta1) * grad_w, beta2 * v_w + (1 - beta2) * grad_w**2
            m_b, v_b = beta1 * m_b + (1 - beta1) * grad_b, beta2 * v_b + (1 - beta2) * grad_b**2
            w -= rate * (m_w / (1 - beta1**step)) / (np.sqrt(v_w / (1 - beta2**step)) + 1e-8)
            b -= rate * (m_b / (1 - beta1**step)) / (np.sqrt(v_b / (1 - beta2**step)) + 1e-8)
        return cls(centre, scale, w, b)

    def probability(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(((x - self.centre) / self.scale) @ self.weight + self.bias)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(values, -60, 60)))
    return out


def root_features(features: np.ndarray) -> np.ndarray:
    rooted: np.ndarray = np.sqrt(np.maximum(np.asarray(features, dtype=np.float64), 0.0))
    return rooted


def threshold_for(scores: np.ndarray, pass_rate: float = DEFAULT_PASS_RATE) -> float:
    """The smallest score threshold under which at least ``pass_rate`` of ``scores`` fall (inclusive)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    index = min(len(ordered) - 1, int(np.ceil(pass_rate * len(ordered))) - 1)
    return float(ordered[max(index, 0)])


# Which test fired, for an image out of domain: "other_kind" when the detector of the known other
# kinds of image (other organs and modalities) is sure of it, P(other) >= OTHER_KIND_SURE; otherwise
# "unusual": an unusual image of the model's own kind (a dermoscope's vignette, blur, an odd crop).
# Measured (scripts/domain_reasons.py --every 5): of the cervical cells and oral photos the skin models
# read, 40 of 41 reach it; of their own flagged test images, skin-isic9's 15 of 15 and skin-ham10000's
# 35 of 38 stay below it.
OTHER_KIND_SURE = 0.9
OTHER_KIND = "other_kind"
UNUSUAL = "unusual"


@dataclass(frozen=True)
class DomainCheck:
    """Whether an image looks like the model's training images and, when not, which test said so."""

    in_domain: bool
    score: float
    threshold: float
    reason: str = ""  # "" in domain; OTHER_KIND or UNUSUAL out of it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- image quality -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityIssue:
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def quality_stats(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """[N, H, W, 3] uint8 model-input pixels -> per-image sharpness, brightness and clipped shares.

    Sharpness is the variance of the 4-neighbour Laplacian of the grey image on the 0..1 scale;
    brightness its mean; clipped the share of pixels at or below 2% / at or above 98% grey.
    """
    # [N, H, W] R + G + B, 0..765 (three slice additions: numpy's sum over a last axis of 3 is ~7x slower)
    total = pixels[..., 0].astype(np.uint16) + pixels[..., 1] + pixels[..., 2]
    grey = total.astype(np.float32) * np.float32(1.0 / 765.0)
    lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4 * grey[:, 1:-1, 1:-1]
    flat = total.reshape(len(total), -1)
    return {
        "sharpness": lap.reshape(len(grey), -1).var(axis=1).astype(np.float64),
        "brightness": grey.reshape(len(grey), -1).mean(axis=1).astype(np.float64),
        # 2% and 98% of 765, compared on the integer sums (no float image needed)
        "dark_clipped": (flat <= 15).mean(axis=1).astype(np.float64),
        "bright_clipped": (flat >= 750).mean(axis=1).astype(np.float64),
    }


@dataclass(frozen=True)
class QualityLimits:
    """Limits from the training images: below the 1st / above the 99th percentile is flagged."""

    min_sharpness: float
    min_brightness: float
    max_brightness: float
    max_dark_clipped: float
    max_bright_clipped: float
    min_side: int

    @classmethod
    def fit(cls, stats: dict[str, np.ndarray], min_side: int, low: float = 1.0, high: float = 99.0) -> QualityLimits:
        return cls(
            min_sharpness=float(np.percentile(stats["sharpness"], low)),
            min_brightness=float(np.percentile(stats["brightness"], low)),
            max_brightness=float(np.percentile(stats["brightness"], high)),
            # A share that is 0 for nearly every training image still allows a few clipped pixels.
            max_dark_clipped=max(float(np.percentile(stats["dark_clipped"], high)), 0.05),
            max_bright_clipped=max(float(np.percentile(stats["bright_clipped"], high)), 0.05),
            min_side=min_side,
        )

    def check(self, stats: dict[str, float], width: int, height: int) -> list[QualityIssue]:
        """The quality problems of one image (its stats from ``quality_stats`` and its original size)."""
        issues = []
        if stats["sharpness"] < self.min_sharpness:
            issues.append(
                QualityIssue("blurred", "The image is blurrier than almost all training images: refocus and retake it.")
            )
        if stats["brightness"] < self.min_brightness:
            issues.append(QualityIssue("underexposed", "The image is darker than almost all training images."))
        if stats["brightness"] > self.max_brightness:
            issues.append(QualityIssue("overexposed", "The image is brighter than almost all training images."))
        if stats["dark_clipped"] > self.max_dark_clipped:
            issues.append(
                QualityIssue("clipped_dark", f"{stats['dark_clipped']:.0%} of the image is clipped to black.")
            )
        if stats["bright_clipped"] > self.max_bright_clipped:
            issues.append(
                QualityIssue("clipped_bright", f"{stats['bright_clipped']:.0%} of the image is clipped to white.")
            )
        if min(width, height) < self.min_side:
            issues.append(
                QualityIssue(
                    "too_small",
                    f"The image is {width}x{height} px, smaller than the {self.min_side} px the model reads: "
                    "send the original, not a thumbnail.",
                )
            )
        return issues

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)
