"""Two real ``oncolens serve`` replicas on different ports sharing one PostgreSQL database, one secret
key and one S3 store (SeaweedFS) behave as one service. Needs ONCOLENS_TEST_DATABASE_URL (CI sets it)."""

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.live import free_port
from tests.scale.replicas import ONCOLENS, Replica, fresh_postgres_database, replicas, stop
from tests.seaweed import S3Server

SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"
DEPLOY = Path(__file__).parents[2] / "deploy"
MEL = "ISIC_0025316.jpg"
PASSWORD = "correct horse battery"
SECRET = "replica-test-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    base = os.environ.get("ONCOLENS_TEST_DATABASE_URL")
    if not base:
        pytest.skip("ONCOLENS_TEST_DATABASE_URL is not set")
    with fresh_postgres_database(base) as url:
        yield url


@pytest.fixture(scope="module")
def env(database: str, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    bucket = s3.bucket("replicas")
    return {
        "ONCOLENS_DATABASE_URL": database,
        "ONCOLENS_SECRET_KEY": SECRET,
        "ONCOLENS_DATA_DIR": str(tmp_path_factory.mktemp("replica-data")),
        "ONCOLENS_PRELOAD_MODELS": "false",
        "ONCOLENS_LOGIN_MAX_FAILURES": "3",
    } | s3.env(bucket)


@pytest.fixture(scope="module")
def pair(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    with replicas(env, tmp_path_factory.mktemp("replica-logs")) as started:
        subprocess.run(
            [ONCOLENS, "users", "create", "--admin", "--email", "admin@clinic.org", "--password-stdin"],
            input=PASSWORD.encode(),
            env=os.environ | env,
            check=True,
            capture_output=True,
        )
        yield started


def login(replica: Replica, email: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(f"{replica.url}/api/v1/auth/token", data={"username": email, "password": password})


def bearer(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def add_user(replica: Replica, admin: dict[str, str], email: str, role: str, full_name: str) -> None:
    """An account made by the admin through ``replica``'s API."""
    made = httpx.post(
        f"{replica.url}/api/v1/users",
        json={"email": email, "password": PASSWORD, "role": role, "full_name": full_name},
        headers=admin,
    )
    assert made.status_code == 201, made.text


def test_two_replicas_migrated_one_empty_database_together(pair: list[Replica], database: str) -> None:
    engine = create_engine(database)
    with engine.connect() as connection:
        versions = connection.execute(text("select version_num from alembic_version")).scalars().all()
    engine.dispose()
    assert len(versions) == 1  # one migration ran; the other replica found the schema at head
    for replica in pair:
        assert "Application startup complete" in replica.output() and "Traceback" not in replica.output()


def test_a_case_made_on_one_is_served_reviewed_reported_and_deleted_by_the_other(
    pair: list[Replica], s3: S3Server
) -> None:
    a, b = pair
    admin_a = bearer(login(a, "admin@clinic.org"))
    add_user(a, admin_a, "ana@clinic.org", "clinician", "Ana")
    ana_a = bearer(login(a, "ana@clinic.org"))
    files = [("files", (MEL, (SAMPLES / MEL).read_bytes(), "image/jpeg"))]
    created = httpx.post(
        f"{a.url}/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": "R-1"}, files=files,
        headers=ana_a, timeout=60,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    case = created.json()
    # a token from one replica works on the other (one secret key), and the case is there
    listed = httpx.get(f"{b.url}/api/v1/cases", headers=ana_a).json()
    assert [c["id"] for c in listed["items"]] == [case["id"]]
    image = case["images"][0]["id"]
    got = httpx.get(f"{b.url}/api/v1/cases/{case['id']}/images/{image}", headers=ana_a)
    assert got.status_code == 200 and got.content == (SAMPLES / MEL).read_bytes()
    review = {"status": "confirmed", "confirmed_diagnosis": "melanoma", "review_notes": "excised"}
    reviewed = httpx.patch(f"{b.url}/api/v1/cases/{case['id']}", json=review, headers=ana_a)
    assert reviewed.status_code == 200, reviewed.text
    seen = httpx.get(f"{a.url}/api/v1/cases/{case['id']}", headers=ana_a).json()
    assert seen["review"]["status"] == "confirmed" and seen["review"]["confirmed_diagnosis"] == "melanoma"
    pdf = httpx.get(f"{b.url}/api/v1/cases/{case['id']}/report.pdf", headers=ana_a, timeout=60)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    fhir = httpx.get(f"{a.url}/api/v1/cases/{case['id']}/fhir", headers=ana_a)
    assert fhir.status_code == 200 and fhir.json()["resourceType"] == "Bundle"
    assert len(s3.client().list_objects_v2(Bucket="replicas").get("Contents", [])) == 1
    assert httpx.delete(f"{b.url}/api/v1/cases/{case['id']}", headers=ana_a).status_code == 204
    assert httpx.get(f"{a.url}/api/v1/cases/{case['id']}", headers=ana_a).status_code == 404
    assert s3.client().list_objects_v2(Bucket="replicas").get("KeyCount") == 0
    # both replicas wrote to the one audit trail
    admin_b = bearer(login(b, "admin@clinic.org"))
    actions = httpx.get(f"{b.url}/api/v1/audit", params={"case_id": case["id"]}, headers=admin_b).json()["items"]
    assert {"create", "review", "report", "delete"} <= {e["action"] for e in actions}


def test_a_promotion_made_on_one_replica_is_served_by_both_within_5_s(pair: list[Replica], tmp_path: Path) -> None:
    """A site version installed through one replica and promoted through the other: both answer with it
    within ONCOLENS_MODEL_POLL_S (2 s) + a request, without a restart; a rollback likewise."""
    import io
    import json
    import zipfile

    from oncolens.zoo import BUILTIN_DIR, ONE_NETWORK

    a, b = pair
    admin = bearer(login(a, "admin@clinic.org"))
    shipped = BUILTIN_DIR / "skin-ham10000"
    card = json.loads((shipped / "card.json").read_text())
    site = card | {
        "version": f"{card['version']}+site.1",
        "calibration": card["calibration"] | {"temperature": card["calibration"]["temperature"] * 0.8},
        "lineage": {"gate": {"passed": True, "criteria": []}, "note": "made by the replica test"},
    }
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(shipped.rglob("*")):
            relative = path.relative_to(shipped)
            if path.is_file() and relative.parts[0] != ONE_NETWORK and relative.name != "card.json":
                zipped.write(path, relative.as_posix())
        zipped.writestr("card.json", json.dumps(site))
    installed = httpx.post(
        f"{a.url}/api/v1/models/skin-ham10000/versions", files={"file": ("site.zip", archive.getvalue())},
        headers=admin, timeout=120,
    )  # fmt: skip
    assert installed.status_code == 201, installed.text
    image = [("file", (MEL, (SAMPLES / MEL).read_bytes(), "image/jpeg"))]

    def versions() -> set[str]:
        answers = [httpx.post(f"{r.url}/api/v1/models/skin-ham10000/predict", files=image, timeout=60) for r in pair]
        return {answer.json()["model_version"] for answer in answers}

    assert versions() == {card["version"]}  # both load the shipped version first

    def within_5_s(expected: str) -> float:
        start = time.monotonic()
        while time.monotonic() - start < 5.0:
            if versions() == {expected}:
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"both replicas did not serve {expected} within 5 s: {versions()}")

    promoted = httpx.post(
        f"{b.url}/api/v1/models/skin-ham10000/versions/{site['version']}/promote", json={"why": "replica test"},
        headers=admin,
    )  # fmt: skip
    assert promoted.status_code == 200, promoted.text
    within_5_s(site["version"])
    back = httpx.post(f"{a.url}/api/v1/models/skin-ham10000/rollback", json={"why": "replica test"}, headers=admin)
    assert back.status_code == 200, back.text
    within_5_s(card["version"])


def test_the_login_lock_and_token_revocation_hold_across_replicas(pair: list[Replica]) -> None:
    a, b = pair
    admin = bearer(login(a, "admin@clinic.org"))
    add_user(b, admin, "ben@clinic.org", "viewer", "Ben")
    # failures on either replica count towards one lock (ONCOLENS_LOGIN_MAX_FAILURES=3)
    assert [login(r, "ben@clinic.org", "wrong password!").status_code for r in (a, b, a)] == [401, 401, 401]
    locked = login(b, "ben@clinic.org")
    assert locked.status_code == 429 and "too many failed logins" in locked.json()["detail"]
    assert login(a, "ben@clinic.org").status_code == 429
    # a token logged out on one replica is refused by the other
    token = bearer(login(b, "admin@clinic.org"))
    assert httpx.get(f"{a.url}/api/v1/users/me", headers=token).status_code == 200
    assert httpx.post(f"{a.url}/api/v1/auth/logout", headers=token).status_code == 204
    refused = httpx.get(f"{b.url}/api/v1/users/me", headers=token)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    # a password changed on one replica ends the sessions the other one gave out
    old = bearer(login(b, "admin@clinic.org"))
    changed = httpx.patch(
        f"{a.url}/api/v1/users/me", json={"password": "a brand new passphrase", "current_password": PASSWORD},
        headers=old,
    )  # fmt: skip
    assert changed.status_code == 200, changed.text
    assert httpx.get(f"{b.url}/api/v1/users/me", headers=old).status_code == 401


def test_a_replica_off_sqlite_refuses_to_start_without_the_shared_key(env: dict[str, str]) -> None:
    without = {k: v for k, v in env.items() if k != "ONCOLENS_SECRET_KEY"}
    done = subprocess.run(
        [ONCOLENS, "serve", "--port", "1"], env={k: v for k, v in os.environ.items() if k != "ONCOLENS_SECRET_KEY"}
        | without, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "ONCOLENS_SECRET_KEY must be set when the database is not SQLite" in done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy is not installed")
def test_haproxy_with_the_shipped_configuration_routes_around_a_stopped_replica(
    pair: list[Replica], tmp_path: Path
) -> None:
    """Last in this module: it stops replica b."""
    a, b = pair
    port = free_port()
    config = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    config = config.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{port}")
    config = config.replace("127.0.0.1:8001", a.url.removeprefix("http://"))
    config = config.replace("127.0.0.1:8002", b.url.removeprefix("http://"))
    (tmp_path / "haproxy.cfg").write_text(config)
    proxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    front = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if httpx.get(f"{front}/api/v1/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        served = {httpx.get(f"{front}/api/v1/models").status_code for _ in range(10)}
        assert served == {200}
        # a browser's cookie keeps it on one replica
        first = httpx.get(f"{front}/api/v1/health")
        assert first.cookies.get("ONCOLENS_REPLICA") in ("r1", "r2")
        stop(b)
        time.sleep(5)  # two failed checks 2 s apart take it out of rotation
        answers = [httpx.get(f"{front}/api/v1/models").status_code for _ in range(20)]
        assert answers == [200] * 20  # every request reaches the replica still running
    finally:
        proxy.terminate()
        log = proxy.communicate(timeout=10)[0].decode(errors="replace")
    assert "replicas/replica2 is DOWN" in log, log[-2000:]
