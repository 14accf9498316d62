"""The audit log's retention: old events moved to a verified archive file, and back.

``archive`` writes every audit event before a day to a new gzip file of JSON lines (one event a line,
then a trailer with the count and the SHA-256 of the event lines), reads the file back and checks it
against the database, and only then deletes those events and takes them out of the kept counts, in one
transaction. ``restore`` checks a file's trailer and puts its events back with their own ids. Both are
audited. SQLite and PostgreSQL alike: a clinic's server and a programme's share one retention story.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, text
from sqlmodel import Session, col, select

from oncolens.errors import InvalidInput, PermissionDenied
from oncolens.services.audit import Actor, audit_by
from oncolens.store import stats
from oncolens.store.db.models import AuditEvent, Role, utcnow
from oncolens.store.views import as_utc

FORMAT = "oncolens-audit-archive"
VERSION = 1
BATCH = 5000
FIELDS = ("id", "at", "user_id", "actor", "action", "case_id", "detail", "client")


@dataclass(frozen=True)
class ArchiveReport:
    path: Path
    events: int
    sha256: str
    first: datetime | None
    last: datetime | None


def _line(event: AuditEvent) -> str:
    values: dict[str, Any] = {name: getattr(event, name) for name in FIELDS}
    values["at"] = as_utc(event.at).isoformat()
    return json.dumps(values, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _events_before(session: Session, cutoff: datetime, last_id: int) -> Iterator[AuditEvent]:
    """The events before ``cutoff`` up to id ``last_id``, oldest first, a batch at a time."""
    after = 0
    while True:
        batch = session.exec(
            select(AuditEvent)
            .where(col(AuditEvent.at) < cutoff, col(AuditEvent.id) > after, col(AuditEvent.id) <= last_id)
            .order_by(col(AuditEvent.id))
            .limit(BATCH)
        ).all()
        if not batch:
            return
        yield from batch
        after = int(batch[-1].id or 0)
        session.expunge_all()


def _lines(path: Path) -> Iterator[str]:
    """The lines of a gzip file, or InvalidInput saying it is not one."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            for line in stream:
                yield line.rstrip("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path} is not an audit archive (gzip of JSON lines): {exc}") from None


def _json(path: Path, line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise InvalidInput(f"{path} has a line that is not JSON: {exc}") from None


def verify(path: Path) -> dict[str, Any]:
    """An archive's trailer, once its event lines are read and match its count and SHA-256 (streamed:
    a file of millions of events is checked in constant memory)."""
    digest, count, last = hashlib.sha256(), 0, None
    for line in _lines(path):
        if last is not None:
            digest.update((last + "\n").encode())
            count += 1
        last = line
    trailer = _json(path, last) if last is not None else None
    if not isinstance(trailer, dict) or trailer.get("format") != FORMAT:
        raise InvalidInput(f"{path} has no {FORMAT} trailer: it is cut short or not an archive")
    if trailer.get("events") != count or trailer.get("sha256") != digest.hexdigest():
        raise InvalidInput(
            f"{path} does not match its trailer ({count} event(s), sha256 {digest.hexdigest()[:12]}…; the "
            f"trailer says {trailer.get('events')} and {str(trailer.get('sha256'))[:12]}…): it was changed or cut"
        )
    return trailer


def _events(path: Path, count: int) -> Iterator[dict[str, Any]]:
    """The events of a verified archive, as rows for the table."""
    for index, line in enumerate(_lines(path)):
        if index == count:
            return
        event = _json(path, line)
        if not isinstance(event, dict) or set(event) != set(FIELDS):
            raise InvalidInput(f"{path}: event {index + 1} does not have the fields {', '.join(FIELDS)}")
        try:
            yield event | {"at": as_utc(datetime.fromisoformat(event["at"])), "id": int(event["id"])}
        except (TypeError, ValueError):
            raise InvalidInput(f"{path}: event {index + 1} has an id or a time that is not one") from None


def _require_admin(actor: Actor) -> None:
    if actor.user.role != Role.admin.value:
        raise PermissionDenied("the audit log's archive is for administrators")


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, UTC)


def _range(cutoff: datetime, last_id: int) -> Any:
    return (col(AuditEvent.at) < cutoff) & (col(AuditEvent.id) <= last_id)


