"""Monitoring a model in use: per week or month, the cases, the reviewed cases' sensitivity, specificity
and AUROC with 95 % intervals, a reliability table, the out-of-domain and quality-warning rates, and
the drift of P(malignant) against the card's test distribution (PSI and a Kolmogorov-Smirnov test).

Every figure comes from ``monitor_counts``, the counts kept with every case write (``store.stats``),
so a model with a million cases costs what one with a hundred does. They keep P(malignant) to 1/100:
sensitivity, specificity, the rates and the reliability table are exact; AUROC counts two cases in
the same 1/100 bin as a tie, and drift compares the two distributions on that grid (the card's test
P binned alike). The bootstrap resamples the binned counts (a multinomial draw, the same as resampling
cases when their P is binned).

The statistics are NumPy (``evaluation.drift``, ``evaluation.metrics``): two formulas and a bootstrap do
not earn a clinic's server SciPy, NannyML or Evidently, which bring hundreds of MB and their own
opinions of what a period is. The thresholds are settings (``ONCOLENS_DRIFT_*``, ``ONCOLENS_MONITOR_*``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlmodel import Session

from oncolens.config import Settings
from oncolens.errors import InvalidInput
from oncolens.evaluation.drift import ks_2samp, psi, wilson_interval
from oncolens.store import stats
from oncolens.store.stats import P_BINS
from oncolens.zoo.card import ModelCard

Period = Literal["week", "month"]
RELIABILITY_BINS = 10
AUROC_RESAMPLES = 200
WINDOW_DAYS = 30  # the Prometheus gauges and the model list's flags: the last 30 days
CENTRES = (np.arange(P_BINS) + 0.5) / P_BINS


@dataclass(frozen=True)
class _Cell:
    """Cases of one period in one P bin with one call, indeterminacy and reference class, summed."""

    p_bin: int
    called: bool
    indeterminate: bool
    reference_class: str
    n: int
    images: int
    images_out: int
    images_warned: int
    p_sum: float


def period_start(moment: datetime, period: Period) -> date:
    day = moment.date()
    return day - timedelta(days=day.weekday()) if period == "week" else day.replace(day=1)


def _period_end(start: date, period: Period) -> date:
    if period == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def _number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def _interval(low: float, high: float) -> list[float | None]:
    return [_number(low), _number(high)]


def load_cells(
    session: Session, card: ModelCard, since: date | None, until: date | None, period: Period
) -> dict[date, list[_Cell]]:
    """The model's kept counts from ``since`` to ``until`` (inclusive), per period start."""
    cells: dict[date, list[_Cell]] = {}
    for start, *fields in stats.monitor_counts(session, card.id, since, until, period):
        cells.setdefault(start, []).append(_Cell(*fields))
    return cells


def binned_auc(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AUROC from counts per P bin (the last axis; leading axes are resamples): the chance that a
    malignant case's bin is above a benign one's, a shared bin counting one half. NaN without both."""
    below = np.cumsum(negatives, axis=-1) - negatives
    pairs = positives.sum(axis=-1) * negatives.sum(axis=-1)
    wins = (positives * (below + 0.5 * negatives)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.maximum(pairs, 1), np.nan)


def binned_auc_interval(
    positives: np.ndarray, negatives: np.ndarray, resamples: int = AUROC_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``binned_auc``: cases resampled with replacement, which for
    binned scores is one multinomial draw over the (bin, truth) cells per resample."""
    counts = np.concatenate([positives, negatives]).astype(np.float64)
    total = int(counts.sum())
    if total == 0:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).multinomial(total, counts / total, size=resamples)
    values = binned_auc(draws[:, :P_BINS], draws[:, P_BINS:])
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def summarise(cells: Sequence[_Cell], card: ModelCard, settings: Settings, seed: int = 0) -> dict[str, Any]:
    """The figures of one period (or of the whole range)."""
    malignant = {c.id for c in card.classes if c.malignant}
    answered = [c for c in cells if not c.indeterminate]
    reviewed = [c for c in answered if c.reference_class]
    images = sum(c.images for c in cells)
    cases = sum(c.n for c in cells)
    figures: dict[str, Any] = {
        "cases": cases,
        "indeterminate_cases": cases - sum(c.n for c in answered),
        "reviewed_cases": sum(c.n for c in reviewed),
        "images": images,
        "out_of_domain_rate": _number(sum(c.images_out for c in cells) / images) if images else None,
        "quality_warning_rate": _number(sum(c.images_warned for c in cells) / images) if images else None,
    }
    positives, negatives = np.zeros(P_BINS), np.zeros(P_BINS)
    hits = rejections = 0
    for c in reviewed:
        if c.reference_class in malignant:
            positives[c.p_bin] += c.n
            hits += c.n if c.called else 0
        else:
            negatives[c.p_bin] += c.n
            rejections += 0 if c.called else c.n
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    figures["sensitivity"] = _number(hits / n_pos) if n_pos else None
    figures["sensitivity_ci"] = _interval(*wilson_interval(hits, n_pos))
    figures["specificity"] = _number(rejections / n_neg) if n_neg else None
    figures["specificity_ci"] = _interval(*wilson_interval(rejections, n_neg))
    figures["auroc"] = _number(float(binned_auc(positives, negatives)))
    figures["auroc_ci"] = (
        _interval(*binned_auc_interval(positives, negatives, seed=seed)) if n_pos and n_neg else [None, None]
    )
    figures["reliability"] = _reliability(reviewed, malignant)
    histogram = np.zeros(P_BINS, dtype=np.int64)
    for c in answered:
        histogram[c.p_bin] += c.n
    figures["drift"] = drift(histogram, card, settings)
    return figures


