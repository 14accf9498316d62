"""Classification and calibration metrics on NumPy arrays (no torch, no scikit-learn).

Conventions: ``y`` is [N] int class indices, ``probs`` is [N, C] probabilities with rows summing to
one, ``scores`` is [N] float for binary problems (higher = positive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] int counts; rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(y == pred)) if len(y) else float("nan")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y``."""
    cm = confusion_matrix(y, pred, num_classes)
    present = cm.sum(axis=1) > 0
    return float(per_class_prf(cm)["recall"][present].mean())


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in ``y``."""
    cm = confusion_matrix(y, pred, num_classes)
    present = cm.sum(axis=1) > 0
    return float(per_class_prf(cm)["f1"][present].mean())


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN if a class is absent."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(scores)]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over classes that have both positives and negatives in ``y``."""
    aucs = [binary_auc(y == c, probs[:, c]) for c in range(probs.shape[1])]
    valid = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, from (0, 0) to (1, 1)."""
    positive = positive.astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(p)[distinct]
    fps = np.cumsum(~p)[distinct]
    tpr = np.r_[0.0, tps / max(int(p.sum()), 1)]
    fpr = np.r_[0.0, fps / max(int((~p).sum()), 1)]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin mean confidence, accuracy and count of the top-label prediction."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_bins(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Equal-width bins over (0, 1] of the top-label confidence."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 cannot occur for a top label.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    safe = np.maximum(count, 1)
    return ReliabilityBins(edges, conf_sum / safe, acc_sum / safe, count.astype(np.int64))


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top label: sum over bins of (bin share) * |accuracy - confidence|."""
    bins = reliability_bins(y, probs, n_bins)
    total = bins.count.sum()
    if total == 0:
        return float("nan")
    gaps = np.abs(bins.accuracy - bins.confidence)
    return float((bins.count / total * gaps).sum())


def adaptive_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Equal-mass ECE of the top label: the images sorted by confidence, cut into ``n_bins`` bins of
    (nearly) equal count, then sum over bins of (bin share) * |accuracy - confidence|. Unlike equal-width
    bins, no bin holds one or two images when most confidences crowd near 1."""
    if len(y) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    order = np.argsort(conf, kind="mergesort")
    total = 0.0
    for chunk in np.array_split(order, min(n_bins, len(y))):
        total += len(chunk) * abs(correct[chunk].mean() - conf[chunk].mean())
    return float(total / len(y))


def classwise_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Mean over classes of the equal-width-binned ECE of P(class c) against [y == c], every image
    counted for every class (not only where c is the top label)."""
    if len(y) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    errors = []
    for c in range(probs.shape[1]):
        p, hit = probs[:, c], (y == c).astype(np.float64)
        idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
        gap = np.abs(np.bincount(idx, weights=hit, minlength=n_bins) - np.bincount(idx, weights=p, minlength=n_bins))
        errors.append(gap.sum() / len(y))
    return float(np.mean(errors))


def brier_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean over images of the squared distance between the probability vector and the one-hot label."""
    if len(y) == 0:
        return float("nan")
    onehot = np.zeros_like(probs, dtype=np.float64)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-probability of the true class (clipped at 1e-12)."""
    if len(y) == 0:
        return float("nan")
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def consistency_p_value(
    y: np.ndarray,
    probs: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    seed: int = 0,
) -> float:
    """How likely a calibration error at least as large as the observed one is under perfect calibration.

    Consistency resampling (Bröcker & Smith 2007): labels are drawn from the model's own probabilities,
    which makes the model perfectly calibrated for them, and ``statistic`` is recomputed each time; the
    p-value is (1 + #resamples at or above the observed value) / (1 + n_resamples). A small p says the
    miscalibration is detectable at this n; a large one says the figure is what chance alone gives.
    """
    if len(y) == 0:
        return float("nan")
    observed = statistic(y, probs)
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(probs, axis=1)
    last = probs.shape[1] - 1
    above = 0
    for _ in range(n_resamples):
        drawn = np.minimum((rng.random((len(y), 1)) > cumulative).sum(axis=1), last)
        above += statistic(drawn, probs) >= observed
    return float((1 + above) / (1 + n_resamples))


CALIBRATION: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "ece": expected_calibration_error,
    "adaptive_ece": adaptive_calibration_error,
    "classwise_ece": classwise_calibration_error,
    "brier": brier_score,
    "nll": log_loss,
}


