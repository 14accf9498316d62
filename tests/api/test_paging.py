"""Keyset (cursor) paging of the case list and the audit log: every row once, in order, however deep,
with ties in time, under inserts made between pages, on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import Session, select

from oncolens.app import create_app
from oncolens.store.db.models import Case
from oncolens.zoo import Zoo
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login
from tests.services.test_learning import image, png


@pytest.fixture(scope="module")
def client(blob_package: Path, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with blob_server(blob_package, database_url, tmp_path_factory) as test_client:
        yield test_client


@contextmanager
def blob_server(blob_package: Path, database_url: str, factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app serving only the blob model on a test database, with an admin and a clinician."""
    zoo = factory.mktemp("blob-zoo")
    shutil.copytree(blob_package, zoo / "blob")
    settings = db_settings(factory.mktemp("blob-data"), database_url, compat_enabled=False)
    with TestClient(create_app(settings, Zoo([zoo]))) as test_client:
        add_user(test_client, "admin@clinic.org", "admin")
        add_user(test_client, "doc@clinic.org", "clinician")
        yield test_client


def make(client: TestClient, headers: dict[str, str], n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        made = client.post(
            "/api/v1/cases",
            data={"model_id": "blob", "patient_ref": f"{tag}-{i}"},
            files=[("files", ("x.png", png(image(0.1 + 0.02 * i, i)), "image/png"))],
            headers=headers,
        )
        assert made.status_code == 201, made.text
        ids.append(made.json()["id"])
    return ids


def walk(client: TestClient, path: str, headers: dict[str, str], limit: int, **params: Any) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        query = {"limit": limit} | params | ({"cursor": cursor} if cursor else {})
        page = client.get(path, params=query, headers=headers)
        assert page.status_code == 200, page.text
        body = page.json()
        pages.append([item["id"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def test_the_case_list_by_cursor_gives_every_case_once_in_order(client: TestClient) -> None:
    doctor = login(client, "doc@clinic.org")
    make(client, doctor, 23, "K")
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        tied = list(session.exec(select(Case.id).order_by(Case.id).limit(6)))
        session.execute(
            update(Case).where(Case.id.in_(tied)).values(created_at=datetime(2026, 12, 1, 9, 0, tzinfo=UTC))  # type: ignore[attr-defined]
        )
        session.commit()
    everything = client.get("/api/v1/cases", params={"limit": 200}, headers=doctor).json()
    assert everything["total"] == 23 and everything["next_cursor"] is None
    order = [item["id"] for item in everything["items"]]
    pages = walk(client, "/api/v1/cases", doctor, 5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [i for p in pages for i in p] == order  # the tied six included, each once
    # offset pages hand over to the cursor: page 2 by offset, then on by its next_cursor
    second = client.get("/api/v1/cases", params={"limit": 5, "offset": 5}, headers=doctor).json()
    assert [i["id"] for i in second["items"]] == order[5:10]
    third = client.get("/api/v1/cases", params={"limit": 5, "cursor": second["next_cursor"]}, headers=doctor).json()
    assert [i["id"] for i in third["items"]] == order[10:15]
    high = walk(client, "/api/v1/cases", doctor, 2, risk_level="low")
    assert [i for p in high for i in p] == [
        i["id"]
        for i in client.get("/api/v1/cases", params={"limit": 200, "risk_level": "low"}, headers=doctor).json()["items"]
    ]


def test_cases_added_between_pages_neither_repeat_nor_hide_older_ones(client: TestClient) -> None:
    doctor = login(client, "doc@clinic.org")
    before = [i["id"] for i in client.get("/api/v1/cases", params={"limit": 200}, headers=doctor).json()["items"]]
    first = client.get("/api/v1/cases", params={"limit": 4}, headers=doctor).json()
    make(client, doctor, 3, "NEW")  # newer than everything: they belong before page 1
    seen = [i["id"] for i in first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get("/api/v1/cases", params={"limit": 4, "cursor": cursor}, headers=doctor).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
    assert seen == before  # with offset, the 3 new cases would have pushed 3 old ones into a repeat


def test_bad_cursors_are_refused_with_a_message(client: TestClient) -> None:
    doctor, admin = login(client, "doc@clinic.org"), login(client, "admin@clinic.org")
    for cursor in ("not-a-cursor", "eyJ4IjoxfQ", "W10"):
        answer = client.get("/api/v1/cases", params={"cursor": cursor}, headers=doctor)
        assert answer.status_code == 422 and "cursor: not a cursor of the cases list" in answer.json()["detail"]
    audit_cursor = client.get("/api/v1/audit", params={"limit": 1}, headers=admin).json()["next_cursor"]
    wrong_list = client.get("/api/v1/cases", params={"cursor": audit_cursor}, headers=doctor)
    assert wrong_list.status_code == 422
    both = client.get("/api/v1/cases", params={"cursor": audit_cursor, "offset": 3}, headers=doctor)
    assert both.status_code == 422 and "send cursor or offset, not both" in both.json()["detail"]
    long = client.get("/api/v1/cases", params={"cursor": "x" * 500}, headers=doctor)
    assert long.status_code == 422


def test_the_audit_log_by_cursor_gives_every_event_once(client: TestClient) -> None:
    admin = login(client, "admin@clinic.org")
    everything = client.get("/api/v1/audit", params={"limit": 500}, headers=admin).json()
    assert everything["total"] >= 26 and everything["next_cursor"] is None
    pages = walk(client, "/api/v1/audit", admin, 7)
    walked = [i for p in pages for i in p]
    assert walked[: len(everything["items"])] == [i["id"] for i in everything["items"]]
    created = walk(client, "/api/v1/audit", admin, 4, action="create")
    assert len([i for p in created for i in p]) == 26
