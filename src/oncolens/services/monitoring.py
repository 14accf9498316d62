"""Monitoring a model in use: per week or month, the cases, the reviewed cases' sensitivity, specificity
and AUROC with 95 % intervals, a reliability table, the out-of-domain and quality-warning rates, and
the drift of P(malignant) against the card's test distribution (PSI and a Kolmogorov-Smirnov test).

The statistics are NumPy (``evaluation.drift``, ``evaluation.metrics``): two formulas and a bootstrap do
not earn a clinic's server SciPy, NannyML or Evidently, which bring hundreds of MB and their own
opinions of what a period is. The thresholds are settings (``ONCOLENS_DRIFT_*``, ``ONCOLENS_MONITOR_*``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from oncolens.config import Settings
from oncolens.errors import InvalidInput
from oncolens.evaluation import metrics
from oncolens.evaluation.drift import ks_2samp, psi, wilson_interval
from oncolens.store.db.models import Case, CaseImage
from oncolens.store.views import as_utc
from oncolens.zoo.card import ModelCard, RiskLevel

Period = Literal["week", "month"]
RELIABILITY_BINS = 10
AUROC_RESAMPLES = 200
WINDOW_DAYS = 30  # the Prometheus gauges and the model list's flags: the last 30 days


@dataclass(frozen=True)
class _Row:
    created: datetime
    p: float
    called: bool
    indeterminate: bool
    reference_malignant: bool | None
    images: int
    images_out: int
    images_warned: int


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


def load_rows(session: Session, card: ModelCard, since: date | None, until: date | None) -> list[_Row]:
    malignant = {c.id for c in card.classes if c.malignant}
    columns = (Case.id, Case.created_at, Case.p_malignant, Case.risk_level, Case.reference_class, Case.result_json)
    query = sa_select(*(col(c) for c in columns)).where(col(Case.model_id) == card.id)
    if since is not None:
        query = query.where(col(Case.created_at) >= datetime.combine(since, datetime.min.time(), UTC))
    if until is not None and until < date.max:
        query = query.where(
            col(Case.created_at) < datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC)
        )
    cases = session.execute(query.order_by(col(Case.created_at))).all()
    per_image: dict[str, list[int]] = {}
    ids = [c[0] for c in cases]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for case_id, result_json in session.exec(
            select(CaseImage.case_id, CaseImage.result_json).where(col(CaseImage.case_id).in_(chunk))
        ).all():
            result = json.loads(result_json)
            counts = per_image.setdefault(case_id, [0, 0, 0])
            counts[0] += 1
            domain = result.get("domain") or {}
            counts[1] += domain.get("in_domain") is False
            counts[2] += bool(result.get("quality"))
    rows = []
    for case_id, created, p, level, reference, result_json in cases:
        images = per_image.get(case_id, [0, 0, 0])
        rows.append(
            _Row(
                as_utc(created),
                float(p),
                bool(json.loads(result_json).get("is_malignant", False)),
                level == RiskLevel.indeterminate.value,
                None if reference is None else reference in malignant,
                *images,
            )
        )
    return rows


def summarise(rows: list[_Row], card: ModelCard, settings: Settings, seed: int = 0) -> dict[str, Any]:
    """The figures of one period (or of the whole range)."""
    answered = [r for r in rows if not r.indeterminate]
    reviewed = [r for r in answered if r.reference_malignant is not None]
    images = sum(r.images for r in rows)
    figures: dict[str, Any] = {
        "cases": len(rows),
        "indeterminate_cases": len(rows) - len(answered),
        "reviewed_cases": len(reviewed),
        "images": images,
        "out_of_domain_rate": _number(sum(r.images_out for r in rows) / images) if images else None,
        "quality_warning_rate": _number(sum(r.images_warned for r in rows) / images) if images else None,
    }
    truth = np.array([r.reference_malignant for r in reviewed], dtype=bool)
    p = np.array([r.p for r in reviewed], dtype=np.float64)
    called = np.array([r.called for r in reviewed], dtype=bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    hits, rejections = int((called & truth).sum()), int((~called & ~truth).sum())
    figures["sensitivity"] = _number(hits / positives) if positives else None
    figures["sensitivity_ci"] = _interval(*wilson_interval(hits, positives))
    figures["specificity"] = _number(rejections / negatives) if negatives else None
    figures["specificity_ci"] = _interval(*wilson_interval(rejections, negatives))
    auroc = metrics.binary_auc(truth, p) if positives and negatives else float("nan")
    figures["auroc"] = _number(auroc)
    figures["auroc_ci"] = (
        _interval(
            *metrics.bootstrap_interval(lambda i: metrics.binary_auc(truth[i], p[i]), len(p), AUROC_RESAMPLES, seed)
        )
        if positives and negatives
        else [None, None]
    )
    figures["reliability"] = _reliability(p, truth)
    figures["drift"] = drift(np.array([r.p for r in answered]), card, settings)
    return figures


def _reliability(p: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    """P(malignant) in ten equal-width bins: how many reviewed cases, their mean P and how many were malignant."""
    out = []
    index = np.minimum((p * RELIABILITY_BINS).astype(int), RELIABILITY_BINS - 1)
    for k in range(RELIABILITY_BINS):
        mask = index == k
        n = int(mask.sum())
        out.append(
            {
                "from": k / RELIABILITY_BINS,
                "to": (k + 1) / RELIABILITY_BINS,
                "n": n,
                "mean_p": _number(float(p[mask].mean())) if n else None,
                "observed": _number(float(truth[mask].mean())) if n else None,
            }
        )
    return out


def drift(p: np.ndarray, card: ModelCard, settings: Settings) -> dict[str, Any]:
    """PSI and KS of these P(malignant) against the card's test distribution, and the flag they raise."""
    reference = np.asarray(card.monitoring.get("p_malignant_test") or [], dtype=np.float64)
    if len(reference) == 0 or len(p) == 0:
        why = "the card has no test distribution" if len(reference) == 0 else "no answered cases"
        return {"flag": False, "psi": None, "ks_p": None, "ks_d": None, "n": len(p), "note": why}
    value = psi(reference, p)
    d, ks_p = ks_2samp(reference, p)
    enough = len(p) >= settings.drift_min_cases
    flag = enough and (value > settings.drift_psi or ks_p < settings.drift_ks_p)
    note = "" if enough else f"fewer than {settings.drift_min_cases} cases: no flag"
    return {
        "flag": bool(flag),
        "psi": _number(value),
        "ks_p": _number(ks_p),
        "ks_d": _number(d),
        "n": len(p),
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
    rows = load_rows(session, card, since, until)
    buckets: dict[date, list[_Row]] = {}
    for row in rows:
        buckets.setdefault(period_start(row.created, period), []).append(row)
    periods = [
        {"start": start.isoformat(), "end": _period_end(start, period).isoformat()} | summarise(group, card, settings)
        for start, group in sorted(buckets.items())
    ]
    overall = summarise(rows, card, settings)
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
    figures = summarise(load_rows(session, card, today - timedelta(days=WINDOW_DAYS - 1), today), card, settings)
    figures["performance"] = performance_flag(figures, card, settings)
    return figures
