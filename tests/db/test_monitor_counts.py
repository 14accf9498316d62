"""The monitoring counts over any range (SQLite and PostgreSQL): whole weeks and months read from their
own rows and the partial ones at the edges from days give what the day rows alone give, for ranges
that start and end anywhere; and the figures from them match the cases' (exact where they should be,
AUROC within the 1/100 grid's ties)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select

from oncolens.evaluation.metrics import binary_auc
from oncolens.services.monitoring import binned_auc
from oncolens.store import stats
from oncolens.store.db import make_engine, upgrade
from oncolens.store.db.models import Case, MonitorCount

FIRST = date(2026, 1, 1)
DAYS = 120


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    """Monitoring counts of 600 made-up cases over 120 days (bumped as the case service does)."""
    engine = make_engine(database_url)
    upgrade(engine)
    rng = random.Random(0)
    with Session(engine) as session:
        session.exec(delete(MonitorCount))  # type: ignore[call-overload]
        for i in range(600):
            p = rng.random()
            case = Case(
                owner_id=1,
                model_id=rng.choice(["m1", "m2"]),
                model_version="1",
                patient_ref=f"P{i}",
                top_class="x",
                p_malignant=p,
                risk_level=rng.choice(["low", "high", "indeterminate"]),
                recommendation="",
                aggregation_rule="",
                result_json=json.dumps({"is_malignant": p > 0.5}),
                reference_class=rng.choice([None, "bad", "good"]),
                created_at=datetime.combine(FIRST + timedelta(days=rng.randrange(DAYS)), datetime.min.time(), UTC)
                + timedelta(hours=rng.randrange(24)),
            )
            stats.bump_monitor(session, case, [json.dumps({"domain": {"in_domain": i % 7 != 0}})], +1)
        session.commit()
    yield engine
    engine.dispose()


def key_sums(rows: list[tuple[Any, ...]], period: str) -> Counter[tuple[Any, ...]]:
    out: Counter[tuple[Any, ...]] = Counter()
    for first, b, c, i, r, n, images, images_out, *_ in rows:
        start = stats.period_start(first, period)
        out[(start, b, c, i, r, "n")] += n
        out[(start, b, c, i, r, "images")] += images
        out[(start, b, c, i, r, "out")] += images_out
    return +out


def from_days(session: Session, model: str, since: date | None, until: date | None, period: str) -> Counter[Any]:
    query = select(MonitorCount).where(MonitorCount.span == "d", MonitorCount.model_id == model)
    if since is not None:
        query = query.where(col(MonitorCount.day) >= since)
    if until is not None:
        query = query.where(col(MonitorCount.day) <= until)
    rows = [
        (r.day, r.p_bin, r.called, r.indeterminate, r.reference_class, r.n, r.images, r.images_out)
        for r in session.exec(query)
    ]
    return key_sums(rows, period)


def test_any_range_gives_what_the_days_give(engine: Engine) -> None:
    rng = random.Random(1)
    ranges: list[tuple[date | None, date | None]] = [(None, None), (None, date(9999, 12, 31))]
    ranges += [(FIRST + timedelta(days=3), None), (None, FIRST + timedelta(days=40))]
    ranges += [(FIRST + timedelta(days=31), FIRST + timedelta(days=58))]  # February, whole
    ranges += [(FIRST + timedelta(days=10), FIRST + timedelta(days=12))]  # inside one week
    for _ in range(12):
        a, b = sorted(rng.sample(range(-5, DAYS + 5), 2))
        ranges.append((FIRST + timedelta(days=a), FIRST + timedelta(days=b)))
    with Session(engine) as session:
        for period in ("week", "month"):
            for since, until in ranges:
                for model in ("m1", "m2"):
                    kept = key_sums(stats.monitor_counts(session, model, since, until, period), period)
                    assert kept == from_days(session, model, since, until, period), (period, since, until)
                    assert kept or (since or FIRST) > FIRST + timedelta(days=DAYS)


def test_binned_auroc_counts_a_shared_bin_as_a_tie() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(2000) < 0.3
    p = np.clip(rng.normal(0.35 + 0.3 * truth, 0.2), 0, 1)
    bins = np.minimum((p * 100).astype(int), 99)
    positives = np.bincount(bins[truth], minlength=100)
    negatives = np.bincount(bins[~truth], minlength=100)
    binned = float(binned_auc(positives, negatives))
    assert binned == pytest.approx(binary_auc(truth, (bins + 0.5) / 100), abs=1e-12)  # exact on the grid
    assert abs(binned - binary_auc(truth, p)) < 0.005  # and near the unbinned P
    assert np.isnan(binned_auc(positives, np.zeros(100)))
