"""A real uvicorn server on 127.0.0.1 for tests that talk HTTP from outside (browser, curl)."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI
from sqlmodel import Session

from oncolens.accounts.auth import hash_password
from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.store.db.models import User

PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(settings: Settings, users: dict[str, str]) -> Iterator[tuple[str, FastAPI]]:
    """Serve ``create_app(settings)`` on a free port with ``users`` (e-mail -> role) in its database."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    with Session(app.state.engine) as session:
        for email, role in users.items():
            session.add(User(email=email, hashed_password=hash_password(PASSWORD), role=role, full_name=email[:3]))
        session.commit()
    try:
        yield f"http://127.0.0.1:{server.config.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
