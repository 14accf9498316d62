"""Is a model's input population still the one it was measured on? Distribution-shift statistics of
P(malignant) against the card's test distribution: the population stability index and the two-sample
Kolmogorov-Smirnov test, NumPy only (a clinic's server does not carry SciPy for two formulas; the
tests check both against SciPy's where it is installed)."""

from __future__ import annotations

import math

import numpy as np

PSI_BINS = 10
PSI_FLOOR = 1e-4  # a share of 0 in a bin would make the PSI infinite


def _weights(values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """How many times each value counts (once each without ``weights``: a histogram's counts with them)."""
    return np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS, weights: np.ndarray | None = None) -> float:
    """Population stability index of ``current`` (each value counted ``weights`` times where given)
    against ``reference``: sum over bins of (q - r) * ln(q / r), with bins at the reference's deciles
    (equal reference mass). Under 0.1 is usually read as stable, 0.1-0.25 as a moderate shift, above
    0.25 as a large one."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    counted = _weights(current, weights)
    if len(reference) == 0 or counted.sum() == 0:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    where = np.searchsorted(edges, current, side="right")
    q = np.bincount(where, weights=counted, minlength=len(edges) + 1) / counted.sum()
    r, q = np.clip(r, PSI_FLOOR, None), np.clip(q, PSI_FLOOR, None)
    return float(((q - r) * np.log(q / r)).sum())


def _kolmogorov_q(x: float) -> float:
    """P(K > x) of the Kolmogorov distribution (the alternating series; 1 for small x)."""
    if x < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return float(min(1.0, max(0.0, 2 * total)))


def ks_2samp(a: np.ndarray, b: np.ndarray, b_weights: np.ndarray | None = None) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: the largest gap D between the empirical CDFs and its
    two-sided p-value (the asymptotic distribution with Stephens' small-sample correction). Each value
    of ``b`` counts ``b_weights`` times where given (a histogram: its bins' values and counts)."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.asarray(b, dtype=np.float64)
    order = np.argsort(b, kind="stable")
    b, counted = b[order], _weights(b, b_weights)[order]
    n_b = float(counted.sum())
    if len(a) == 0 or n_b == 0:
        return float("nan"), float("nan")
    below_b = np.concatenate([[0.0], np.cumsum(counted)])
    grid = np.concatenate([a, b])
    gap = np.abs(
        np.searchsorted(a, grid, side="right") / len(a) - below_b[np.searchsorted(b, grid, side="right")] / n_b
    )
    d = float(gap.max())
    en = math.sqrt(len(a) * n_b / (len(a) + n_b))
    return d, _kolmogorov_q((en + 0.12 + 0.11 / en) * d)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (NaNs for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def reference_distribution(p_malignant: np.ndarray, split: str = "test", source: str = "") -> dict[str, object]:
    """A card's ``monitoring`` block: the split's P(malignant), sorted and rounded, that drift is measured against."""
    values = sorted(round(float(v), 5) for v in np.asarray(p_malignant, dtype=np.float64))
    return {"p_malignant_test": values, "split": split, "n": len(values), "source": source}
