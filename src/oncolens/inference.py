"""Pure functions from model outputs to results: calibration, malignancy, risk, aggregation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def calibrate(logits: np.ndarray, temperature: float) -> np.ndarray:
    """[N, C] logits -> [N, C] probabilities, softmax(logits / T)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probs


def p_malignant(probs: np.ndarray, malignant: Sequence[bool]) -> np.ndarray:
    """[N, C] probabilities -> [N] summed probability of the malignant classes."""
    summed: np.ndarray = np.asarray(probs)[:, np.asarray(malignant, dtype=bool)].sum(axis=1)
    return summed


def aggregate(probs: np.ndarray, malignant: Sequence[bool], rule: str = "mean") -> np.ndarray:
    """[N, C] per-image probabilities of one case -> [C] case probabilities.

    ``mean`` averages the images; ``max_malignant`` takes the image with the highest P(malignant),
    so one suspicious view is never averaged away.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError("a case needs at least one image's probabilities, shaped [N, C]")
    if rule == "mean":
        result: np.ndarray = probs.mean(axis=0)
        return result
    if rule == "max_malignant":
        chosen: np.ndarray = probs[int(np.argmax(p_malignant(probs, malignant)))]
        return chosen
    raise ValueError(f"unknown aggregation rule {rule!r}; expected 'mean' or 'max_malignant'")


def class_activation_map(features: np.ndarray, weight: np.ndarray, class_index: int) -> np.ndarray:
    """[K, h, w] features and [C, K] head weights -> [h, w] CAM of one class, scaled to [0, 1].

    Exact for a global-average-pool + linear head: the class logit is the mean of this map plus
    the bias. Negative evidence is clipped to 0.
    """
    cam = np.tensordot(weight[class_index].astype(np.float64), features.astype(np.float64), axes=1)
    cam = np.maximum(cam, 0.0)
    peak = cam.max()
    scaled: np.ndarray = cam / peak if peak > 0 else cam
    return scaled
