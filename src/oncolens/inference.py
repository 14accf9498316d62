"""Pure functions from model outputs to results: calibration, malignancy, risk, aggregation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def risk_level(p: float, policy: dict[str, Any]) -> dict[str, Any]:
    """The highest policy level whose ``min`` threshold ``p`` reaches: {level, recommendation, min}."""
    levels = sorted(policy["levels"], key=lambda lv: lv["min"])
    chosen = levels[0]
    for level in levels:
        if p >= level["min"]:
            chosen = level
    return dict(chosen)
