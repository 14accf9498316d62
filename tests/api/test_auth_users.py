from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from oncolens.accounts.auth import create_access_token, hash_password
from oncolens.app import create_app
from oncolens.store.db.models import User
from tests.api.conftest import db_settings

PASSWORD = "correct horse battery"


def add_user(client: TestClient, email: str, role: str, password: str = PASSWORD) -> User:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        user = User(email=email, hashed_password=hash_password(password), role=role, full_name=email.split("@")[0])
        session.add(user)
        session.commit()
        session.refresh(user)
        return user


def login(client: TestClient, email: str, password: str = PASSWORD) -> dict[str, str]:
    response = client.post("/api/v1/auth/token", data={"username": email, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture(scope="module")
def client(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("data"), database_url, login_max_failures=3, preload_models=False)
    with TestClient(create_app(settings)) as test_client:
        add_user(test_client, "admin@clinic.org", "admin")
        add_user(test_client, "doc@clinic.org", "clinician")
        yield test_client


def test_login_gives_a_bearer_token_for_users_me(client: TestClient) -> None:
    response = client.post("/api/v1/auth/token", data={"username": "Doc@Clinic.org", "password": PASSWORD})
    body = response.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    me = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {body['access_token']}"}).json()
    assert me["email"] == "doc@clinic.org" and me["role"] == "clinician"


def test_login_errors_do_not_reveal_whether_the_account_exists(client: TestClient) -> None:
    wrong = client.post("/api/v1/auth/token", data={"username": "admin@clinic.org", "password": "nope-nope-nope"})
    missing = client.post("/api/v1/auth/token", data={"username": "ghost@clinic.org", "password": "nope-nope-nope"})
    assert wrong.status_code == missing.status_code == 401
    assert wrong.json() == missing.json() == {"detail": "incorrect email or password"}


def test_repeated_failures_lock_the_account_name(client: TestClient) -> None:
    add_user(client, "locked@clinic.org", "viewer")
    for _ in range(3):
        assert (
            client.post("/api/v1/auth/token", data={"username": "locked@clinic.org", "password": "x" * 12}).status_code
            == 401
        )
    locked = client.post("/api/v1/auth/token", data={"username": "locked@clinic.org", "password": PASSWORD})
    assert locked.status_code == 429
    assert "too many failed logins" in locked.json()["detail"]
    # an unknown account name is locked the same way, so the lock reveals nothing either
    for _ in range(3):
        client.post("/api/v1/auth/token", data={"username": "nobody@clinic.org", "password": "x" * 12})
    assert client.post("/api/v1/auth/token", data={"username": "nobody@clinic.org", "password": "x"}).status_code == 429


def test_expired_and_forged_tokens_are_refused(client: TestClient) -> None:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        user = session.get(User, 1)
        assert user is not None
        past = datetime.now(UTC) - timedelta(minutes=90)
        expired = create_access_token(user, client.app.state.secret, 60, now=past)  # type: ignore[attr-defined]
        forged = create_access_token(user, "another-secret-key-of-sufficient-length!", 60)
    response = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401 and "expired" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"
    forged_response = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {forged}"})
    assert forged_response.status_code == 401 and "not valid" in forged_response.json()["detail"]
    assert client.get("/api/v1/users/me").status_code == 401


def test_admins_manage_users_and_others_cannot(client: TestClient) -> None:
    admin, doc = login(client, "admin@clinic.org"), login(client, "doc@clinic.org")
    new = {"email": "nurse@clinic.org", "password": "long enough pw", "role": "viewer", "full_name": "Nurse"}
    assert client.post("/api/v1/users", json=new, headers=doc).status_code == 403
    created = client.post("/api/v1/users", json=new, headers=admin)
    assert created.status_code == 201 and created.json()["role"] == "viewer"
    duplicate = client.post("/api/v1/users", json=new, headers=admin)
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
    weak = client.post("/api/v1/users", json=new | {"email": "w@clinic.org", "password": "short"}, headers=admin)
    assert weak.status_code == 422
    emails = [u["email"] for u in client.get("/api/v1/users", headers=admin).json()]
    assert "nurse@clinic.org" in emails
    assert client.get("/api/v1/users", headers=doc).status_code == 403
    user_id = created.json()["id"]
    patched = client.patch(f"/api/v1/users/{user_id}", json={"is_active": False}, headers=admin)
    assert patched.json()["is_active"] is False
    refused = client.post("/api/v1/auth/token", data={"username": "nurse@clinic.org", "password": "long enough pw"})
    assert refused.status_code == 401
    me = client.get("/api/v1/users/me", headers=admin).json()
    self_demote = client.patch(f"/api/v1/users/{me['id']}", json={"role": "viewer"}, headers=admin)
    assert self_demote.status_code == 409


def test_users_change_their_own_name_and_password(client: TestClient) -> None:
    add_user(client, "self@clinic.org", "clinician")
    headers = login(client, "self@clinic.org")
    assert (
        client.patch("/api/v1/users/me", json={"full_name": "Dr Self"}, headers=headers).json()["full_name"]
        == "Dr Self"
    )
    bad = client.patch(
        "/api/v1/users/me", json={"password": "a new password", "current_password": "wrong"}, headers=headers
    )
    assert bad.status_code == 401
    ok = client.patch(
        "/api/v1/users/me", json={"password": "a new password", "current_password": PASSWORD}, headers=headers
    )
    assert ok.status_code == 200
    login(client, "self@clinic.org", "a new password")


def test_secret_key_is_created_once_and_kept(tmp_path: Path) -> None:
    from oncolens.accounts.auth import load_or_create_secret

    first = load_or_create_secret(tmp_path)
    assert load_or_create_secret(tmp_path) == first and len(first) > 40
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
