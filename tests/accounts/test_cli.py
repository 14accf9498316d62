"""``oncolens users``: the operator's way in on the server itself, with or without e-mail."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session, create_engine, select
from typer.testing import CliRunner

from oncolens.accounts import totp
from oncolens.cli.main import app
from oncolens.store.db.models import AuditEvent, User
from tests.accounts.conftest import Inbox, link_in, text_of

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ONCOLENS_DATA_DIR", str(tmp_path))
    for name in ("ONCOLENS_DATABASE_URL", "ONCOLENS_NEW_PASSWORD", "ONCOLENS_SMTP_HOST", "ONCOLENS_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def users(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, ["users", *args], input=stdin)
    return result.exit_code, result.output


def rows(data_dir: Path) -> dict[str, User]:
    engine = create_engine(f"sqlite:///{data_dir / 'oncolens.db'}")
    with Session(engine) as session:
        found = {u.email: u for u in session.exec(select(User)).all()}
    engine.dispose()
    return found


def test_the_first_admin_and_a_forgotten_password_without_e_mail(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = users("list")
    assert code == 0 and "no users yet: create the first administrator" in out
    code, out = users("create", "--email", "boss@clinic.org", "--admin", "--password-stdin", stdin="first passphrase\n")
    assert code == 0 and "created admin boss@clinic.org" in out
    code, out = users("list")
    assert code == 0 and "boss@clinic.org" in out and "admin" in out and "active" in out and " off " in out
    monkeypatch.setenv("ONCOLENS_NEW_PASSWORD", "second passphrase")
    code, out = users("set-password", "BOSS@clinic.org")
    assert code == 0 and "password set for boss@clinic.org; its earlier sessions have ended" in out
    before = rows(data_dir)["boss@clinic.org"]
    assert before.token_version == 1
    code, out = users("set-password", "ghost@clinic.org")
    assert code == 2 and "no user with e-mail ghost@clinic.org" in out
    code, out = users("set-password", "boss@clinic.org", "--password-stdin", stdin="short\n")
    assert code == 2 and "at least 10 characters" in out
    # A password in argv shows in the process list (finding 18): refused, pointing to the safe ways.
    code, out = users("set-password", "boss@clinic.org", "--password", "a long passphrase")
    assert code == 2 and "--password is refused" in out and "--password-stdin" in out
    assert rows(data_dir)["boss@clinic.org"].token_version == 1, "nothing changed"
    code, out = users("set-password", "boss@clinic.org", "--password-stdin", stdin="\n")
    assert code == 2 and "standard input gave no password" in out


def test_deactivate_activate_and_reset_a_second_factor(data_dir: Path) -> None:
    users("create", "--email", "doc@clinic.org", "--password-stdin", stdin="a long password\n")
    code, out = users("deactivate", "doc@clinic.org")
    assert code == 0 and rows(data_dir)["doc@clinic.org"].is_active is False
    assert "deactivated" in users("list")[1]
    assert users("activate", "doc@clinic.org")[0] == 0 and rows(data_dir)["doc@clinic.org"].is_active
    code, out = users("reset-2fa", "doc@clinic.org")
    assert code == 2 and "doc@clinic.org has no second factor to reset" in out
    engine = create_engine(f"sqlite:///{data_dir / 'oncolens.db'}")
    with Session(engine) as session:
        doc = session.exec(select(User).where(User.email == "doc@clinic.org")).one()
        doc.totp_secret = totp.seal(totp.new_secret(), "key")
        doc.totp_enabled_at = doc.created_at
        session.add(doc)
        session.commit()
        code, out = users("reset-2fa", "doc@clinic.org")
        assert code == 0 and "second factor of doc@clinic.org reset" in out
        details = [e.detail for e in session.exec(select(AuditEvent).where(AuditEvent.action == "2fa_reset"))]
    engine.dispose()
    assert details == ["command line: doc@clinic.org"]
    assert rows(data_dir)["doc@clinic.org"].totp_enabled_at is None


def test_invite_on_the_command_line_sends_the_e_mail(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, smtp: tuple[Inbox, int]
) -> None:
    inbox, port = smtp
    code, out = users("invite", "new@clinic.org")
    assert code == 2 and "e-mail is not set up on this server" in out
    monkeypatch.setenv("ONCOLENS_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("ONCOLENS_SMTP_PORT", str(port))
    code, out = users("invite", "new@clinic.org")
    assert code == 2 and "needs ONCOLENS_PUBLIC_URL" in out
    monkeypatch.setenv("ONCOLENS_PUBLIC_URL", "https://oncolens.clinic.org")
    code, out = users("invite", "new@clinic.org", "--role", "viewer")
    assert code == 0 and "invitation sent to new@clinic.org (viewer)" in out
    message = inbox.last_to("new@clinic.org")
    assert "The OncoLens administrator invites you" in text_of(message)
    assert link_in(message, "/invite")
    assert "invited" in users("list")[1]
