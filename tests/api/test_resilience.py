"""Issue 38, findings 3, 15, 16, 17, 19 and 20: dependencies that hang, restart or fill up give
typed, prompt answers (503 with Retry-After, 507), never a 500 or a dropped connection; reports and
exports survive hostile text."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlmodel import Session, select

from oncolens.app import create_app
from oncolens.batch.local import csv_cell, csv_text
from oncolens.store.db.models import Case
from tests.api.conftest import db_settings
from tests.api.test_security import add_user, bearer, sample
from tests.live import PASSWORD, live_server

SKIN = "skin-ham10000"


@contextmanager
def frozen_service() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a store whose process is frozen)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def post_case(client: httpx.Client | TestClient, url: str, headers: dict[str, str], ref: str) -> httpx.Response:
    return client.post(
        f"{url}/api/v1/cases",
        data={"model_id": SKIN, "patient_ref": ref},
        files={"files": ("a.jpg", sample(SKIN))},
        headers=headers,
    )


# --- 3. an image store that hangs ---------------------------------------------------------------------


def test_38_3_a_frozen_store_gets_503_within_10_s_and_health_answers_within_1_s(tmp_path: Path) -> None:
    with frozen_service() as port:
        settings = db_settings(
            tmp_path,
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            image_store="s3://cases/images",
            s3_endpoint_url=f"http://127.0.0.1:{port}",
            s3_access_key_id="key",
            s3_secret_access_key="secret",
            s3_timeout_s=2,
        )
        with live_server(settings, {"doc@clinic.org": "clinician"}) as (url, _), httpx.Client(timeout=60) as client:
            if True:
                token = client.post(
                    f"{url}/api/v1/auth/token", data={"username": "doc@clinic.org", "password": PASSWORD}
                ).json()["access_token"]
                headers = {"Authorization": f"Bearer {token}"}

                def timed_post(index: int) -> tuple[int, float, str]:
                    with httpx.Client(timeout=60) as own:
                        start = time.monotonic()
                        answer = post_case(own, url, headers, f"PT-{index}")
                        return answer.status_code, time.monotonic() - start, answer.headers.get("retry-after", "")

                with ThreadPoolExecutor(12) as pool:
                    posts = pool.submit(lambda: list(ThreadPoolExecutor(12).map(timed_post, range(12))))
                    time.sleep(1.0)  # the posts wait on the store now
                    start = time.monotonic()
                    health = client.get(f"{url}/api/v1/health")
                    health_s = time.monotonic() - start
                    answers = posts.result()
        assert health.status_code == 200 and health_s <= 1.0, health_s
        body = health.json()
        assert body["status"] == "degraded" and body["dependencies"]["image_store"] != "ok"
        assert body["dependencies"]["database"] == "ok"
        assert {status for status, _, _ in answers} == {503}, answers
        assert max(seconds for _, seconds, _ in answers) <= 10.0, answers
        assert all(retry.isdigit() for _, _, retry in answers)


# --- 17. deleting a case while the store is down ----------------------------------------------------------


def test_38_17_delete_during_a_store_outage_answers_204_and_the_files_go_later(tmp_path: Path) -> None:
    settings = db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    with TestClient(create_app(settings)) as client:
        add_user(client, "doc@clinic.org", "clinician")
        headers = bearer(client, "doc@clinic.org")
        made = post_case(client, "", headers, "PT-DEL")
        assert made.status_code == 201
        store = client.app.state.store  # type: ignore[attr-defined]

        def down(names: list[str]) -> None:
            from oncolens.store.images import StoreError

            raise StoreError("cannot remove images from the image store (test): connection refused")

        real, store.remove = store.remove, down
        gone = client.delete(f"/api/v1/cases/{made.json()['id']}", headers=headers)
        store.remove = real
        assert gone.status_code == 204
        assert client.get(f"/api/v1/cases/{made.json()['id']}", headers=headers).status_code == 404
        files = store.files()
        assert files, "the file waits for the orphan sweep"
        for path in files:
            os.utime(path, (time.time() - 3600, time.time() - 3600))
        with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
            assert store.sweep_orphans(session) == len(files) and store.files() == []


# --- 19. the database restarting under load -------------------------------------------------------------


def test_38_19_database_connections_killed_under_load_give_no_500_and_lose_no_case(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL: the server ends every connection, as a restart does")
    # The server's connections carry a name of their own, so only they are ended (as a restart ends
    # them), not the test's other connections to the same database.
    named = f"{database_url}{'&' if '?' in database_url else '?'}application_name=oncolens_restart_test"
    settings = db_settings(tmp_path_factory.mktemp("pgdown"), named, preload_models=True)
    with live_server(settings, {"doc@clinic.org": "clinician"}) as (url, app):
        with httpx.Client(timeout=60) as client:
            token = client.post(
                f"{url}/api/v1/auth/token", data={"username": "doc@clinic.org", "password": PASSWORD}
            ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        stop = time.monotonic() + 12
        outcomes: list[tuple[int, str]] = []

        def client_loop(index: int) -> None:
            with httpx.Client(timeout=60) as own:
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    try:
                        answer = post_case(own, url, headers, f"PT-{index}-{n}")
                        ref = answer.json().get("patient", {}).get("ref", "") if answer.status_code == 201 else ""
                        outcomes.append((answer.status_code, ref))
                    except httpx.TransportError as exc:
                        outcomes.append((0, type(exc).__name__))

        killer = create_engine(database_url.split("?")[0])
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client_loop, i) for i in range(8)]
            for _ in range(3):
                time.sleep(3)
                with killer.begin() as conn:
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'oncolens_restart_test'"
                        )
                    )
            for future in futures:
                future.result()
        killer.dispose()
        codes = [code for code, _ in outcomes]
        assert codes.count(201) > 0
        assert 0 not in codes and not [c for c in codes if c >= 500 and c != 503], sorted(set(codes))
        acknowledged = {ref for code, ref in outcomes if code == 201}
        with Session(app.state.engine) as session:
            stored = set(session.exec(select(Case.patient_ref)).all())
        assert acknowledged <= stored, "every acknowledged case is kept"


# --- 20. the data folder filling up ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(folder)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 6 MB tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_38_20_a_filling_disk_refuses_new_cases_with_507_and_keeps_everything_else(small_disk: Path) -> None:
    data = small_disk / "data"
    settings = db_settings(data, f"sqlite:///{data / 'oncolens.db'}", min_free_mb=2)
    with TestClient(create_app(settings)) as client:
        add_user(client, "doc@clinic.org", "clinician")
        headers = bearer(client, "doc@clinic.org")
        codes, made = [], []
        for n in range(80):
            answer = post_case(client, "", headers, f"PT-{n}")
            codes.append(answer.status_code)
            if answer.status_code == 201:
                made.append(answer.json()["id"])
            else:
                break
        assert made and codes[-1] == 507, codes
        refused = post_case(client, "", headers, "PT-LAST")
        assert refused.status_code == 507 and "ONCOLENS_MIN_FREE_MB=2" in refused.json()["detail"]
        assert not [c for c in codes if c >= 500 and c != 507]
        assert (
            client.post("/api/v1/auth/token", data={"username": "doc@clinic.org", "password": PASSWORD}).status_code
            == 200
        )
        for case_id in made:
            assert client.get(f"/api/v1/cases/{case_id}", headers=headers).status_code == 200
        review = client.patch(f"/api/v1/cases/{made[0]}", json={"status": "reviewed"}, headers=headers)
        assert review.status_code == 200
        health = client.get("/api/v1/health").json()
        assert health["status"] == "degraded" and "ONCOLENS_MIN_FREE_MB" in health["dependencies"]["disk"]
        assert not list(data.rglob("*.part")), "no partial file is left"


# --- 15. the PDF survives long and marked-up fields -------------------------------------------------------


def test_38_15_a_huge_name_or_reference_gives_a_pdf_with_the_text_escaped_once(tmp_path: Path) -> None:
    settings = db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    with TestClient(create_app(settings)) as client:
        add_user(client, "doc@clinic.org", "clinician")
        headers = bearer(client, "doc@clinic.org")
        name = "a&b line 0" + "\nx" * 122  # 123 lines, as long as the field allows
        reference = "R&D-1" + "\n2" * 61  # 62 lines
        made = client.post(
            "/api/v1/cases",
            data={"model_id": SKIN, "patient_ref": reference, "patient_name": name},
            files={"files": ("a.jpg", sample(SKIN))},
            headers=headers,
        )
        assert made.status_code == 201, made.text
        pdf = client.get(f"/api/v1/cases/{made.json()['id']}/report.pdf", headers=headers)
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        out = tmp_path / "r.pdf"
        out.write_bytes(pdf.content)
        words = subprocess.run(["pdftotext", str(out), "-"], capture_output=True, check=True).stdout.decode()
        assert "a&b line 0" in words and "R&D-1" in words and "&amp;" not in words
        assert "shortened here" in words


# --- 16. batch CSV cells cannot become formulas -------------------------------------------------------------


def test_38_16_csv_cells_that_start_like_a_formula_are_defused_and_read_back(tmp_path: Path) -> None:
    for value in ('=HYPERLINK("http://evil")', "+1+1", "-2", "@SUM(A1)", "\tx"):
        assert csv_cell(value) == "'" + value and csv_text(csv_cell(value)) == value
    assert csv_cell(0.5) == 0.5 and csv_cell("normal.jpg") == "normal.jpg"
    out = tmp_path / "r.csv"
    with out.open("w", newline="") as handle:
        csv.writer(handle).writerow([csv_cell("=cmd|' /C calc'!A0")])
    assert out.read_text().startswith("'=cmd")


def test_38_20_a_read_audit_event_a_full_disk_cannot_take_is_kept_and_written_later(tmp_path: Path) -> None:
    from sqlalchemy.exc import OperationalError

    from oncolens.services.audit import Actor, commit_read_audit, deferred_audit
    from oncolens.store.db.models import AuditEvent, User

    settings = db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    app = create_app(settings)
    with TestClient(app):
        add_user_row = User(email="reader@clinic.org", hashed_password="x", role="viewer")
        with Session(app.state.engine, expire_on_commit=False) as session:
            session.add(add_user_row)
            session.commit()
            real = session.commit

            def full() -> None:
                raise OperationalError("INSERT", {}, Exception("database or disk is full"))

            session.commit = full  # type: ignore[method-assign]
            commit_read_audit(session, Actor(add_user_row), "view", "case-1")
            session.commit = real  # type: ignore[method-assign]
        assert len(deferred_audit) == 1, "the read went on; its event waits"
        assert deferred_audit.flush(app.state.engine) == 1 and len(deferred_audit) == 0
        with Session(app.state.engine) as session:
            kept = session.exec(select(AuditEvent).where(AuditEvent.action == "view")).all()
        assert [(e.actor, e.case_id) for e in kept] == [("reader@clinic.org", "case-1")]
