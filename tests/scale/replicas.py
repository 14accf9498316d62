"""Real ``oncolens serve`` processes for the scale-out tests: each on its own loopback port, with the
environment of a replica (shared database, secret key, image store), stopped at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.live import free_port

ONCOLENS = str(Path(sys.executable).with_name("oncolens"))


@dataclass
class Replica:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(env: dict[str, str], folder: Path, name: str, *args: str) -> Replica:
    port = free_port()
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [ONCOLENS, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=os.environ | env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Replica(f"http://127.0.0.1:{port}", process, log)


def wait_healthy(replica: Replica, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if replica.process.poll() is not None:
            raise AssertionError(f"the server exited with {replica.process.returncode}:\n{replica.output()[-3000:]}")
        try:
            if httpx.get(f"{replica.url}/api/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not answer in {timeout_s:.0f} s:\n{replica.output()[-3000:]}")


def stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        os.killpg(replica.process.pid, signal.SIGTERM)
        try:
            replica.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(replica.process.pid, signal.SIGKILL)
            replica.process.wait()


@contextmanager
def replicas(env: dict[str, str], folder: Path, count: int = 2, *args: str) -> Iterator[list[Replica]]:
    """``count`` servers started at the same moment (so they migrate an empty database together)."""
    started = [start(env, folder, f"replica-{i}", *args) for i in range(count)]
    try:
        for replica in started:
            wait_healthy(replica)
        yield started
    finally:
        for replica in started:
            stop(replica)


@contextmanager
def fresh_postgres_database(base_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``base_url`` (dropped afterwards)."""
    name = f"oncolens_replicas_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
