"""Counts maintained with every write, so that pages read a few rows however many cases there are.

- ``case_counts`` (day, model, risk level, status -> n): the dashboard and the case list's totals.
- ``monitor_counts`` (day, model, P bin, called, indeterminate, reference class -> n, images, out-of-
  domain and quality-warned images, sum of P): the model monitoring page and its gauges.
- ``audit_counts`` (day, action, user -> n): the audit log's totals.

The case counts move in the transaction that creates, reviews or deletes a case (``bump``,
``bump_monitor``: upserts, safe under concurrent writers on SQLite and PostgreSQL); the audit counts
move with every audit event the ORM inserts (a mapper event, so no writer can forget them). ``rebuild``
recounts all three from the rows (data loaded by SQL or restored, or a check). Days are UTC dates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from sqlalchemy import Table, delete, event, func, text
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper
from sqlmodel import Session, col, select

from oncolens.store.db.models import AuditCount, AuditEvent, Case, CaseCount, CaseImage, MonitorCount
from oncolens.store.views import as_utc

P_BINS = 100  # monitoring keeps P(malignant) to 1/100: AUROC and drift are computed on that grid

# The recounts as INSERT ... SELECT per dialect (also run by migrations 0006 and 0007).
REBUILD = {
    "postgresql": (
        "INSERT INTO case_counts (day, model_id, risk_level, status, n) "
        "SELECT (created_at AT TIME ZONE 'UTC')::date, model_id, risk_level, status, count(*) "
        "FROM cases GROUP BY 1, 2, 3, 4"
    ),
    "sqlite": (
        "INSERT INTO case_counts (day, model_id, risk_level, status, n) "
        "SELECT date(created_at), model_id, risk_level, status, count(*) FROM cases GROUP BY 1, 2, 3, 4"
    ),
}
_MONITOR_INSERT = (
    "INSERT INTO monitor_counts (day, model_id, p_bin, called, indeterminate, reference_class, n, images, "
    "images_out, images_warned, p_sum, span) "
)
# The week and month rows summed from the day rows (``{start}``: the span's first day, per dialect).
ROLLUP = (
    "INSERT INTO monitor_counts (span, day, model_id, p_bin, called, indeterminate, reference_class, n, images, "
    "images_out, images_warned, p_sum) SELECT '{span}', {start}, model_id, p_bin, called, indeterminate, "
    "reference_class, sum(n), sum(images), sum(images_out), sum(images_warned), sum(p_sum) FROM monitor_counts "
    "WHERE span = 'd' GROUP BY 2, 3, 4, 5, 6, 7"
)
SPAN_STARTS = {
    "postgresql": {
        "w": "day - (extract(isodow from day)::int - 1)",
        "m": "day - (extract(day from day)::int - 1)",
    },
    "sqlite": {"w": "date(day, 'weekday 0', '-6 days')", "m": "date(day, 'start of month')"},
}
SPANS = {"week": "w", "month": "m"}
REBUILD_MONITOR = {
    "postgresql": _MONITOR_INSERT
    + "SELECT (c.created_at AT TIME ZONE 'UTC')::date, c.model_id, LEAST(FLOOR(c.p_malignant * 100), 99)::int, "
    "COALESCE((c.result_json::json ->> 'is_malignant') = 'true', false), c.risk_level = 'indeterminate', "
    "COALESCE(c.reference_class, ''), count(*), COALESCE(sum(i.images), 0), COALESCE(sum(i.images_out), 0), "
    "COALESCE(sum(i.images_warned), 0), sum(c.p_malignant), 'd' "
    "FROM cases c LEFT JOIN (SELECT case_id, count(*) AS images, "
    "sum(CASE WHEN (result_json::json -> 'domain' ->> 'in_domain') = 'false' THEN 1 ELSE 0 END) AS images_out, "
    "sum(CASE WHEN json_typeof(result_json::json -> 'quality') = 'array' "
    "AND json_array_length(result_json::json -> 'quality') > 0 THEN 1 ELSE 0 END) AS images_warned "
    "FROM case_images GROUP BY case_id) i ON i.case_id = c.id GROUP BY 1, 2, 3, 4, 5, 6",
    "sqlite": _MONITOR_INSERT + "SELECT date(c.created_at), c.model_id, MIN(CAST(c.p_malignant * 100 AS INTEGER), 99), "
    "COALESCE(json_extract(c.result_json, '$.is_malignant') = 1, 0), c.risk_level = 'indeterminate', "
    "COALESCE(c.reference_class, ''), count(*), COALESCE(sum(i.images), 0), COALESCE(sum(i.images_out), 0), "
    "COALESCE(sum(i.images_warned), 0), sum(c.p_malignant), 'd' "
    "FROM cases c LEFT JOIN (SELECT case_id, count(*) AS images, "
    "sum(CASE WHEN json_extract(result_json, '$.domain.in_domain') = 0 THEN 1 ELSE 0 END) AS images_out, "
    "sum(CASE WHEN json_array_length(result_json, '$.quality') > 0 THEN 1 ELSE 0 END) AS images_warned "
    "FROM case_images GROUP BY case_id) i ON i.case_id = c.id GROUP BY 1, 2, 3, 4, 5, 6",
}
REBUILD_AUDIT = {
    "postgresql": "INSERT INTO audit_counts (day, action, user_id, n) "
    "SELECT (at AT TIME ZONE 'UTC')::date, action, COALESCE(user_id, 0), count(*) FROM audit_events GROUP BY 1, 2, 3",
    "sqlite": "INSERT INTO audit_counts (day, action, user_id, n) "
    "SELECT date(at), action, COALESCE(user_id, 0), count(*) FROM audit_events GROUP BY 1, 2, 3",
}


def _upsert(bind: Session | Connection, table: Table, keys: list[str], values: dict[str, Any], adds: list[str]) -> None:
    """INSERT ``values``, or add its ``adds`` columns to the row with the same ``keys``."""
    dialect = bind.get_bind().dialect.name if isinstance(bind, Session) else bind.dialect.name
    insert = postgresql_insert(table) if dialect == "postgresql" else sqlite_insert(table)
    statement = insert.values(**values).on_conflict_do_update(
        index_elements=keys, set_={name: table.c[name] + insert.excluded[name] for name in adds}
    )
    bind.execute(statement)


def bump(session: Session, case: Case, by: int, status: str | None = None) -> None:
    """Count ``case`` (with ``status``, default its own) ``by`` more (+1 made, -1 deleted or moved)."""
    values = {
        "day": as_utc(case.created_at).date(),
        "model_id": case.model_id,
        "risk_level": case.risk_level,
        "status": status or case.status,
        "n": by,
    }
    _upsert(session, CaseCount.__table__, ["day", "model_id", "risk_level", "status"], values, ["n"])  # type: ignore[attr-defined]


def image_results(session: Session, case_id: str) -> list[str]:
    """The result JSON of each image of a case (what ``bump_monitor`` counts)."""
    return list(session.exec(select(CaseImage.result_json).where(CaseImage.case_id == case_id)))


def p_bin(p: float) -> int:
    """P(malignant)'s bin on the monitoring grid: floor(100 p), 1.0 in the top bin (as the SQL recount)."""
    return min(int(p * P_BINS), P_BINS - 1)


