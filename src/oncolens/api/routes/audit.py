from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func
from sqlmodel import col, select

from oncolens.api.deps import DB_INT_MAX, AdminUser, Offset, SessionDep
from oncolens.api.records import AuditEventPublic, AuditPage
from oncolens.db.models import AuditEvent

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=AuditPage)
def list_audit(
    _: AdminUser,
    session: SessionDep,
    action: str | None = None,
    case_id: str | None = None,
    user_id: Annotated[int | None, Query(ge=0, le=DB_INT_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> AuditPage:
    """Who did what to which case and when, newest first (admins only)."""
    query = select(AuditEvent)
    if action:
        query = query.where(AuditEvent.action == action)
    if case_id:
        query = query.where(AuditEvent.case_id == case_id)
    if user_id is not None:
        query = query.where(AuditEvent.user_id == user_id)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(AuditEvent.id).desc()).offset(offset).limit(limit)).all()
    return AuditPage(items=[AuditEventPublic.of(e) for e in rows], total=total, limit=limit, offset=offset)
