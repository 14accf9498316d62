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
