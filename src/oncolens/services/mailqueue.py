"""The e-mail queue: letters are written in the transaction of the request that asks for them and
sent later by the server's own drainer, never inside a request.

So an answer that must not tell whether an address has an account (reset, sign-up) costs the same
either way, and the mail work cannot be seen in the timing of the next request either (the drainer
runs every ``ONCOLENS_MAIL_POLL_S`` seconds, not when a letter arrives). A drainer claims rows in a
short transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, then a conditional UPDATE that only one
claimer can win on any database), commits, and only then talks to the SMTP server: no database
connection waits on the mail server, and several workers or replicas never send one letter twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, func, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from oncolens.accounts.mail import Letter, Mailer, MailFailed
from oncolens.services.audit import audit
from oncolens.store.db.models import MailQueue, utcnow

log = logging.getLogger("oncolens.mail")

MAX_ATTEMPTS = 5
CLAIM_FOR = timedelta(minutes=5)  # a drainer that dies mid-send leaves its claim to lapse
RETRY_AFTER_S = (30, 120, 600, 1800)  # waits after the 1st, 2nd, ... failed attempt


def enqueue(session: Session, letter: Letter) -> None:
    """Queue ``letter``; it leaves with the caller's commit (and not at all on a rollback)."""
    session.add(MailQueue(recipient=letter.to[:255], letter=letter.to_json()))


def claim(engine: Engine, limit: int = 20) -> list[MailQueue]:
    """Up to ``limit`` due letters, now claimed by this drainer (committed before any is sent)."""
    now = utcnow()
    with Session(engine, expire_on_commit=False) as session:
        due = (
            select(MailQueue)
            .where(
                col(MailQueue.next_attempt_at) <= now,
                or_(col(MailQueue.claimed_until).is_(None), col(MailQueue.claimed_until) < now),
            )
            .order_by(col(MailQueue.id))
            .limit(limit)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer at a time anyway
        )
        claimed = []
        for row in session.exec(due).all():
            won = session.exec(
                update(MailQueue)
                .where(
                    col(MailQueue.id) == row.id,
                    or_(col(MailQueue.claimed_until).is_(None), col(MailQueue.claimed_until) < now),
                )
                .values(claimed_until=now + CLAIM_FOR)
            )
            if won.rowcount == 1:
                claimed.append(row)
        session.commit()
        return claimed


def drain(engine: Engine, mailer: Mailer, limit: int = 20) -> int:
    """Send the due letters once (each by one drainer only); returns how many were sent.

    A sent letter's row is deleted (its link is a secret); a failed one is tried again later, up to
    ``MAX_ATTEMPTS`` times, then dropped with a ``mail_failed`` audit event.
    """
    sent = 0
    for row in claim(engine, limit):
        letter = Letter.from_json(row.letter)
        try:
            mailer.send(letter)
        except MailFailed as exc:
            _failed(engine, row, letter, str(exc))
            continue
        with Session(engine) as session:
            session.exec(delete(MailQueue).where(col(MailQueue.id) == row.id))
            session.commit()
        sent += 1
    return sent


def _failed(engine: Engine, row: MailQueue, letter: Letter, error: str) -> None:
    attempts = row.attempts + 1
    log.error("%s (attempt %d of %d)", error, attempts, MAX_ATTEMPTS)
    with Session(engine) as session:
        if attempts >= MAX_ATTEMPTS:
            session.exec(delete(MailQueue).where(col(MailQueue.id) == row.id))
            detail = f"{letter.subject} to {letter.to}: gave up after {attempts} tries"
            audit(session, None, "mail_failed", detail=detail)
        else:
            wait = RETRY_AFTER_S[min(attempts, len(RETRY_AFTER_S)) - 1]
            session.exec(
                update(MailQueue)
                .where(col(MailQueue.id) == row.id)
                .values(
                    attempts=attempts,
                    claimed_until=None,
                    next_attempt_at=utcnow() + timedelta(seconds=wait),
                    last_error=error[:2000],
                )
            )
        session.commit()


def waiting(engine: Engine) -> int:
    """How many letters wait in the queue (health, tests)."""
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(MailQueue)).one())
