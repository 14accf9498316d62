"""The dashboard's case counts are kept with every write: after mixed creates, reviews and deletes they
equal a full recount (SQLite and PostgreSQL), `db refresh-stats` rebuilds them, and the dashboard shows them."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from oncolens.store.db.models import Case, CaseCount
from oncolens.store.stats import counts_since, rebuild
from oncolens.store.views import as_utc
from tests.api.test_auth_users import login
from tests.api.test_paging import blob_server
from tests.services.test_learning import image, png
from tests.web.test_pages import web_login


@pytest.fixture(scope="module")
def client(blob_package: Path, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with blob_server(blob_package, database_url, tmp_path_factory) as test_client:
        yield test_client


def recount(session: Session) -> Counter[tuple[str, str, str, str]]:
    cases = session.exec(select(Case)).all()
    return Counter((as_utc(c.created_at).date().isoformat(), c.model_id, c.risk_level, c.status) for c in cases)


def kept(session: Session) -> Counter[tuple[str, str, str, str]]:
    return Counter({(r.day.isoformat(), r.model_id, r.risk_level, r.status): r.n for r in counts_since(session) if r.n})


def test_counts_follow_mixed_writes_and_equal_a_recount(client: TestClient) -> None:
    doctor = login(client, "doc@clinic.org")
    rng = random.Random(0)
    made: list[str] = []
    for step in range(150):
        action = rng.choice(["create", "create", "review", "review", "delete"]) if made else "create"
        if action == "create":
            answer = client.post(
                "/api/v1/cases",
                data={"model_id": "blob", "patient_ref": f"C-{step}"},
                files=[("files", ("x.png", png(image(rng.uniform(0.05, 0.6), step)), "image/png"))],
                headers=doctor,
            )
            assert answer.status_code == 201, answer.text
            made.append(answer.json()["id"])
        elif action == "review":
            status = rng.choice(["pending_review", "reviewed", "confirmed"])
            answer = client.patch(f"/api/v1/cases/{rng.choice(made)}", json={"status": status}, headers=doctor)
            assert answer.status_code == 200, answer.text
        else:
            assert (
                client.delete(f"/api/v1/cases/{made.pop(rng.randrange(len(made)))}", headers=doctor).status_code == 204
            )
    engine = client.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        truth = recount(session)
        assert sum(truth.values()) == len(made) and kept(session) == truth
        for row in session.exec(select(CaseCount)).all():  # spoil them: the rebuild puts them right
            row.n += 7
            session.add(row)
        session.commit()
        assert kept(session) != truth
        assert rebuild(session) == len(made)
        assert kept(session) == truth
    admin = web_login(client, "admin@clinic.org")
    page = admin.get("/admin")
    total = re.search(r'data-testid="total-cases">(\d+)<', page.text)
    assert page.status_code == 200 and total is not None and int(total.group(1)) == len(made)


def test_refresh_stats_command(client: TestClient) -> None:
    from typer.testing import CliRunner

    from oncolens.cli.main import app

    settings = client.app.state.settings  # type: ignore[attr-defined]
    env = {
        "ONCOLENS_DATA_DIR": str(settings.data_dir),
        "ONCOLENS_DATABASE_URL": settings.resolved_database_url,
        "ONCOLENS_SECRET_KEY": "test-secret-key-that-is-long-enough-for-hs256",
    }
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        cases = len(session.exec(select(Case)).all())
    result = CliRunner().invoke(app, ["db", "refresh-stats"], env=env)
    assert result.exit_code == 0 and f"case counts rebuilt from {cases} case(s)" in result.output