def _reliability(reviewed: Sequence[_Cell], malignant: set[str]) -> list[dict[str, Any]]:
    """P(malignant) in ten equal-width bins: how many reviewed cases, their mean P and how many were malignant."""
    per_bin = P_BINS // RELIABILITY_BINS
    n, p_sum, bad = np.zeros(RELIABILITY_BINS), np.zeros(RELIABILITY_BINS), np.zeros(RELIABILITY_BINS)
    for c in reviewed:
        k = c.p_bin // per_bin
        n[k] += c.n
        p_sum[k] += c.p_sum
        bad[k] += c.n if c.reference_class in malignant else 0
    return [
        {
            "from": k / RELIABILITY_BINS,
            "to": (k + 1) / RELIABILITY_BINS,
            "n": int(n[k]),
            "mean_p": _number(float(p_sum[k] / n[k])) if n[k] else None,
            "observed": _number(float(bad[k] / n[k])) if n[k] else None,
        }
        for k in range(RELIABILITY_BINS)
    ]


def drift(histogram: np.ndarray, card: ModelCard, settings: Settings) -> dict[str, Any]:
    """PSI and KS of the answered cases' P(malignant) (counts per 1/100 bin) against the card's test
    distribution binned alike, and the flag they raise."""
    reference = np.asarray(card.monitoring.get("p_malignant_test") or [], dtype=np.float64)
    n = int(histogram.sum())
    if len(reference) == 0 or n == 0:
        why = "the card has no test distribution" if len(reference) == 0 else "no answered cases"
        return {"flag": False, "psi": None, "ks_p": None, "ks_d": None, "n": n, "note": why}
    binned = CENTRES[np.minimum((reference * P_BINS).astype(int), P_BINS - 1)]
    current = np.repeat(CENTRES, histogram)
    value = psi(binned, current)
    d, ks_p = ks_2samp(binned, current)
    enough = n >= settings.drift_min_cases
    flag = enough and (value > settings.drift_psi or ks_p < settings.drift_ks_p)
    note = "" if enough else f"fewer than {settings.drift_min_cases} cases: no flag"
    return {
        "flag": bool(flag),
        "psi": _number(value),
        "ks_p": _number(ks_p),
        "ks_d": _number(d),
        "n": n,
        "note": note,
    }


def performance_flag(figures: dict[str, Any], card: ModelCard, settings: Settings) -> dict[str, Any]:
    """Raised when the reviewed cases' sensitivity or AUROC falls past ``monitor_sensitivity_drop`` below the card's."""
    expected = card.metrics.get("malignant") or {}
    drop = settings.monitor_sensitivity_drop
    reasons = []
    if figures["reviewed_cases"] >= settings.monitor_min_reviewed:
        sens, auc = figures.get("sensitivity"), figures.get("auroc")
        if sens is not None and expected.get("sensitivity") is not None and sens < expected["sensitivity"] - drop:
            reasons.append(f"sensitivity {sens:.3f} against the card's {expected['sensitivity']:.3f}")
        if auc is not None and expected.get("auc") is not None and auc < expected["auc"] - drop:
            reasons.append(f"AUROC {auc:.3f} against the card's {expected['auc']:.3f}")
    return {"flag": bool(reasons), "reasons": reasons}


def monitoring(
    session: Session,
    card: ModelCard,
    settings: Settings,
    period: Period = "month",
    since: date | None = None,
    until: date | None = None,
) -> dict[str, Any]:
    """Every period with cases in the range, and the whole range."""
    if period not in ("week", "month"):
        raise InvalidInput(f"period: 'week' or 'month', not {period!r}")
    if since is not None and until is not None and since > until:
        raise InvalidInput(f"start {since} is after end {until}")
    cells = load_cells(session, card, since, until, period)
    periods = [
        {"start": start.isoformat(), "end": _period_end(start, period).isoformat()} | summarise(group, card, settings)
        for start, group in sorted(cells.items())
    ]
    overall = summarise(_merged(cells), card, settings)
    overall["performance"] = performance_flag(overall, card, settings)
    expected = card.metrics.get("malignant") or {}
    return {
        "model_id": card.id,
        "version": card.version,
        "period": period,
        "start": since.isoformat() if since else None,
        "end": until.isoformat() if until else None,
        "reference": {
            "n": len(card.monitoring.get("p_malignant_test") or []),
            "split": card.monitoring.get("split"),
            "sensitivity": expected.get("sensitivity"),
            "specificity": expected.get("specificity"),
            "auroc": expected.get("auc"),
            "malignant_threshold": card.risk_policy.malignant_threshold,
        },
        "thresholds": {
            "drift_psi": settings.drift_psi,
            "drift_ks_p": settings.drift_ks_p,
            "drift_min_cases": settings.drift_min_cases,
            "monitor_min_reviewed": settings.monitor_min_reviewed,
            "monitor_sensitivity_drop": settings.monitor_sensitivity_drop,
        },
        "periods": periods,
        "overall": overall,
    }


def recent(session: Session, card: ModelCard, settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """The last ``WINDOW_DAYS`` days as one period, with both flags: the model list and the gauges."""
    today = (now or datetime.now(UTC)).date()
    cells = load_cells(session, card, today - timedelta(days=WINDOW_DAYS - 1), today, "month")
    figures = summarise(_merged(cells), card, settings)
    figures["performance"] = performance_flag(figures, card, settings)
    return figures


def _merged(cells: dict[date, list[_Cell]]) -> list[_Cell]:
    """The cells of every period as one (the whole range's figures)."""
    return [cell for group in cells.values() for cell in group]
