"""Issue 45: the audit log's archive round trip (SQLite and PostgreSQL): `oncolens audit archive` moves
the events before a day into a verified file and out of the database and its kept counts; a changed or
cut file is refused; `oncolens audit restore` puts the very same events back, once."""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from oncolens.cli.main import app
from oncolens.errors import InvalidInput, PermissionDenied
from oncolens.services.archive import archive, restore, verify
from oncolens.services.audit import Actor, audit
from oncolens.store.db import make_engine, upgrade
from oncolens.store.db.models import AuditEvent, Role, User, utcnow
from oncolens.store.views import as_utc
from tests.db.test_case_counts import audit_kept, audit_recount

ADMIN = Actor(User(email="command line", role=Role.admin.value, hashed_password=""), channel="command line")
OWN = ("audit_archive", "audit_restore")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    with Session(engine) as session:  # each test starts from an empty log
        for event in session.exec(select(AuditEvent)).all():
            session.delete(event)
        session.commit()
        from oncolens.store.stats import rebuild

        rebuild(session)
    yield engine
    engine.dispose()


def seed_events(engine: Engine) -> None:
    """40 events over the last 10 days, of three actions, with and without a user."""
    now = utcnow()
    with Session(engine) as session:
        doctor = session.exec(select(User).where(User.email == "doc@clinic.org")).first()
        if doctor is None:
            doctor = User(email="doc@clinic.org", role=Role.clinician.value, hashed_password="x")
            session.add(doctor)
            session.commit()
        for i in range(40):
            event = audit(
                session, doctor if i % 2 else None, ("view", "image_view", "report")[i % 3], f"case{i}", f"é {i}"
            )
            event.at = now - timedelta(days=i % 10, minutes=i)
        session.commit()


def dump(engine: Engine) -> list[tuple[object, ...]]:
    with Session(engine) as session:
        rows = session.exec(select(AuditEvent).where(col(AuditEvent.action).not_in(OWN)).order_by(col(AuditEvent.id)))
        return [(e.id, as_utc(e.at), e.user_id, e.actor, e.action, e.case_id, e.detail, e.client) for e in rows]


def counts_match(engine: Engine) -> bool:
    with Session(engine) as session:
        return audit_kept(session) == audit_recount(session)


def test_archive_then_restore_gives_back_the_same_events(engine: Engine, tmp_path: Path) -> None:
    seed_events(engine)
    before = dump(engine)
    cutoff = utcnow().date() - timedelta(days=3)
    older = [row for row in before if as_utc(row[1]).date() < cutoff]  # type: ignore[attr-defined]
    path = tmp_path / "audit-old.jsonl.gz"
    with Session(engine) as session:
        report = archive(session, ADMIN, cutoff, path)
    assert report.events == len(older) > 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify(path)["events"] == len(older) and not path.with_name(path.name + ".partial").exists()
    kept = dump(engine)
    assert kept == [row for row in before if row not in older] and counts_match(engine)
    with Session(engine) as session:
        note = session.exec(select(AuditEvent).where(AuditEvent.action == "audit_archive")).one()
        assert f"{len(older)} event(s) before {cutoff}" in note.detail and report.sha256 in note.detail

        with pytest.raises(InvalidInput, match="never overwrites"):
            archive(session, ADMIN, cutoff, path)
        with pytest.raises(InvalidInput, match="in the future"):
            archive(session, ADMIN, utcnow().date() + timedelta(days=2), tmp_path / "later.gz")
        clinician = Actor(User(email="doc@clinic.org", role=Role.clinician.value, hashed_password=""))
        with pytest.raises(PermissionDenied):
            archive(session, clinician, cutoff, tmp_path / "theirs.gz")

    lines = gzip.decompress(path.read_bytes()).decode().splitlines(keepends=True)
    changed = tmp_path / "changed.gz"
    changed.write_bytes(gzip.compress("".join([lines[0].replace("é", "e"), *lines[1:]]).encode()))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress("".join(lines[:-2] + lines[-1:]).encode()))
    torn = tmp_path / "torn.gz"
    torn.write_bytes(path.read_bytes()[:-20])
    with Session(engine) as session:
        for bad, why in (
            (changed, "does not match its trailer"),
            (cut, "does not match its trailer"),
            (torn, "not an"),
        ):
            with pytest.raises(InvalidInput, match=why):
                restore(session, ADMIN, bad)
    assert dump(engine) == kept

    with Session(engine) as session:
        assert restore(session, ADMIN, path).events == len(older)
    assert dump(engine) == before and counts_match(engine)
    with Session(engine) as session, pytest.raises(InvalidInput, match="in the database already"):
        restore(session, ADMIN, path)
    assert dump(engine) == before and counts_match(engine)
    with Session(engine) as session:  # new events still get fresh ids
        audit(session, None, "view", "after", "")
        session.commit()
    assert len(dump(engine)) == len(before) + 1


def test_the_commands_archive_and_restore(engine: Engine, database_url: str, tmp_path: Path) -> None:
    seed_events(engine)
    before = dump(engine)
    env = {
        "ONCOLENS_DATA_DIR": str(tmp_path),
        "ONCOLENS_DATABASE_URL": database_url,
        "ONCOLENS_SECRET_KEY": "test-secret-key-that-is-long-enough-for-hs256",
    }
    path = tmp_path / "old.jsonl.gz"
    day = (utcnow().date() - timedelta(days=5)).isoformat()
    runner = CliRunner()
    done = runner.invoke(app, ["audit", "archive", "--before", day, "--to", str(path)], env=env)
    assert done.exit_code == 0, done.output
    assert "archived" in done.output and str(path) in done.output and len(dump(engine)) < len(before)
    bad = runner.invoke(app, ["audit", "archive", "--before", "yesterday", "--to", str(tmp_path / "x.gz")], env=env)
    assert bad.exit_code == 2 and "a date is YYYY-MM-DD" in bad.output
    again = runner.invoke(app, ["audit", "restore", str(path)], env=env)
    assert again.exit_code == 0 and "restored" in again.output and dump(engine) == before
    twice = runner.invoke(app, ["audit", "restore", str(path)], env=env)
    assert twice.exit_code == 2 and "in the database already" in twice.output
