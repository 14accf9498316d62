"""The counts kept with every write (the dashboard's, the monitoring page's and the audit log's): after
mixed creates, reviews (status and reference class) and deletes they equal a full recount (SQLite and
PostgreSQL), `db refresh-stats` rebuilds them, and the dashboard and the audit log show them."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from oncolens.store.db.models import (
    AuditCount,
    AuditEvent,
    Case,
    CaseCount,
    CaseImage,
    MonitorCount,
)
from oncolens.store.stats import period_start, rebuild
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
    rows = session.exec(select(CaseCount)).all()
    return Counter({(r.day.isoformat(), r.model_id, r.risk_level, r.status): r.n for r in rows if r.n})


def monitor_recount(session: Session) -> dict[tuple[Any, ...], tuple[int, int, int, int, float]]:
    """The monitoring counts worked out in Python from the cases and their images."""
    out: dict[tuple[Any, ...], list[float]] = {}
    for case in session.exec(select(Case)).all():
        rows = session.exec(select(CaseImage).where(CaseImage.case_id == case.id))
        images = [json.loads(i.result_json) for i in rows]
        key = (
            as_utc(case.created_at).date(),
            case.model_id,
            min(int(case.p_malignant * 100), 99),
            bool(json.loads(case.result_json)["is_malignant"]),
            case.risk_level == "indeterminate",
            case.reference_class or "",
        )
        sums = out.setdefault(key, [0, 0, 0, 0, 0.0])
        sums[0] += 1
        sums[1] += len(images)
        sums[2] += sum((i.get("domain") or {}).get("in_domain") is False for i in images)
        sums[3] += sum(bool(i.get("quality")) for i in images)
        sums[4] += case.p_malignant
    return {k: (int(v[0]), int(v[1]), int(v[2]), int(v[3]), round(v[4], 6)) for k, v in out.items()}


def monitor_kept(session: Session) -> dict[tuple[Any, ...], tuple[int, int, int, int, float]]:
    return {
        (r.day, r.model_id, r.p_bin, r.called, r.indeterminate, r.reference_class): (
            r.n,
            r.images,
            r.images_out,
            r.images_warned,
            round(r.p_sum, 6),
        )
        for r in session.exec(select(MonitorCount).where(MonitorCount.span == "d"))
        if r.n
    }


def rollups_agree(session: Session) -> bool:
    """Each week and month row holds the sum of its days' rows."""
    days = session.exec(select(MonitorCount).where(MonitorCount.span == "d")).all()
    for span, period in (("w", "week"), ("m", "month")):
        summed: Counter[tuple[Any, ...]] = Counter()
        for r in days:
            summed[
                (period_start(r.day, period), r.model_id, r.p_bin, r.called, r.indeterminate, r.reference_class)
            ] += r.n
        rows = session.exec(select(MonitorCount).where(MonitorCount.span == span)).all()
        kept = Counter({(r.day, r.model_id, r.p_bin, r.called, r.indeterminate, r.reference_class): r.n for r in rows})
        if +summed != +kept:
            return False
    return True


def audit_recount(session: Session) -> Counter[tuple[Any, ...]]:
    events = session.exec(select(AuditEvent)).all()
    return Counter((as_utc(e.at).date(), e.action, e.user_id or 0) for e in events)


def audit_kept(session: Session) -> Counter[tuple[Any, ...]]:
    return Counter({(r.day, r.action, r.user_id): r.n for r in session.exec(select(AuditCount)) if r.n})


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
            change: dict[str, Any] = {"status": rng.choice(["pending_review", "reviewed", "confirmed"])}
            reference = rng.choice(["blob", "plain", None, "keep"])
            if reference != "keep":
                change["reference_class"] = reference
                change["reference_standard"] = "histopathology" if reference else None
            answer = client.patch(f"/api/v1/cases/{rng.choice(made)}", json=change, headers=doctor)
            assert answer.status_code == 200, answer.text
        else:
            assert (
                client.delete(f"/api/v1/cases/{made.pop(rng.randrange(len(made)))}", headers=doctor).status_code == 204
            )
    engine = client.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        truth, monitored, events = recount(session), monitor_recount(session), audit_recount(session)
        assert sum(truth.values()) == len(made) and kept(session) == truth
        assert monitor_kept(session) == monitored and any(key[-1] for key in monitored)  # reference classes
        assert rollups_agree(session)
        assert audit_kept(session) == events and any(key[1] == "review" for key in events)
        for table in (CaseCount, MonitorCount, AuditCount):  # spoil them: the rebuild puts them right
            for row in session.exec(select(table)).all():
                row.n += 7
                session.add(row)
        session.commit()
        assert kept(session) != truth and monitor_kept(session) != monitored and audit_kept(session) != events
        assert rebuild(session) == len(made)
        assert kept(session) == truth and monitor_kept(session) == monitored and audit_kept(session) == events
        assert rollups_agree(session)
    admin_api = login(client, "admin@clinic.org")
    listed = client.get("/api/v1/audit", params={"limit": 5}, headers=admin_api).json()
    with Session(engine) as session:
        assert listed["total"] == len(session.exec(select(AuditEvent)).all()) and listed["total_source"] == "maintained"
    reviews = client.get("/api/v1/audit", params={"action": "review"}, headers=admin_api).json()
    assert reviews["total"] == sum(n for (_, action, _), n in events.items() if action == "review")
    one = client.get("/api/v1/audit", params={"case_id": made[0]}, headers=admin_api).json()
    assert one["total_source"] == "counted" and one["total"] == len(one["items"]) >= 1
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
