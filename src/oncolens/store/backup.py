"""``oncolens backup DEST`` and ``oncolens restore SRC``: a consistent copy of a running server's data.

A backup folder holds the database (SQLite: a copy made by SQLite's online backup API; PostgreSQL: a
``pg_dump`` custom-format archive), every image the database refers to (``images/ab/<name>``, from the
folder or the S3 bucket), ``secret.key`` (the key that signs sessions and encrypts second factors) and
``manifest.json`` with the sha256 and size of each file. Files are 0600 and the backup folder 0700.

Consistency while clients keep posting cases: the database copy is one snapshot, and the images are
the ones *that snapshot* names. An image is written before its case commits, so every image of a case
in the snapshot exists when it is copied (unless the case was deleted meanwhile: the manifest lists it).
On PostgreSQL the image names are read in the very transaction whose snapshot ``pg_dump`` exports.

Restore checks every sum first, refuses a target that already holds data unless ``force``, then puts
the database, the images (under their own names) and the key in place. The server migrates a restored
database to its own release when it starts; rolling back an upgrade is restoring the backup taken
before it with the old release.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url

from oncolens import __version__
from oncolens.accounts.auth import server_secret
from oncolens.config import Settings
from oncolens.store.db import make_engine
from oncolens.store.images import FileStore, ImageStore, open_store

MANIFEST = "manifest.json"
SQLITE_FILE = "oncolens.db"
PG_DUMP_FILE = "database.pgdump"
KEY_FILE = "secret.key"
FORMAT = 1


class BackupError(Exception):
    """A backup or restore that cannot go on, in one sentence that says what to do."""


@dataclass
class BackupReport:
    folder: Path
    database: str  # "sqlite" or "postgresql"
    revision: str | None
    cases: int
    images: int
    missing: list[str] = field(default_factory=list)  # images of cases deleted while the backup ran
    bytes: int = 0


@dataclass
class RestoreReport:
    database: str
    revision: str | None
    cases: int
    images: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _private_write(path: Path, data: bytes) -> None:
    _private_dir(path.parent)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as ``pg_dump``/``pg_restore`` read it (no ``+driver``)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            f"{name} is not installed; a PostgreSQL backup needs the PostgreSQL client tools "
            "(Debian: apt-get install postgresql-client, of the server's major version or newer)"
        )
    return found


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise BackupError(f"{what} failed: {message[-1] if message else f'exit status {done.returncode}'}")


def _stored_names(connection: Connection) -> list[str]:
    return [str(row[0]) for row in connection.execute(text("SELECT stored_name FROM case_images"))]


def _counts(connection: Connection) -> tuple[int, str | None]:
    cases = int(connection.execute(text("SELECT count(*) FROM cases")).scalar_one())
    revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return cases, None if revision is None else str(revision)


def _empty_or_new(folder: Path, what: str) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BackupError(f"{what} {folder} is not an empty folder; choose a new or empty one")


@contextmanager
def _sqlite_snapshot(url: str, dest: Path) -> Iterator[Connection]:
    """Copy the live SQLite database into ``dest`` (online backup API), then open the copy."""
    source_path = make_url(url).database
    if not source_path or source_path == ":memory:" or not Path(source_path).is_file():
        raise BackupError(f"there is no SQLite database at {source_path}; is ONCOLENS_DATA_DIR the server's?")
    _sqlite_copy(Path(source_path), dest)
    # Read-only and without the server's pragmas: the copy stays one self-contained file.
    engine = create_engine(f"sqlite:///file:{dest}?mode=ro&uri=true")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


@contextmanager
def _pg_snapshot(engine: Engine, dest: Path) -> Iterator[Connection]:
    """Hold a REPEATABLE READ transaction, ``pg_dump`` its exported snapshot into ``dest`` and yield the
    transaction, so the image names read in it are exactly those of the dump."""
    pg_dump = _pg_tool("pg_dump")
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            snapshot = connection.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            schema = connection.execute(text("SELECT current_schema()")).scalar_one()
            _run(
                [
                    pg_dump,
                    "--format=custom",
                    "--no-owner",
                    "--no-privileges",
                    f"--snapshot={snapshot}",
                    f"--schema={schema}",
                    f"--file={dest}",
                    f"--dbname={libpq_url(engine.url.render_as_string(hide_password=False))}",
                ],
                "pg_dump",
            )
            dest.chmod(0o600)
            yield connection


def backup(settings: Settings, dest: Path, progress: Callable[[str], None] = lambda _: None) -> BackupReport:
    """Write a consistent backup of the server's database, images and key into the new folder ``dest``."""
    _empty_or_new(dest, "the backup folder")
    _private_dir(dest)
    url = settings.resolved_database_url
    kind = "sqlite" if url.startswith("sqlite") else "postgresql"
    store = open_store(settings)
    engine = None if kind == "sqlite" else make_engine(url)
    database_file = dest / (SQLITE_FILE if kind == "sqlite" else PG_DUMP_FILE)
    try:
        progress(f"copying the {kind} database")
        snapshot = _sqlite_snapshot(url, database_file) if engine is None else _pg_snapshot(engine, database_file)
        with snapshot as connection:
            cases, revision = _counts(connection)
            schema = None if engine is None else str(connection.execute(text("SELECT current_schema()")).scalar_one())
            names = _stored_names(connection)
            progress(f"copying {len(names)} image(s) of {cases} case(s) from the {store.describe()}")
            missing = _copy_images(store, names, FileStore(dest / "images"))
    finally:
        if engine is not None:
            engine.dispose()
    _private_write(dest / KEY_FILE, server_secret(settings.secret_key, settings.data_dir, settings.on_sqlite).encode())
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    listed: dict[str, dict[str, Any]] = {
        str(p.relative_to(dest)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files
    }
    manifest = {
        "format": FORMAT,
        "oncolens_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": kind,
        "schema": schema,
        "alembic_revision": revision,
        "cases": cases,
        "images": len(names) - len(missing),
        "missing_images": missing,
        "files": listed,
    }
    _private_write(dest / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    total = sum(entry["bytes"] for entry in listed.values())
    return BackupReport(dest, kind, revision, cases, len(names) - len(missing), missing, total)


def _copy_images(store: ImageStore, names: list[str], copies: FileStore) -> list[str]:
    """Copy the named images into ``copies`` (the folder store's layout and durable 0600 writes)."""
    missing = []
    for name in names:
        try:
            data = store.read(name)
        except FileNotFoundError:  # its case was deleted after the snapshot: nothing left to keep
            missing.append(name)
            continue
        copies.put(name, data)
    return missing


def read_manifest(src: Path) -> dict[str, Any]:
    """The backup's manifest, after checking every file it lists against its sha256 and size."""
    path = src / MANIFEST
    if not path.is_file():
        raise BackupError(f"{src} holds no {MANIFEST}: it is not an OncoLens backup folder")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackupError(f"{path} is not valid JSON ({exc}); the backup is damaged") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path} has format {manifest.get('format')!r}; this release reads format {FORMAT}")
    for name, entry in manifest["files"].items():
        file = src / name
        if not file.is_file():
            raise BackupError(f"the backup is incomplete: {name} is listed in its manifest but missing")
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise BackupError(f"the backup is damaged: {name} does not match its sha256 in the manifest")
    listed = set(manifest["files"]) | {MANIFEST}
    extra = sorted(
        str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and str(p.relative_to(src)) not in listed
    )
    if extra:
        raise BackupError(f"the backup folder holds files its manifest does not list ({', '.join(extra[:3])})")
    return manifest


def _target_data(settings: Settings, store: ImageStore) -> str | None:
    """What the restore target already holds (None when it is empty)."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and Path(path).is_file() and Path(path).stat().st_size > 0:
            return f"the database {path} exists"
    else:
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                tables = connection.execute(
                    text("SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()")
                ).scalar_one()
        finally:
            engine.dispose()
        if tables:
            return f"the database {make_url(url).render_as_string(hide_password=True)} holds {tables} table(s)"
    if next(iter(store.entries()), None) is not None:
        return f"the image store ({store.describe()}) holds files"
    return None


def restore(
    settings: Settings, src: Path, force: bool = False, progress: Callable[[str], None] = lambda _: None
) -> RestoreReport:
    """Check the backup in ``src`` and put it in place as this configuration's database, images and key.

    The server must be stopped. A target that already holds data is refused unless ``force``; with it,
    the database is replaced and the images no restored case refers to are removed.
    """
    manifest = read_manifest(src)
    url = settings.resolved_database_url
    kind = "sqlite" if url.startswith("sqlite") else "postgresql"
    if kind != manifest["database"]:
        raise BackupError(
            f"this backup holds a {manifest['database']} database but ONCOLENS_DATABASE_URL names a {kind} one; "
            "restore it into the same kind of database"
        )
    store = open_store(settings)
    held = _target_data(settings, store)
    if held and not force:
        raise BackupError(
            f"the target is not empty ({held}); restore into a fresh data folder, or pass --force to replace it"
        )
    progress(f"restoring the {kind} database")
    if kind == "sqlite":
        _restore_sqlite(src / SQLITE_FILE, Path(str(make_url(url).database)))
    else:
        _restore_postgresql(src / PG_DUMP_FILE, url, manifest.get("schema"))
    image_files = sorted(FileStore(src / "images").files())
    progress(f"restoring {len(image_files)} image(s) into the {store.describe()}")
    kept = set()
    for path in image_files:
        store.put(path.name, path.read_bytes())
        kept.add(path.name)
    if force:
        stale = [entry.name for entry in store.entries() if entry.name not in kept]
        store.remove(stale)
    key = (src / KEY_FILE).read_bytes()
    _private_write(settings.data_dir / KEY_FILE, key)
    if settings.secret_key and settings.secret_key.encode() != key.strip():
        progress(
            "note: ONCOLENS_SECRET_KEY differs from the backup's secret.key; set it to the file's content, or "
            "second factors made before the backup cannot be checked"
        )
    return RestoreReport(kind, manifest.get("alembic_revision"), int(manifest["cases"]), len(kept))


def _restore_postgresql(archive: Path, url: str, schema: str | None) -> None:
    """Empty the target schema (its tables may be of a newer release) and ``pg_restore`` the archive."""
    pg_restore = _pg_tool("pg_restore")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            current = connection.execute(text("SELECT current_schema()")).scalar()
            if current is None:  # the search path's schema does not exist yet: the archive makes it
                path = str(connection.execute(text("SELECT current_setting('search_path')")).scalar_one())
                current = path.split(",")[0].strip().strip('"')
            if schema and schema != current:
                raise BackupError(
                    f"this backup is of the PostgreSQL schema {schema!r} but the target's is {current!r}; restore "
                    "it with a database URL whose search_path is that schema"
                )
            tables = connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = :schema"), {"schema": current}
            ).scalars()
            for table in list(tables):
                connection.execute(text(f'DROP TABLE IF EXISTS "{current}"."{table}" CASCADE'))
    finally:
        engine.dispose()
    _run(
        [
            pg_restore,
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            f"--dbname={libpq_url(url)}",
            str(archive),
        ],
        "pg_restore",
    )


def _sqlite_copy(source_path: Path, target_path: Path) -> None:
    """Copy a SQLite database with SQLite's online backup API (one consistent snapshot, even while the
    server writes), as one self-contained file (no -wal beside it), readable by its owner only."""
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(target_path)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()
        source.close()
    target_path.chmod(0o600)


def _restore_sqlite(backup_file: Path, target: Path) -> None:
    """Put the backup's database at ``target`` atomically (the -wal and -shm of an old one removed)."""
    _private_dir(target.parent)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".restore-", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        _sqlite_copy(backup_file, temporary)
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
