"""Who did what: the actor of a service call and the audit event each call writes."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from oncolens.store import stats  # its mapper event counts every audit event written
from oncolens.store.db.models import AuditEvent, User

log = logging.getLogger("oncolens.audit")


@dataclass(frozen=True)
class Actor:
    """The user behind a call, the client address it came from and the channel (``web``, ``oral app``;
    empty for the API) that the audit trail records with it."""

    user: User
    client: str = ""
    channel: str = ""

    def detail(self, text: str = "") -> str:
        """``text`` prefixed with the channel: ``web: status; status reviewed``."""
        if self.channel and text:
            return f"{self.channel}: {text}"
        return self.channel or text


def audit(
    session: Session, user: User | None, action: str, case_id: str | None = None, detail: str = "", client: str = ""
) -> AuditEvent:
    """Add an audit event to the session (committed with the change it records); returns it."""
    event = AuditEvent(
        user_id=user.id if user else None,
        actor=user.email if user else "",
        action=action,
        case_id=case_id,
        detail=detail,
        client=client[:64],
    )
    session.add(event)
    return event


def audit_by(session: Session, actor: Actor, action: str, case_id: str | None = None, detail: str = "") -> AuditEvent:
    """An audit event of ``actor``'s call (its channel leads the detail)."""
    return audit(session, actor.user, action, case_id, actor.detail(detail), actor.client)


def out_of_space(exc: BaseException) -> bool:
    """True for a database write that failed because its disk is full (SQLite or PostgreSQL)."""
    orig = getattr(exc, "orig", exc)
    text = str(orig).lower()
    return (
        getattr(orig, "sqlstate", None) == "53100"  # PostgreSQL disk_full
        or "database or disk is full" in text
        or "no space left on device" in text
    )


class DeferredAudit:
    """Audit events of reads that could not be written because the disk was full: kept in memory
    (the read is not refused for it) and written by ``flush`` once there is space; logged either way."""

    def __init__(self) -> None:
        self._events: list[AuditEvent] = []
        self._lock = threading.Lock()

    def keep(self, event: AuditEvent) -> None:
        with self._lock:
            self._events.append(event)
        log.warning(
            "the disk is full: the audit event %s of case %s is kept in memory and written once there is space",
            event.action,
            event.case_id,
        )

    def __len__(self) -> int:
        return len(self._events)

    def flush(self, engine: Engine) -> int:
        """Write the kept events; returns how many were written (none while the disk is still full)."""
        with self._lock:
            events, self._events = self._events, []
        if not events:
            return 0
        try:
            with Session(engine) as session:
                session.add_all(AuditEvent(**event.model_dump(exclude={"id"})) for event in events)
                session.commit()
        except OperationalError:
            with self._lock:
                self._events = events + self._events
            return 0
        log.info("wrote %d audit event(s) kept while the disk was full", len(events))
        return len(events)


deferred_audit = DeferredAudit()


def commit_read_audit(session: Session, actor: Actor, action: str, case_id: str | None, detail: str = "") -> None:
    """Commit the audit event of a read; on a full disk the event waits in ``deferred_audit`` and the
    read goes on (a clinician can still open a case while the disk is being freed)."""
    event = audit_by(session, actor, action, case_id, detail)
    try:
        session.commit()
    except OperationalError as exc:
        session.rollback()
        if not out_of_space(exc):
            raise
        deferred_audit.keep(AuditEvent(**event.model_dump(exclude={"id"})))


# Reads of a case's images and heat-maps: one per image shown, so they outnumber every other event.
VIEW_ACTIONS = ("image_view", "heatmap_view")


def audit_events(
    session: Session,
    action: str | None = None,
    case_id: str | None = None,
    user_id: int | None = None,
    limit: int = 100,
    offset: int = 0,
    hide_views: bool = False,
    before_id: int | None = None,
    count: bool = True,
) -> tuple[list[AuditEvent], int]:
    """Audit events newest first, filtered, one page of them (after ``offset`` rows, or below the event
    id ``before_id``: keyset paging, as cheap deep down as on top), and how many match in all (-1
    without ``count``). The total comes from the counts kept with every event (``audit_counts``), or
    is counted for one case's events (an index range of a few rows)."""
    query = select(AuditEvent)
    if action:
        query = query.where(AuditEvent.action == action)
    if case_id:
        query = query.where(AuditEvent.case_id == case_id)
    if user_id is not None:
        query = query.where(AuditEvent.user_id == user_id)
    if hide_views and not action:
        query = query.where(col(AuditEvent.action).not_in(VIEW_ACTIONS))
    total = -1
    if count and case_id:
        total = session.exec(select(func.count()).select_from(query.subquery())).one()
    elif count:
        total = stats.audit_total(session, action, user_id, VIEW_ACTIONS if hide_views else ())
    if before_id is not None:
        query = query.where(col(AuditEvent.id) < before_id)
    rows = session.exec(query.order_by(col(AuditEvent.id).desc()).offset(offset).limit(limit)).all()
    return list(rows), int(total)