def calibration_report(
    y: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0, n_resamples: int = 1000
) -> dict[str, Any]:
    """Calibration figures that hold at small n: 15-bin ECE (for comparison), equal-mass ECE,
    class-wise ECE, Brier score and NLL, each with a 95 % bootstrap interval, and the
    consistency-resampling p-value of both ECEs (p < 0.05: detectably miscalibrated)."""
    report: dict[str, Any] = {"bins": 15}
    intervals: dict[str, list[float]] = {}
    for name, fn in CALIBRATION.items():
        report[name] = fn(y, probs)

        def resampled(i: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], float] = fn) -> float:
            return fn(y[i], probs[i])

        intervals[name] = list(bootstrap_interval(resampled, len(y), n_boot, seed))
    report["intervals"] = intervals
    report["consistency_p"] = {
        name: consistency_p_value(y, probs, CALIBRATION[name], n_resamples, seed) for name in ("ece", "adaptive_ece")
    }
    report["consistency_resamples"] = n_resamples
    return report


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over ``n_boot`` resamples of range(n).

    Resamples where the statistic is undefined (NaN, e.g. an AUROC with one class) are skipped.
    """
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def classification_report(
    y: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    malignant: Sequence[bool],
    n_boot: int = 1000,
    seed: int = 0,
    malignant_threshold: float = 0.5,
    pred: np.ndarray | None = None,
    calibration: bool = True,
) -> dict[str, Any]:
    """All test metrics of a model card, each headline figure with a 95% bootstrap interval.

    ``pred`` is the model's chosen class per image (its decision rule; default the most probable).
    Malignant-vs-benign uses P(malignant) = the summed probability of the malignant classes,
    called positive at ``malignant_threshold``. With ``calibration``, the report's ``calibration``
    block holds :func:`calibration_report`.
    """
    num_classes = len(classes)
    pred = probs.argmax(axis=1) if pred is None else pred
    mal_mask = np.asarray(malignant, dtype=bool)
    p_mal = probs[:, mal_mask].sum(axis=1)
    is_mal = mal_mask[y]
    called = p_mal >= malignant_threshold

    def sensitivity(i: np.ndarray) -> float:
        pos = is_mal[i]
        return float(called[i][pos].mean()) if pos.any() else float("nan")

    def specificity(i: np.ndarray) -> float:
        neg = ~is_mal[i]
        return float((~called[i][neg]).mean()) if neg.any() else float("nan")

    headline: dict[str, Callable[[np.ndarray], float]] = {
        "accuracy": lambda i: accuracy(y[i], pred[i]),
        "balanced_accuracy": lambda i: balanced_accuracy(y[i], pred[i], num_classes),
        "macro_f1": lambda i: macro_f1(y[i], pred[i], num_classes),
        "macro_auc": lambda i: macro_auc(y[i], probs[i]),
        "ece": lambda i: expected_calibration_error(y[i], probs[i]),
    }
    binary: dict[str, Callable[[np.ndarray], float]] = {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "auc": lambda i: binary_auc(is_mal[i], p_mal[i]),
    }
    everything = np.arange(len(y))
    report: dict[str, Any] = {"n": len(y)}
    intervals: dict[str, list[float]] = {}
    for name, fn in headline.items():
        report[name] = fn(everything)
        intervals[name] = list(bootstrap_interval(fn, len(y), n_boot, seed))
    cm = confusion_matrix(y, pred, num_classes)
    prf = per_class_prf(cm)
    report["per_class"] = {
        c: {
            "precision": float(prf["precision"][k]),
            "recall": float(prf["recall"][k]),
            "f1": float(prf["f1"][k]),
            "support": int(prf["support"][k]),
            "auc": binary_auc(y == k, probs[:, k]),
        }
        for k, c in enumerate(classes)
    }
    if mal_mask.any() and not mal_mask.all():
        report["malignant"] = {name: fn(everything) for name, fn in binary.items()}
        report["malignant"]["threshold"] = malignant_threshold
        report["malignant"]["intervals"] = {
            name: list(bootstrap_interval(fn, len(y), n_boot, seed)) for name, fn in binary.items()
        }
    report["intervals"] = intervals
    report["confusion_matrix"] = cm.tolist()
    if calibration:
        report["calibration"] = calibration_report(y, probs, n_boot, seed)
    return report
