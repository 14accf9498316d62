"""The report figures of a model package: confusion matrix, ROC curves, reliability diagram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from oncolens.evaluation import metrics

DPI = 80


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised colours with raw counts written in each cell."""
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    size = max(3.6, 1.0 + 0.6 * len(classes))  # two classes still leave room for the title and colour bar
    fig, ax = plt.subplots(figsize=(size + 1.4, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def roc_png(
    y: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    malignant: Sequence[bool],
    path: Path,
    title: str,
) -> None:
    """One-vs-rest ROC per class, plus malignant-vs-benign on P(malignant) in black."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(classes):
        if 0 < (y == k).sum() < len(y):
            fpr, tpr, _ = metrics.roc_curve(y == k, probs[:, k])
            ax.plot(fpr, tpr, lw=1, label=f"{name} (AUC {metrics.binary_auc(y == k, probs[:, k]):.3f})")
    mal = np.asarray(malignant, dtype=bool)
    is_mal = mal[y]
    if 0 < is_mal.sum() < len(y):
        score = probs[:, mal].sum(axis=1)
        fpr, tpr, _ = metrics.roc_curve(is_mal, score)
        auc = metrics.binary_auc(is_mal, score)
        ax.plot(fpr, tpr, color="black", lw=2.2, label=f"malignant vs benign (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def reliability_png(
    y: np.ndarray, probs_before: np.ndarray, probs_after: np.ndarray, path: Path, title: str, n_bins: int = 15
) -> None:
    """Top-label accuracy against confidence before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for probs, label, marker in ((probs_before, "before", "o"), (probs_after, "after", "s")):
        bins = metrics.reliability_bins(y, probs, n_bins)
        used = bins.count > 0
        ece = metrics.expected_calibration_error(y, probs, n_bins)
        ax.plot(
            bins.confidence[used],
            bins.accuracy[used],
            marker=marker,
            label=f"{label} scaling (ECE {ece:.3f})",
        )
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence of the top class ({n_bins} bins)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
