"""The Alembic migration is the only way the schema is made, and it makes exactly the models' schema."""

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

import oncolens.store.db.models  # noqa: F401
from oncolens.store.db import make_engine, upgrade

SRC = Path(__file__).parents[2] / "src" / "oncolens"


def test_upgrade_of_an_empty_database_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert inspect(engine).get_table_names() == []
        upgrade(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"users", "login_throttle", "cases", "case_images", "audit_events", "alembic_version"} <= tables
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), SQLModel.metadata) == []
        upgrade(engine)  # a second run is a no-op
    finally:
        engine.dispose()


def test_sqlite_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_no_code_creates_tables_behind_the_migrations_back() -> None:
    offenders = [p for p in SRC.rglob("*.py") if "create_all(" in p.read_text()]
    assert offenders == []


def test_one_linear_chain_of_migrations() -> None:
    """One head; each migration revises the one numbered before it (a new one is numbered after the last)."""
    import re

    versions = sorted((SRC / "store" / "db" / "migrations" / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    previous = None
    for path in versions:
        text = path.read_text()
        revision = re.search(r'^revision = "(\d{4})"', text, re.M)
        down = re.search(r"^down_revision = (None|\"(\d{4})\")", text, re.M)
        assert revision and down, path.name
        assert revision.group(1) == path.name[:4]
        assert down.group(2) == previous, f"{path.name} revises {down.group(2)}, not {previous}"
        previous = revision.group(1)


def test_a_database_made_by_the_oldest_migration_upgrades_with_every_case_intact(
    database_url: str, tmp_path: Path
) -> None:
    """Rows as the first release stored them (0001's columns, results without the statement, which is
    composed when read) upgrade to head and read back through the API exactly as this release made them."""
    import json
    import shutil

    from fastapi.testclient import TestClient
    from sqlalchemy import MetaData, Table, select

    from oncolens.app import create_app
    from tests.api.conftest import SAMPLES, db_settings
    from tests.api.test_auth_users import add_user, login
    from tests.db.test_backup import empty_database

    reference = db_settings(tmp_path / "ref", f"sqlite:///{tmp_path / 'ref' / 'oncolens.db'}")
    with TestClient(create_app(reference)) as client:
        add_user(client, "ana@clinic.org", "clinician")
        headers = login(client, "ana@clinic.org")
        cases = []
        for names in (["ISIC_0025316.jpg", "ISIC_0025958.jpg"], ["ISIC_0026213.jpg"]):
            upload = [("files", (n, (SAMPLES / n).read_bytes(), "image/jpeg")) for n in names]
            fields = {"model_id": "skin-ham10000", "patient_ref": "P-7", "patient_age": "61", "clinical_notes": "x"}
            made = client.post("/api/v1/cases", data=fields, files=upload, headers=headers)
            assert made.status_code == 201, made.text
            cases.append(made.json())
        review = {"status": "confirmed", "confirmed_diagnosis": "Melanoma", "review_notes": "excised"}
        cases[0] = client.patch(f"/api/v1/cases/{cases[0]['id']}", json=review, headers=headers).json()
    source = make_engine(reference.resolved_database_url)
    engine = make_engine(database_url)
    try:
        empty_database(engine)
        upgrade(engine, "0001")
        old_tables = MetaData()
        old_tables.reflect(engine, only=["users", "cases", "case_images"])
        new_tables = MetaData()
        new_tables.reflect(source, only=["users", "cases", "case_images"])
        with source.connect() as read, engine.begin() as write:
            for name in ("users", "cases", "case_images"):
                old: Table = old_tables.tables[name]
                for row in read.execute(select(new_tables.tables[name])).mappings():
                    values = {c.name: row[c.name] for c in old.columns}
                    if "result_json" in values:  # the first release's results had no statement
                        result = json.loads(values["result_json"])
                        result.pop("statement", None)  # composed again when read
                        values["result_json"] = json.dumps(result)
                    write.execute(old.insert().values(**values))
        upgrade(engine)
    finally:
        source.dispose()
        engine.dispose()
    settings = db_settings(tmp_path / "data", database_url)
    shutil.copytree(reference.images_dir, settings.images_dir)
    with TestClient(create_app(settings)) as client:
        headers = login(client, "ana@clinic.org")
        listed = client.get("/api/v1/cases", headers=headers).json()
        assert listed["total"] == 2
        # 0005 gives a reviewed case whose confirmed diagnosis names one of its model's classes that class
        # as its reference (no standard was recorded; the review's date).
        reviewed_on = cases[0]["review"]["reviewed_at"][:10]
        backfill = {"reference_class": "mel", "reference_standard": None, "reference_date": reviewed_on}
        cases[0] = cases[0] | backfill | {"review": cases[0]["review"] | backfill}
        for case in cases:
            assert client.get(f"/api/v1/cases/{case['id']}", headers=headers).json() == case
            for image in case["images"]:
                data = client.get(f"/api/v1/cases/{case['id']}/images/{image['id']}", headers=headers)
                assert data.status_code == 200 and len(data.content) > 1000
        report = client.get(f"/api/v1/cases/{cases[0]['id']}/fhir", headers=headers)
        assert report.status_code == 200