def bump_monitor(session: Session, case: Case, images: Sequence[str], by: int) -> None:
    """Count ``case`` (with ``images``, the result JSON of each of its images) ``by`` more in
    ``monitor_counts``: +1 made or given a reference class, -1 deleted or its reference class changed."""
    out = warned = 0
    for text_ in images:
        result = json.loads(text_)
        out += (result.get("domain") or {}).get("in_domain") is False
        warned += bool(result.get("quality"))
    day = as_utc(case.created_at).date()
    values = {
        "model_id": case.model_id,
        "p_bin": p_bin(case.p_malignant),
        "called": bool(json.loads(case.result_json).get("is_malignant", False)),
        "indeterminate": case.risk_level == "indeterminate",
        "reference_class": case.reference_class or "",
        "n": by,
        "images": by * len(images),
        "images_out": by * out,
        "images_warned": by * warned,
        "p_sum": by * float(case.p_malignant),
    }
    keys = ["model_id", "span", "day", "p_bin", "called", "indeterminate", "reference_class"]
    adds = ["n", "images", "images_out", "images_warned", "p_sum"]
    for span, start in (("d", day), ("w", period_start(day, "week")), ("m", period_start(day, "month"))):
        _upsert(session, MonitorCount.__table__, keys, values | {"span": span, "day": start}, adds)  # type: ignore[attr-defined]


def period_start(day: date, period: str) -> date:
    """The first day of ``day``'s week (Monday) or month."""
    return day - timedelta(days=day.weekday()) if period == "week" else day.replace(day=1)


def period_end(start: date, period: str) -> date:
    """The first day after the week or month that starts on ``start``."""
    if period == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


@event.listens_for(AuditEvent, "after_insert")
def _count_audit_event(_: Mapper[AuditEvent], connection: Connection, event_: AuditEvent) -> None:
    """Every audit event the ORM writes counts itself in ``audit_counts``, in the same transaction."""
    values = {"day": as_utc(event_.at).date(), "action": event_.action, "user_id": event_.user_id or 0, "n": 1}
    _upsert(connection, AuditCount.__table__, ["day", "action", "user_id"], values, ["n"])  # type: ignore[attr-defined]


def rebuild(session: Session) -> int:
    """Recount every case into ``case_counts`` and ``monitor_counts`` and every audit event into
    ``audit_counts``; returns how many cases were counted."""
    dialect = session.get_bind().dialect.name
    for table, sql in ((CaseCount, REBUILD), (MonitorCount, REBUILD_MONITOR), (AuditCount, REBUILD_AUDIT)):
        session.execute(delete(table))
        session.execute(text(sql[dialect]))
    for span, start in SPAN_STARTS[dialect].items():
        session.execute(text(ROLLUP.format(span=span, start=start)))
    session.execute(delete(CaseCount).where(col(CaseCount.n) == 0))
    session.commit()
    if dialect == "postgresql":  # the planner's figures for the tables just refilled
        session.execute(text("ANALYZE case_counts, monitor_counts, audit_counts"))
        session.commit()
    return int(session.exec(select(func.coalesce(func.sum(CaseCount.n), 0))).one())


