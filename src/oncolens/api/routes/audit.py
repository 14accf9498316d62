from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from oncolens.api.records import AuditEventPublic, AuditPage
from oncolens.errors import InvalidInput
from oncolens.http.deps import DB_INT_MAX, AdminUser, Cursor, Offset, SessionDep
from oncolens.services.audit import audit_events
from oncolens.services.paging import decode_event_cursor, encode_cursor

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
    cursor: Cursor = None,
) -> AuditPage:
    """Who did what to which case and when, newest first (admins only). Page with ``cursor`` (the
    ``next_cursor`` of the page before): each page costs the same however deep; ``offset`` still works."""
    if cursor is not None and offset:
        raise InvalidInput("send cursor or offset, not both")
    before = decode_event_cursor(cursor) if cursor is not None else None
    rows, total = audit_events(session, action, case_id, user_id, limit + 1, offset, before_id=before)
    more = len(rows) > limit
    rows = rows[:limit]
    following = encode_cursor("audit", rows[-1].id) if more and rows else None
    items = [AuditEventPublic.of(e) for e in rows]
    source = "counted" if case_id else "maintained"  # one case's events are counted (audit_events)
    return AuditPage(items=items, total=total, total_source=source, limit=limit, offset=offset, next_cursor=following)
