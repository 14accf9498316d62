"""Checks ``oncolens serve`` runs before it loads any model, each failing in one sentence that names
the setting, the address (never its password) or the path to fix; and the lines it logs when it starts."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from oncolens.config import Settings


class StartupError(Exception):
    """What stops the server from starting, in one line."""


def load_settings() -> Settings:
    """The settings, or StartupError naming each bad ``ONCOLENS_*`` variable."""
    try:
        return Settings()
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()))
            name = f"ONCOLENS_{where.upper()}" if where else "the settings"
            parts.append(f"{name}: {error.get('msg', 'invalid')}")
        raise StartupError("; ".join(parts)) from None


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def check_data_dir(path: Path) -> None:
    """The data folder exists (made if missing) and takes new files."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"the data folder {path} is not writable (ONCOLENS_DATA_DIR): {reason}") from None


def check_database(url: str) -> None:
    """The database URL parses and the server answers (SQLite: the file can be opened)."""
    from oncolens.store.db import make_engine

    shown = safe_url(url)
    try:
        make_url(url)
    except ArgumentError:
        raise StartupError(f"ONCOLENS_DATABASE_URL is not a database URL: {shown}") from None
    try:
        engine = make_engine(url)
    except (ArgumentError, ImportError, OSError) as exc:
        raise StartupError(f"cannot use the database {shown} (ONCOLENS_DATABASE_URL): {exc}") from None
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StartupError(f"cannot reach the database {shown} (ONCOLENS_DATABASE_URL): {reason}") from None
    finally:
        engine.dispose()


def check_secret_key(settings: Settings) -> None:
    """A server off SQLite (a replica, perhaps) has the shared ``ONCOLENS_SECRET_KEY``."""
    from oncolens.accounts.auth import SecretKeyRequired, server_secret

    if not settings.on_sqlite:
        try:
            server_secret(settings.secret_key, settings.data_dir, on_sqlite=False)
        except SecretKeyRequired as exc:
            raise StartupError(str(exc)) from None


def check_image_store(settings: Settings) -> None:
    """The image store answers: the data folder is checked elsewhere; an S3 bucket must exist and let us in."""
    from oncolens.store.images import StoreError, open_store

    try:
        open_store(settings).check()
    except StoreError as exc:
        raise StartupError(f"{exc.detail} (ONCOLENS_IMAGE_STORE, ONCOLENS_S3_*)") from None


def check_port(host: str, port: int) -> None:
    """Nothing else listens on ``host:port`` yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if os.name != "nt":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use (--port): stop the other server or pick another port"
                ) from None
            raise StartupError(f"cannot listen on {host}:{port} (--host, --port): {exc.strerror or exc}") from None


def startup_lines(settings: Settings, model_ids: list[str], users: int) -> list[str]:
    """What the server says when it starts: where its data is, which models, and how to begin."""
    from oncolens.store.images import open_store

    lines = [
        f"data folder: {settings.data_dir}",
        f"database: {safe_url(settings.resolved_database_url)}",
        f"images: {open_store(settings).describe()}",
        f"models: {', '.join(model_ids) if model_ids else 'none installed'}",
        f"inference: {settings.threads or 'all'} ONNX Runtime thread(s) per model, "
        f"{settings.resolved_decode_threads} decoding thread(s), "
        f"batches of up to {settings.batch_max} backbone passes, precision setting {settings.precision}, "
        + (
            f"unused model memory released after {settings.release_memory_idle_s:g} s idle"
            if settings.release_memory_idle_s
            else "unused model memory kept (ONCOLENS_RELEASE_MEMORY_IDLE_S=0)"
        ),
        "e-mail: " + _mail_line(settings),
    ]
    if users == 0:
        lines.append(
            "no user exists yet: create the first administrator with `oncolens users create --admin --email ...`"
        )
    return lines


def count_users(url: str) -> int:
    from oncolens.store.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("select count(*) from users")).scalar_one())
    finally:
        engine.dispose()


def check_log_file(path: Path | None) -> None:
    """The log file (if one is set) can be appended to; its folder is made if missing."""
    if path is None:
        return
    where = f"cannot write the log file {path} (ONCOLENS_LOG_FILE)"
    if path.parent.exists() and not path.parent.is_dir():
        raise StartupError(f"{where}: {path.parent} is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise StartupError(f"{where}: {exc.strerror or exc}") from None


def _mail_line(settings: Settings) -> str:
    if not settings.mail_configured:
        return "off (ONCOLENS_SMTP_HOST not set)"
    if not settings.public_url:
        return f"SMTP {settings.smtp_host}, but off: links need ONCOLENS_PUBLIC_URL (never built from a request)"
    every = f"{settings.mail_poll_s:g}"
    return f"SMTP {settings.smtp_host}, links to {settings.public_url}, queued mail sent every {every} s"
