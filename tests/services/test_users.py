"""User accounts through the service, whichever edge calls it: the CLI audits like the API does."""

from pathlib import Path

import pytest
from sqlmodel import Session, create_engine, select
from typer.testing import CliRunner

from oncolens.cli.main import app
from oncolens.store.db.models import AuditEvent, User


def test_cli_users_create_writes_the_same_audit_event_as_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCOLENS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("ONCOLENS_DATABASE_URL", raising=False)
    args = ["users", "create", "--email", "Chief@Clinic.org", "--password-stdin", "--admin"]
    result = CliRunner().invoke(app, args, input="a long password\n")
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(app, args, input="a long password\n")
    assert again.exit_code == 2 and "a user with e-mail chief@clinic.org already exists" in again.output
    weak = CliRunner().invoke(
        app, ["users", "create", "--email", "x@y.org", "--password-stdin", "--role", "viewer"], input="short\n"
    )
    assert weak.exit_code == 2 and "at least 10 characters" in weak.output
    role = CliRunner().invoke(
        app, ["users", "create", "--email", "x@y.org", "--password-stdin", "--role", "boss"], input="a long password\n"
    )
    assert role.exit_code == 2 and "unknown role 'boss'" in role.output
    engine = create_engine(f"sqlite:///{tmp_path / 'oncolens.db'}")
    with Session(engine) as session:
        users = session.exec(select(User)).all()
        events = session.exec(select(AuditEvent).where(AuditEvent.action == "user_create")).all()
    engine.dispose()
    assert [(u.email, u.role) for u in users] == [("chief@clinic.org", "admin")]
    assert [e.detail for e in events] == ["command line: chief@clinic.org as admin"]
