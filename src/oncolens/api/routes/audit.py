from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from oncolens.api.records import AuditEventPublic, AuditPage
from oncolens.http.deps import DB_INT_MAX, AdminUser, Offset, SessionDep
from oncolens.services.audit import audit_events

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
    rows, total = audit_events(session, action, case_id, user_id, limit, offset)
    return AuditPage(items=[AuditEventPublic.of(e) for e in rows], total=total, limit=limit, offset=offset)
