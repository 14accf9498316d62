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
class _Counts:
    """Kept counts as columns, one entry per row: the period each belongs to, its P bin, whether it was
    called malignant, indeterminate, reviewed (given a reference class) and malignant by that class,
    and its sums."""

    start: np.ndarray  # datetime64[D]: the first day of the row's period
    p_bin: np.ndarray
    called: np.ndarray
    indeterminate: np.ndarray
    reviewed: np.ndarray
    malignant: np.ndarray
    n: np.ndarray
    images: np.ndarray
    images_out: np.ndarray
    images_warned: np.ndarray
    p_sum: np.ndarray

    def where(self, mask: np.ndarray) -> _Counts:
        return _Counts(**{name: getattr(self, name)[mask] for name in self.__dataclass_fields__})


def _number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def _interval(low: float, high: float) -> list[float | None]:
    return [_number(low), _number(high)]


def load_counts(session: Session, card: ModelCard, since: date | None, until: date | None, period: Period) -> _Counts:
    """The model's kept counts from ``since`` to ``until`` (inclusive), each row with its period."""
    rows = stats.monitor_counts(session, card.id, since, until, period)
    malignant = {c.id for c in card.classes if c.malignant}
    columns = list(zip(*rows, strict=True)) if rows else [()] * 10
    epoch = date(1970, 1, 1).toordinal()  # NumPy's day 0; ordinals convert far faster than date objects
    day = np.array([d.toordinal() - epoch for d in columns[0]], dtype=np.int64).astype("datetime64[D]")
    if period == "week":  # 1970-01-01 was a Thursday: Monday is 3 days before it
        start = day - ((day.astype(np.int64) + 3) % 7).astype("timedelta64[D]")
    else:
        start = day.astype("datetime64[M]").astype("datetime64[D]")
    references = columns[4]
    return _Counts(
        start=start,
        p_bin=np.array(columns[1], dtype=np.int64),
        called=np.array(columns[2], dtype=bool),
        indeterminate=np.array(columns[3], dtype=bool),
        reviewed=np.array([bool(r) for r in references], dtype=bool),
        malignant=np.array([r in malignant for r in references], dtype=bool),
        n=np.array(columns[5], dtype=np.int64),
        images=np.array(columns[6], dtype=np.int64),
        images_out=np.array(columns[7], dtype=np.int64),
        images_warned=np.array(columns[8], dtype=np.int64),
        p_sum=np.array(columns[9], dtype=np.float64),
    )


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


def _per_bin(bins: np.ndarray, weights: np.ndarray, size: int = P_BINS) -> np.ndarray:
    return np.bincount(bins, weights=weights, minlength=size)


def summarise(counts: _Counts, card: ModelCard, settings: Settings, seed: int = 0) -> dict[str, Any]:
    """The figures of one period (or of the whole range)."""
    answered = counts.where(~counts.indeterminate)
    reviewed = answered.where(answered.reviewed)
    bad, good = reviewed.where(reviewed.malignant), reviewed.where(~reviewed.malignant)
    images = int(counts.images.sum())
    cases = int(counts.n.sum())
    figures: dict[str, Any] = {
        "cases": cases,
        "indeterminate_cases": cases - int(answered.n.sum()),
        "reviewed_cases": int(reviewed.n.sum()),
        "images": images,
        "out_of_domain_rate": _number(int(counts.images_out.sum()) / images) if images else None,
        "quality_warning_rate": _number(int(counts.images_warned.sum()) / images) if images else None,
    }
    positives, negatives = _per_bin(bad.p_bin, bad.n), _per_bin(good.p_bin, good.n)
    hits, rejections = int(bad.n[bad.called].sum()), int(good.n[~good.called].sum())
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    figures["sensitivity"] = _number(hits / n_pos) if n_pos else None
    figures["sensitivity_ci"] = _interval(*wilson_interval(hits, n_pos))
    figures["specificity"] = _number(rejections / n_neg) if n_neg else None
    figures["specificity_ci"] = _interval(*wilson_interval(rejections, n_neg))
    figures["auroc"] = _number(float(binned_auc(positives, negatives)))
    figures["auroc_ci"] = (
        _interval(*binned_auc_interval(positives, negatives, seed=seed)) if n_pos and n_neg else [None, None]
    )
    figures["reliability"] = _reliability(reviewed)
    figures["drift"] = drift(_per_bin(answered.p_bin, answered.n).astype(np.int64), card, settings)
    return figures


def _reliability(reviewed: _Counts) -> list[dict[str, Any]]:
    """P(malignant) in ten equal-width bins: how many reviewed cases, their mean P and how many were malignant."""
    k = reviewed.p_bin // (P_BINS // RELIABILITY_BINS)
    n = _per_bin(k, reviewed.n, RELIABILITY_BINS)
    p_sum = _per_bin(k, reviewed.p_sum, RELIABILITY_BINS)
    bad = _per_bin(k, reviewed.n * reviewed.malignant, RELIABILITY_BINS)
    return [
        {
            "from": b / RELIABILITY_BINS,
            "to": (b + 1) / RELIABILITY_BINS,
            "n": int(n[b]),
            "mean_p": _number(float(p_sum[b] / n[b])) if n[b] else None,
            "observed": _number(float(bad[b] / n[b])) if n[b] else None,
        }
        for b in range(RELIABILITY_BINS)
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
    value = psi(binned, CENTRES, weights=histogram)
    d, ks_p = ks_2samp(binned, CENTRES, histogram)
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
    counts = load_counts(session, card, since, until, period)
    periods = []
    for start in np.unique(counts.start):
        first = start.astype(date)
        periods.append(
            {"start": first.isoformat(), "end": stats.period_end(first, period).isoformat()}
            | summarise(counts.where(counts.start == start), card, settings)
        )
    overall = summarise(counts, card, settings)
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
    counts = load_counts(session, card, today - timedelta(days=WINDOW_DAYS - 1), today, "week")
    figures = summarise(counts, card, settings)
    figures["performance"] = performance_flag(figures, card, settings)
    return figures
