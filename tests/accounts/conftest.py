"""A real SMTP server on loopback (aiosmtpd) and apps that send their e-mail to it."""

from __future__ import annotations

import email
import email.policy
import re
import socket
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from oncolens.accounts import totp
from oncolens.accounts.auth import hash_password
from oncolens.app import create_app
from oncolens.services import mailqueue
from oncolens.store.db.models import User
from tests.api.conftest import db_settings

PASSWORD = "correct horse battery"


class Inbox:
    """Every message the SMTP server accepted, parsed."""

    def __init__(self) -> None:
        self.received: list[EmailMessage] = []

    def all(self) -> list[EmailMessage]:
        """Every message, once the servers' mail queues are sent (``settle_all``)."""
        settle_all()
        return list(self.received)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        self.received.append(message)
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        """The messages to ``address`` once the servers' mail queues are sent (``settle_all``)."""
        return [m for m in self.all() if address in m["X-Envelope-To"]]

    def last_to(self, address: str) -> EmailMessage:
        found = self.to(address)
        assert found, f"no e-mail to {address}; got {[m['X-Envelope-To'] for m in self.received]}"
        return found[-1]


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def html_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


# The engines of the apps made by make_client: their servers send e-mail from a queue, a moment after
# the request that queued it (services.mailqueue); the inbox waits for those queues to empty.
_ENGINES: list[Engine] = []
STOPPED_AFTER_S = 2.0  # an app whose queue sends nothing for this long has stopped (its test is over)


def register_engine(engine: Engine) -> None:
    """Let the inbox wait for this app's mail queue too (an app not made by make_client)."""
    _ENGINES.append(engine)


def settle_all(timeout_s: float = 10.0) -> None:
    """Wait until the mail queue of every app made here is empty (sent, or given up after failures)."""
    deadline = time.monotonic() + timeout_s
    for engine in list(_ENGINES):
        try:
            left, progress_at = mailqueue.waiting(engine), time.monotonic()
            while left and time.monotonic() < deadline:
                time.sleep(0.02)
                now_left = mailqueue.waiting(engine)
                if now_left < left:
                    left, progress_at = now_left, time.monotonic()
                elif time.monotonic() - progress_at > STOPPED_AFTER_S:
                    _ENGINES.remove(engine)  # nothing sent for a while: that app has stopped
                    break
        except Exception:  # the app's database is gone (its test module dropped it)
            _ENGINES.remove(engine)
    time.sleep(0.05)  # the SMTP server's handler has returned before the sender deletes the row


def link_in(message: EmailMessage, path: str) -> str:
    """The token of the first link to ``path`` in the plain-text body."""
    found = re.search(rf"https?://\S+{re.escape(path)}\?token=(\S+)", text_of(message))
    assert found, text_of(message)
    return found.group(1)


def code_in(message: EmailMessage) -> str:
    found = re.search(r"\b(\d{6})\b", text_of(message))
    assert found, text_of(message)
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def add_user(client: TestClient, email_address: str, role: str, password: str = PASSWORD) -> User:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        user = User(email=email_address, hashed_password=hash_password(password), role=role)
        session.add(user)
        session.commit()
        session.refresh(user)
        return user


def token_for(client: TestClient, email_address: str, password: str = PASSWORD, otp: str | None = None) -> str:
    data = {"username": email_address, "password": password} | ({"otp": otp} if otp else {})
    response = client.post("/api/v1/auth/token", data=data)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def bearer(client: TestClient, email_address: str, password: str = PASSWORD, otp: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(client, email_address, password, otp)}"}


def make_client(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, smtp_port: int | None, **overrides: object
) -> TestClient:
    mail = {"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_from": "OncoLens <noreply@clinic.org>"}
    defaults = {"public_url": "https://oncolens.clinic.org", "mail_poll_s": 0.05}
    settings = db_settings(
        tmp_path_factory.mktemp("data"),
        database_url,
        preload_models=False,
        clinic_name="Riverside Clinic",
        **(defaults | (mail if smtp_port else {}) | overrides),
    )
    app = create_app(settings)
    register_engine(app.state.engine)
    return TestClient(app)


class Clock:
    """``oncolens.accounts.totp.clock`` moved by hand, so each login can use a fresh time step."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def next_code(self, secret: str) -> str:
        self.now += totp.STEP_S
        return totp.code_at(secret, self.now)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    made = Clock()
    monkeypatch.setattr(totp, "clock", made)
    return made


def audit_actions(client: TestClient, admin_headers: dict[str, str]) -> list[str]:
    events = client.get("/api/v1/audit?limit=200", headers=admin_headers).json()["items"]
    return [e["action"] for e in events]
