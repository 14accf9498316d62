"""Case counts maintained with every case write (``case_counts``), for the dashboard.

``bump`` adds or takes away one case in the transaction that creates, reviews or deletes it (an
upsert, safe under concurrent writers on SQLite and PostgreSQL); ``rebuild`` recounts every case (data
loaded by SQL, or a check). Days are UTC dates of the cases' creation.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import delete, func, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from oncolens.store.db.models import Case, CaseCount
from oncolens.store.views import as_utc

# The recount as one INSERT ... SELECT per dialect (also run by migration 0006).
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


def bump(session: Session, case: Case, by: int, status: str | None = None) -> None:
    """Count ``case`` (with ``status``, default its own) ``by`` more (+1 made, -1 deleted or moved)."""
    values = {
        "day": as_utc(case.created_at).date(),
        "model_id": case.model_id,
        "risk_level": case.risk_level,
        "status": status or case.status,
        "n": by,
    }
    table = CaseCount.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert(table) if dialect == "postgresql" else sqlite_insert(table)
    statement = insert.values(**values).on_conflict_do_update(
        index_elements=["day", "model_id", "risk_level", "status"], set_={"n": table.c.n + by}
    )
    session.execute(statement)


def rebuild(session: Session) -> int:
    """Recount every case into ``case_counts``; returns how many cases were counted."""
    session.execute(delete(CaseCount))
    session.execute(text(REBUILD[session.get_bind().dialect.name]))
    session.execute(delete(CaseCount).where(col(CaseCount.n) == 0))
    session.commit()
    return int(session.exec(select(func.coalesce(func.sum(CaseCount.n), 0))).one())


def counts_since(session: Session, since: date | None = None) -> list[CaseCount]:
    query = select(CaseCount).where(col(CaseCount.n) != 0)
    if since is not None:
        query = query.where(col(CaseCount.day) >= since)
    return list(session.exec(query))


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
