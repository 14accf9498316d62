"""Who did what: the actor of a service call and the audit event each call writes."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from oncolens.db.models import AuditEvent, User


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
) -> None:
    """Add an audit event to the session (committed with the change it records)."""
    session.add(
        AuditEvent(
            user_id=user.id if user else None,
            actor=user.email if user else "",
            action=action,
            case_id=case_id,
            detail=detail,
            client=client[:64],
        )
    )


def audit_by(session: Session, actor: Actor, action: str, case_id: str | None = None, detail: str = "") -> None:
    """An audit event of ``actor``'s call (its channel leads the detail)."""
    audit(session, actor.user, action, case_id, actor.detail(detail), actor.client)