def dashboard(session: Session, since: date) -> tuple[list[tuple[str, str, str, int]], list[tuple[date, str, int]]]:
    """The dashboard's figures summed in the database: (model, risk level, status, n) over all days,
    and (day, risk level, n) from ``since``."""
    n = func.sum(CaseCount.n)
    overall = session.exec(
        select(CaseCount.model_id, CaseCount.risk_level, CaseCount.status, n)
        .group_by(col(CaseCount.model_id), col(CaseCount.risk_level), col(CaseCount.status))
        .having(n != 0)
    ).all()
    daily = session.execute(
        sa_select(col(CaseCount.day), col(CaseCount.risk_level), n)
        .where(col(CaseCount.day) >= since)
        .group_by(col(CaseCount.day), col(CaseCount.risk_level))
        .having(n != 0)
    ).all()
    return [(m, r, s_, int(k)) for m, r, s_, k in overall], [(d, r, int(k)) for d, r, k in daily]


def monitor_counts(
    session: Session, model_id: str, since: date | None, until: date | None, period: str
) -> list[tuple[Any, ...]]:
    """A model's monitoring counts from ``since`` to ``until`` (inclusive, None: open), as rows of
    (first day, P bin, called, indeterminate, reference class, n, images, out-of-domain images,
    quality-warned images, sum of P): whole periods (week or month) from their own rows, whose first
    day is the period's; only the partial periods at the range's edges from the day rows."""
    low = None if since is None else period_start(since, period)
    if low is not None and since is not None and low < since:
        low = period_end(low, period)
    if until is not None and until >= date.max - timedelta(days=1):
        until = None  # the last day there is: an open end
    high = None if until is None else period_start(until + timedelta(days=1), period)
    day = col(MonitorCount.day)
    base = sa_select(*(col(c) for c in MONITOR_COLUMNS)).where(
        col(MonitorCount.model_id) == model_id, col(MonitorCount.n) != 0
    )

    def days(first: date | None, last: date | None) -> Any:
        query = base.where(col(MonitorCount.span) == "d")
        query = query.where(day >= first) if first is not None else query
        return query.where(day <= last) if last is not None else query

    if low is not None and high is not None and low >= high:  # no whole period in the range: its days
        parts = [days(since, until)]
    else:
        whole = base.where(col(MonitorCount.span) == SPANS[period])
        whole = whole.where(day >= low) if low is not None else whole
        parts = [whole.where(day < high) if high is not None else whole]
        if high is not None:
            parts.append(days(high, until))
        if low is not None and since is not None and since < low:
            parts.append(days(since, low - timedelta(days=1)))
    connection = session.connection()  # rows as tuples, not objects: a page reads thousands
    return [tuple(row) for query in parts for row in connection.execute(query).all()]


MONITOR_COLUMNS = (
    MonitorCount.day,
    MonitorCount.p_bin,
    MonitorCount.called,
    MonitorCount.indeterminate,
    MonitorCount.reference_class,
    MonitorCount.n,
    MonitorCount.images,
    MonitorCount.images_out,
    MonitorCount.images_warned,
    MonitorCount.p_sum,
)


def total(session: Session, model_id: str | None, risk_level: str | None, status: str | None) -> int:
    """How many cases there are, of a model, risk level and status where given (None: any)."""
    query = select(func.coalesce(func.sum(CaseCount.n), 0))
    for column, value in (
        (CaseCount.model_id, model_id),
        (CaseCount.risk_level, risk_level),
        (CaseCount.status, status),
    ):
        if value is not None:
            query = query.where(column == value)
    return int(session.exec(query).one())


def audit_total(session: Session, action: str | None, user_id: int | None, hide: Sequence[str] = ()) -> int:
    """How many audit events there are, of an action and a user where given, leaving out the actions
    ``hide`` (unless one action is asked for): from ``audit_counts``."""
    query = select(func.coalesce(func.sum(AuditCount.n), 0))
    if action:
        query = query.where(AuditCount.action == action)
    elif hide:
        query = query.where(col(AuditCount.action).not_in(hide))
    if user_id is not None:
        query = query.where(AuditCount.user_id == user_id)
    return int(session.exec(query).one())


def adjust_audit(session: Session, counts: Sequence[tuple[date, str, int, int]]) -> None:
    """Add (day, action, user id or 0, n) to ``audit_counts``, n negative for events archived (the
    events written or deleted past the ORM: ``services.archive``)."""
    for day, action, user_id, n in counts:
        values = {"day": day, "action": action, "user_id": user_id, "n": n}
        _upsert(session, AuditCount.__table__, ["day", "action", "user_id"], values, ["n"])  # type: ignore[attr-defined]
    session.execute(delete(AuditCount).where(col(AuditCount.n) == 0))