def archive(session: Session, actor: Actor, before: date, path: Path) -> ArchiveReport:
    """Move every audit event before ``before`` (a UTC day) into a new archive file at ``path`` (admins only)."""
    _require_admin(actor)
    if before > utcnow().date():
        raise InvalidInput(f"--before {before} is in the future: only past days are archived")
    if path.exists():
        raise InvalidInput(f"{path} exists: an archive never overwrites a file")
    if not path.parent.is_dir():
        raise InvalidInput(f"{path.parent} is not a folder")
    cutoff = _day_start(before)
    last_id = int(session.exec(select(func.max(AuditEvent.id)).where(col(AuditEvent.at) < cutoff)).one() or 0)
    in_database = session.exec(select(func.count()).select_from(AuditEvent).where(_range(cutoff, last_id))).one()
    written, digest, counts = 0, hashlib.sha256(), Counter[tuple[date, str, int]]()
    first = last = None
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as stream:
            for event in _events_before(session, cutoff, last_id):
                line = (_line(event) + "\n").encode()
                stream.write(line)
                digest.update(line)
                written += 1
                at = as_utc(event.at)
                first, last = first or at, at
                counts[(at.date(), event.action, event.user_id or 0)] += 1
            trailer = {
                "format": FORMAT,
                "version": VERSION,
                "before": before.isoformat(),
                "events": written,
                "sha256": digest.hexdigest(),
            }
            stream.write((json.dumps(trailer, sort_keys=True) + "\n").encode())
        with partial.open("rb") as done:
            os.fsync(done.fileno())
        # Read back: the file must hold exactly what was read from the database, or nothing is deleted.
        if written != in_database or verify(partial)["sha256"] != digest.hexdigest():
            raise InvalidInput(
                f"the archive read back differs from the database ({written} of {in_database}): nothing was deleted"
            )
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    # The archive's own event first: it takes an id above every archived one, so SQLite (which may reuse
    # the highest ids of an emptied table) never hands an archived id out again.
    detail = f"{written} event(s) before {before} to {path.name} (sha256 {digest.hexdigest()})"
    audit_by(session, actor, "audit_archive", None, detail)
    session.flush()
    gone = session.execute(delete(AuditEvent).where(_range(cutoff, last_id)))
    if gone.rowcount != written:  # type: ignore[attr-defined]
        session.rollback()
        path.unlink(missing_ok=True)
        raise InvalidInput(f"{gone.rowcount} event(s) matched but {written} were archived: nothing was deleted")  # type: ignore[attr-defined]
    stats.adjust_audit(session, [(day, action, user, -n) for (day, action, user), n in counts.items()])
    session.commit()
    return ArchiveReport(path, written, digest.hexdigest(), first, last)


def restore(session: Session, actor: Actor, path: Path) -> ArchiveReport:
    """Put the events of an archive file back with their own ids; all or nothing (refused if an id is
    taken). Admins only."""
    _require_admin(actor)
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file")
    trailer = verify(path)
    counts = Counter[tuple[date, str, int]]()
    first = last = None
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        ids = [row["id"] for row in batch]
        taken = session.exec(select(func.count()).select_from(AuditEvent).where(col(AuditEvent.id).in_(ids))).one()
        if taken:
            session.rollback()
            raise InvalidInput(
                f"{taken} event(s) of {path.name} are in the database already (restored before?): nothing was restored"
            )
        session.execute(insert(AuditEvent.__table__), batch)  # type: ignore[attr-defined]
        batch.clear()

    for row in _events(path, int(trailer["events"])):
        batch.append(row)
        counts[(row["at"].date(), row["action"], row["user_id"] or 0)] += 1
        first, last = first or row["at"], row["at"]
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    if session.get_bind().dialect.name == "postgresql":  # ids given by hand: the sequence stays above them
        session.execute(
            text(
                "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), GREATEST((SELECT max(id) FROM "
                "audit_events), pg_sequence_last_value(pg_get_serial_sequence('audit_events', 'id')::regclass), 1))"
            )
        )
    stats.adjust_audit(session, [(day, action, user, n) for (day, action, user), n in counts.items()])
    detail = (
        f"{trailer['events']} event(s) before {trailer.get('before')} from {path.name} (sha256 {trailer['sha256']})"
    )
    audit_by(session, actor, "audit_restore", None, detail)
    session.commit()
    return ArchiveReport(path, int(trailer["events"]), str(trailer["sha256"]), first, last)
