"""``oncolens backup`` / ``oncolens restore``: a backup taken while 8 clients post cases restores every case
acknowledged before it began, identical (SQLite and PostgreSQL); damaged backups and non-empty targets
are refused; rolling back an upgrade is restoring the backup taken before it."""

import hashlib
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from typer.testing import CliRunner

from oncolens.app import create_app
from oncolens.cli.main import app as cli
from oncolens.config import Settings
from oncolens.store.backup import BackupError, backup, restore
from oncolens.store.db import make_engine, upgrade
from tests.api.conftest import db_settings
from tests.live import PASSWORD, live_server

SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"
IMAGES = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))[:3]]
CLIENTS = 8


@contextmanager
def fresh_target(database_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for a restore target: a new data folder, and on PostgreSQL a new database (the backup's
    schema name kept in the search path, as a new server of the same configuration would have)."""
    data = tmp_path / f"restored-{uuid.uuid4().hex[:6]}"
    if database_url.startswith("sqlite"):
        yield db_settings(data, f"sqlite:///{data / 'oncolens.db'}")
        return
    url = make_url(database_url)
    name = f"restore_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url.set(query={}), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield db_settings(data, url.set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def test_a_backup_under_load_restores_every_acknowledged_case(database_url: str, tmp_path: Path) -> None:
    settings = db_settings(tmp_path / "data", database_url)
    acked: dict[str, tuple[float, dict, str]] = {}  # case id -> (acknowledged at, JSON, image sha256)
    failures: list[str] = []
    stop = threading.Event()

    def post_cases(base: str, token: str, worker: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            n = 0
            while not stop.is_set():
                data = IMAGES[(worker + n) % len(IMAGES)]
                fields = {"model_id": "skin-ham10000", "patient_ref": f"W{worker}-{n}", "patient_age": str(20 + n)}
                answer = client.post(
                    "/api/v1/cases", data=fields, files=[("files", ("lesion.jpg", data, "image/jpeg"))]
                )
                if answer.status_code != 201:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                    return
                acked[answer.json()["id"]] = (time.monotonic(), answer.json(), hashlib.sha256(data).hexdigest())
                n += 1

    with live_server(settings, {"ana@clinic.org": "clinician"}) as (base, _):
        token = httpx.post(f"{base}/api/v1/auth/token", data={"username": "ana@clinic.org", "password": PASSWORD})
        threads = [
            threading.Thread(target=post_cases, args=(base, token.json()["access_token"], i)) for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        while len(acked) < 2 * CLIENTS and not failures:
            time.sleep(0.05)
        began = time.monotonic()
        report = backup(settings, tmp_path / "backup")
        ended = time.monotonic()
        while len([a for a in acked.values() if a[0] > ended]) < CLIENTS and not failures:
            time.sleep(0.05)  # clients go on posting after the backup, too
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures
    before = {case_id: a for case_id, a in acked.items() if a[0] < began}
    assert len(before) >= 2 * CLIENTS and report.cases >= len(before)
    assert len(acked) > report.cases  # cases kept coming while and after it ran

    files = [p for p in (tmp_path / "backup").rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert stat.S_IMODE((tmp_path / "backup").stat().st_mode) == 0o700

    with fresh_target(database_url, tmp_path) as target:
        restored = restore(target, tmp_path / "backup")
        assert restored.cases == report.cases and restored.images == report.images
        with TestClient(create_app(target)) as client:
            login = client.post("/api/v1/auth/token", data={"username": "ana@clinic.org", "password": PASSWORD})
            headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
            listed = client.get("/api/v1/cases", params={"limit": 200}, headers=headers).json()
            assert listed["total"] == report.cases
            ids = {item["id"] for item in listed["items"]}
            for offset in range(200, listed["total"], 200):
                page = client.get("/api/v1/cases", params={"limit": 200, "offset": offset}, headers=headers)
                ids |= {item["id"] for item in page.json()["items"]}
            assert set(before) <= ids
            for case_id, (_, original, image_sha) in before.items():
                again = client.get(f"/api/v1/cases/{case_id}", headers=headers)
                assert again.status_code == 200 and again.json() == original
                image = original["images"][0]["id"]
                data = client.get(f"/api/v1/cases/{case_id}/images/{image}", headers=headers).content
                assert hashlib.sha256(data).hexdigest() == image_sha


def test_restore_refuses_a_damaged_backup_and_a_target_with_data(tmp_path: Path) -> None:
    settings = db_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'oncolens.db'}")
    with TestClient(create_app(settings)) as client:
        from tests.api.test_auth_users import add_user, login

        add_user(client, "ana@clinic.org", "clinician")
        headers = login(client, "ana@clinic.org")
        fields = {"model_id": "skin-ham10000", "patient_ref": "P-1"}
        answer = client.post(
            "/api/v1/cases", data=fields, files=[("files", ("a.jpg", IMAGES[0], "image/jpeg"))], headers=headers
        )
        assert answer.status_code == 201
    runner = CliRunner()
    env = {"ONCOLENS_DATA_DIR": str(tmp_path / "data"), "ONCOLENS_SECRET_KEY": settings.secret_key or ""}
    taken = runner.invoke(cli, ["backup", str(tmp_path / "b")], env=env)
    assert taken.exit_code == 0, taken.output
    assert "backed up 1 case(s), 1 image(s), the sqlite database" in taken.stdout

    again = runner.invoke(cli, ["backup", str(tmp_path / "b")], env=env)
    assert again.exit_code == 2 and "is not an empty folder" in again.stderr

    # The data folder it came from is not empty: refused without --force, replaced with it.
    refused = runner.invoke(cli, ["restore", str(tmp_path / "b")], env=env)
    assert refused.exit_code == 2 and "the target is not empty (the database" in refused.stderr
    forced = runner.invoke(cli, ["restore", str(tmp_path / "b"), "--force"], env=env)
    assert forced.exit_code == 0 and "restored 1 case(s) and 1 image(s)" in forced.stdout

    image = next((tmp_path / "b" / "images").glob("*/*"))
    image.write_bytes(image.read_bytes()[:-1] + b"\x00")
    target = db_settings(tmp_path / "new", f"sqlite:///{tmp_path / 'new' / 'oncolens.db'}")
    with pytest.raises(BackupError, match=rf"the backup is damaged: images/{image.parent.name}/{image.name} does not"):
        restore(target, tmp_path / "b")
    image.unlink()
    with pytest.raises(BackupError, match=r"the backup is incomplete: images/.* is listed in its manifest but missing"):
        restore(target, tmp_path / "b")
    assert not (tmp_path / "new" / "oncolens.db").exists()  # nothing was touched
    with pytest.raises(BackupError, match=r"holds no manifest\.json: it is not an OncoLens backup folder"):
        restore(target, tmp_path)


def test_rolling_back_an_upgrade_is_restoring_the_backup_taken_before_it(database_url: str, tmp_path: Path) -> None:
    """A database at an older release's revision, backed up, upgraded and used, comes back as it was."""
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'data' / 'oncolens.db'}"
    settings = db_settings(tmp_path / "data", database_url)
    engine = make_engine(database_url)
    try:
        empty_database(engine)
        upgrade(engine, "0003")
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO users (email, full_name, hashed_password, role, is_active, created_at) "
                    "VALUES ('old@clinic.org', 'Old', 'x', 'admin', true, CURRENT_TIMESTAMP)"
                )
            )
        old = backup(settings, tmp_path / "before-upgrade")
        assert old.revision == "0003"
        upgrade(engine)  # the new release starts and migrates
        with engine.begin() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() != "0003"
            connection.execute(text("UPDATE users SET full_name = 'changed after the upgrade'"))
        engine.dispose()
        restore(settings, tmp_path / "before-upgrade", force=True)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0003"
            assert connection.execute(text("SELECT full_name FROM users")).scalars().all() == ["Old"]
        assert "mail_queue" not in table_names(engine)  # made by 0004, after the backup's revision
    finally:
        engine.dispose()


def table_names(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        query = (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if engine.dialect.name == "sqlite"
            else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        return set(connection.execute(text(query)).scalars())


def empty_database(engine: Engine) -> None:
    """Drop every table (the module's PostgreSQL schema is shared with the tests before)."""
    with engine.begin() as connection:
        for table in table_names(engine):
            cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
            connection.execute(text(f'DROP TABLE IF EXISTS "{table}"{cascade}'))
