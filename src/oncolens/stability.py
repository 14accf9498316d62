"""Is an answer stable under a change of the image that should not matter? (issue 38, finding 2)

A perturbation of a few grey levels, found by querying the model, can turn a high-risk answer into
a low-risk one. Such a perturbation is tuned to the exact pixels the model saw: the same image
mirrored and shifted by a few pixels (a change that the models were trained to ignore) usually gets
its original answer back. So the server also runs that copy (one more backbone pass per image) and
marks an answer ``unstable`` when P(malignant) of the image and of its copy differ by more than the
model's bound: the 95th percentile of that difference on clean ``val`` images, recorded in the card
(``stability.max_change``), so that about 5% of clean images are marked too (the card states the
rate measured on ``test``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SHIFT_FRACTION = 1 / 16  # of the side: 14 px of a 224-px input
CLEAN_QUANTILE = 0.95


def copy_pixels(pixels: np.ndarray) -> np.ndarray:
    """[N, H, W, C] (model pixels) or [N, C, H, W] (model input) -> the mirrored, shifted copy.

    Mirrored left-right, then moved down and right by ``SHIFT_FRACTION`` of the side, the edge rows
    and columns repeated into the gap. Works on either layout: the last two axes of NCHW are (H, W),
    the middle two of NHWC.
    """
    channels_last = pixels.shape[-1] in (1, 3) and pixels.shape[1] not in (1, 3)
    h_axis, w_axis = (1, 2) if channels_last else (2, 3)
    out = np.flip(pixels, axis=w_axis)
    dy = max(1, round(pixels.shape[h_axis] * SHIFT_FRACTION))
    dx = max(1, round(pixels.shape[w_axis] * SHIFT_FRACTION))
    pad = [(0, 0)] * pixels.ndim
    pad[h_axis], pad[w_axis] = (dy, 0), (dx, 0)
    padded = np.pad(out, pad, mode="edge")
    index: list[slice] = [slice(None)] * pixels.ndim
    index[h_axis] = slice(0, pixels.shape[h_axis])
    index[w_axis] = slice(0, pixels.shape[w_axis])
    return np.ascontiguousarray(padded[tuple(index)])


def p_change(score: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """[N] |P(malignant) of each image - P(malignant) of its copy|, ``score`` mapping a batch to [N]."""
    changes: np.ndarray = np.abs(score(pixels) - score(copy_pixels(pixels)))
    return changes


def fit_bound(score: Callable[[np.ndarray], np.ndarray], clean: np.ndarray, quantile: float = CLEAN_QUANTILE) -> float:
    """The bound on the change above which an answer is unstable: its ``quantile`` on clean images."""
    changes = np.concatenate([p_change(score, clean[i : i + 32]) for i in range(0, len(clean), 32)])
    return float(np.quantile(changes, quantile))


def unstable(p: np.ndarray, p_copy: np.ndarray, bound: float) -> np.ndarray:
    """[N] bool: the answer moved more than ``bound`` between the image and its copy."""
    moved: np.ndarray = np.abs(np.asarray(p) - np.asarray(p_copy)) > bound
    return moved
