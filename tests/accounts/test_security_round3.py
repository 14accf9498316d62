"""Issue 38 (security round 3): each finding pinned by a test named after its number, on SQLite and
PostgreSQL. The races send real parallel HTTP requests to a live server (uvicorn on loopback)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import delete
from sqlmodel import Session, col, select

from oncolens.store.db.models import AccountToken, AuditEvent, LoginThrottle, MailQueue, User
from tests.accounts.conftest import (
    PASSWORD,
    Clock,
    Inbox,
    add_user,
    bearer,
    code_in,
    link_in,
    make_client,
    register_engine,
    settle_all,
    text_of,
)
from tests.api.conftest import db_settings
from tests.live import live_server

NEW_PASSWORD = "another long passphrase"
PUBLIC = "https://oncolens.clinic.org"


@pytest.fixture(scope="module")
def mail(smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory, database_url, smtp[1], self_signup=True) as client:
        add_user(client, "admin@clinic.org", "admin")
        yield client


@pytest.fixture(scope="module")
def live(
    smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, FastAPI]]:
    """A live server on this module's database, e-mail to the test SMTP server, sign-up on."""
    settings = db_settings(
        tmp_path_factory.mktemp("live"),
        database_url,
        preload_models=False,
        public_url=PUBLIC,
        smtp_host="127.0.0.1",
        smtp_port=smtp[1],
        self_signup=True,
        mail_poll_s=0.05,
        login_max_failures=5,
    )
    with live_server(settings, {"boss@clinic.org": "admin"}) as (url, app):
        register_engine(app.state.engine)
        yield url, app


def parallel(count: int, send: Callable[[httpx.Client, int], httpx.Response]) -> list[httpx.Response]:
    """``count`` requests at once, each on its own connection."""

    def one(index: int) -> httpx.Response:
        with httpx.Client(timeout=60) as client:
            return send(client, index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def statuses(answers: list[httpx.Response]) -> list[int]:
    return sorted(a.status_code for a in answers)


def audit_count(app: FastAPI, action: str, detail_like: str = "") -> int:
    with Session(app.state.engine) as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        if detail_like:
            query = query.where(col(AuditEvent.detail).contains(detail_like))
        return len(session.exec(query).all())


# --- 1. links never come from the request -----------------------------------------------------------------


def test_38_1_without_public_url_e_mail_features_answer_409_naming_it(
    smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with make_client(tmp_path_factory, database_url, smtp[1], public_url=None, self_signup=True) as client:
        add_user(client, "hostless@clinic.org", "clinician")
        for path, body in (
            ("/api/v1/auth/password-reset", {"email": "hostless@clinic.org"}),
            ("/api/v1/auth/signup", {"email": "new@clinic.org", "password": NEW_PASSWORD}),
        ):
            answer = client.post(path, json=body, headers={"Host": "evil.example:8443"})
            assert answer.status_code == 409 and "ONCOLENS_PUBLIC_URL" in answer.json()["detail"], path
        with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
            assert session.exec(select(MailQueue)).all() == [], "nothing queued"


def test_38_1_links_use_the_public_url_whatever_host_the_request_names(
    mail: TestClient, smtp: tuple[Inbox, int]
) -> None:
    inbox = smtp[0]
    add_user(mail, "hosted@clinic.org", "clinician")
    evil = {"Host": "evil.example:8443", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "evil.example"}
    assert (
        mail.post("/api/v1/auth/password-reset", json={"email": "hosted@clinic.org"}, headers=evil).status_code == 202
    )
    text = text_of(inbox.last_to("hosted@clinic.org"))
    assert f"{PUBLIC}/reset-password?token=" in text and "evil.example" not in text


# --- 4. a second sign-up cannot replace a pending password --------------------------------------------------


def test_38_4_re_signing_up_a_pending_address_does_not_replace_its_password(
    mail: TestClient, smtp: tuple[Inbox, int]
) -> None:
    inbox = smtp[0]
    victim = {"email": "victim@clinic.org", "full_name": "Victim", "password": "the victims passphrase"}
    assert mail.post("/api/v1/auth/signup", json=victim).status_code == 202
    code = code_in(inbox.last_to("victim@clinic.org"))
    attacker = victim | {"full_name": "Mallory", "password": "the attackers passphrase"}
    assert mail.post("/api/v1/auth/signup", json=attacker).status_code == 202
    assert mail.post("/api/v1/auth/signup/verify", json={"email": "victim@clinic.org", "code": code}).status_code == 200
    admin = bearer(mail, "admin@clinic.org")
    user = next(u for u in mail.get("/api/v1/users", headers=admin).json() if u["email"] == "victim@clinic.org")
    assert user["full_name"] == "Victim"
    assert mail.post(f"/api/v1/users/{user['id']}/approve", headers=admin).status_code == 200
    login = {"username": "victim@clinic.org"}
    assert mail.post("/api/v1/auth/token", data=login | {"password": "the attackers passphrase"}).status_code == 401
    assert mail.post("/api/v1/auth/token", data=login | {"password": "the victims passphrase"}).status_code == 200


# --- 5. second-factor guesses count towards the lock on every route --------------------------------------


def enrol(client: TestClient, headers: dict[str, str], clock: Clock) -> str:
    secret = client.post("/api/v1/users/me/2fa/setup", headers=headers).json()["secret"]
    enabled = client.post("/api/v1/users/me/2fa/enable", json={"code": clock.next_code(secret)}, headers=headers)
    assert enabled.status_code == 200, enabled.text
    return str(secret)


def test_38_5_wrong_codes_on_the_recovery_codes_route_lock_the_account(mail: TestClient, clock: Clock) -> None:
    add_user(mail, "guessed@clinic.org", "clinician")
    secret = enrol(mail, bearer(mail, "guessed@clinic.org"), clock)
    headers = bearer(mail, "guessed@clinic.org", otp=clock.next_code(secret))
    answers = [
        mail.post("/api/v1/users/me/2fa/recovery-codes", json={"code": f"{n:06d}"}, headers=headers).status_code
        for n in range(8)
    ]
    assert answers[:5] == [422] * 5 and set(answers[5:]) == {429}, answers  # 5 failures lock the name
    right = mail.post("/api/v1/users/me/2fa/recovery-codes", json={"code": clock.next_code(secret)}, headers=headers)
    assert right.status_code == 429, "locked: not even the right code is checked now"


def test_38_5_disable_answers_alike_for_a_wrong_password_or_code_and_counts_both(
    mail: TestClient, clock: Clock
) -> None:
    add_user(mail, "off@clinic.org", "clinician")
    secret = enrol(mail, bearer(mail, "off@clinic.org"), clock)
    headers = bearer(mail, "off@clinic.org", otp=clock.next_code(secret))
    bad_password = mail.post(
        "/api/v1/users/me/2fa/disable",
        json={"password": "not it at all", "code": clock.next_code(secret)},
        headers=headers,
    )
    bad_code = mail.post("/api/v1/users/me/2fa/disable", json={"password": PASSWORD, "code": "000000"}, headers=headers)
    assert bad_password.status_code == bad_code.status_code == 422
    assert bad_password.json() == bad_code.json()
    more = [
        mail.post("/api/v1/users/me/2fa/disable", json={"password": "x" * 12, "code": "1"}, headers=headers).status_code
        for _ in range(4)
    ]
    assert more[-1] == 429, more


def test_38_5_a_wrong_current_password_counts_towards_the_lock(mail: TestClient) -> None:
    add_user(mail, "changer@clinic.org", "clinician")
    headers = bearer(mail, "changer@clinic.org")
    body = {"password": NEW_PASSWORD, "current_password": "wrong guess!!"}
    answers = [mail.patch("/api/v1/users/me", json=body, headers=headers).status_code for _ in range(6)]
    assert answers[:5] == [401] * 5 and answers[-1] == 429, answers


# --- 6. the mail work leaves the request -------------------------------------------------------------------


def test_38_6_a_reset_request_queues_its_letter_and_sends_nothing_itself(
    smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    inbox = smtp[0]
    with make_client(tmp_path_factory, database_url, smtp[1], mail_poll_s=10) as client:
        add_user(client, "queued@clinic.org", "clinician")
        before = len(inbox.received)
        known = client.post("/api/v1/auth/password-reset", json={"email": "queued@clinic.org"})
        unknown = client.post("/api/v1/auth/password-reset", json={"email": "missing@clinic.org"})
        assert known.status_code == unknown.status_code == 202 and known.json() == unknown.json()
        with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
            queued = session.exec(select(MailQueue)).all()
        assert [row.recipient for row in queued] == ["queued@clinic.org"]
        assert len(inbox.received) == before, "no SMTP work inside the request"


# --- 7. throttles hold exactly under parallel requests ---------------------------------------------------


def test_38_7_forty_parallel_resets_mail_at_most_the_limit(live: tuple[str, FastAPI], smtp: tuple[Inbox, int]) -> None:
    url, app = live
    with Session(app.state.engine) as session:
        session.add(User(email="many@clinic.org", hashed_password="x", role="clinician"))
        session.commit()
    before = len(smtp[0].to("many@clinic.org"))  # the inbox is shared by the SQLite and PostgreSQL runs
    answers = parallel(40, lambda c, _: c.post(f"{url}/api/v1/auth/password-reset", json={"email": "many@clinic.org"}))
    assert max(statuses(answers)) < 500, statuses(answers)
    assert statuses(answers).count(202) == 5 and statuses(answers).count(429) == 35
    settle_all()
    assert len(smtp[0].to("many@clinic.org")) - before == 5


def test_38_7_parallel_sign_ups_of_one_address_make_one_account(live: tuple[str, FastAPI]) -> None:
    url, app = live
    body = {"email": "rush@clinic.org", "password": NEW_PASSWORD}
    answers = parallel(12, lambda c, _: c.post(f"{url}/api/v1/auth/signup", json=body))
    assert max(statuses(answers)) < 500, statuses(answers)
    assert statuses(answers).count(202) == 5
    with Session(app.state.engine) as session:
        assert len(session.exec(select(User).where(User.email == "rush@clinic.org")).all()) == 1


# --- 8. one address rule for every edge ------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["a@x.org, b@evil.example", '"dr.house@clinic.example" <mallory@evil.example>', "a@clinic.org\r\nBcc: b@e.org"],
)
def test_38_8_the_web_sign_up_form_refuses_what_is_not_one_address(mail: TestClient, address: str) -> None:
    page = mail.get("/signup")
    csrf = mail.cookies.get("oncolens_csrf")
    assert page.status_code == 200 and csrf
    form = {"email": address, "full_name": "X", "password": NEW_PASSWORD, "csrf_token": csrf}
    answer = mail.post("/signup", data=form)
    assert answer.status_code == 422 and "enter one e-mail address" in answer.text.lower()
    with Session(mail.app.state.engine) as session:  # type: ignore[attr-defined]
        assert not session.exec(select(User).where(col(User.email).contains("evil"))).all()


# --- 9, 10, 11. one-use codes and links are used once -----------------------------------------------------


def test_38_9_one_totp_code_in_twelve_parallel_logins_is_accepted_once(live: tuple[str, FastAPI], clock: Clock) -> None:
    url, app = live
    with Session(app.state.engine) as session:
        session.add(User(email="twelve@clinic.org", hashed_password=_hash(), role="clinician"))
        session.commit()
    with httpx.Client(timeout=60) as client:
        token = client.post(f"{url}/api/v1/auth/token", data={"username": "twelve@clinic.org", "password": PASSWORD})
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        secret = client.post(f"{url}/api/v1/users/me/2fa/setup", headers=headers).json()["secret"]
        made = client.post(f"{url}/api/v1/users/me/2fa/enable", json={"code": clock.next_code(secret)}, headers=headers)
        codes = made.json()["recovery_codes"]
    code = clock.next_code(secret)
    login = {"username": "twelve@clinic.org", "password": PASSWORD}
    answers = parallel(12, lambda c, _: c.post(f"{url}/api/v1/auth/token", data=login | {"otp": code}))
    assert max(statuses(answers)) < 500 and statuses(answers).count(200) == 1, statuses(answers)
    with Session(app.state.engine) as session:  # the failures locked the name: lift it for the next part
        session.exec(delete(LoginThrottle))
        session.commit()
    answers = parallel(12, lambda c, _: c.post(f"{url}/api/v1/auth/token", data=login | {"otp": codes[0]}))
    assert max(statuses(answers)) < 500 and statuses(answers).count(200) == 1, statuses(answers)


def _hash() -> str:
    from oncolens.accounts.auth import hash_password

    return hash_password(PASSWORD)


def test_38_10_ten_parallel_accepts_of_one_invitation_succeed_once(
    live: tuple[str, FastAPI], smtp: tuple[Inbox, int]
) -> None:
    url, app = live
    with httpx.Client(timeout=60) as client:
        token = client.post(f"{url}/api/v1/auth/token", data={"username": "boss@clinic.org", "password": PASSWORD})
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        sent = client.post(
            f"{url}/api/v1/users/invitations", json={"email": "once@clinic.org", "role": "viewer"}, headers=headers
        )
        assert sent.status_code == 201, sent.text
    link = link_in(smtp[0].last_to("once@clinic.org"), "/invite")
    body = {"token": link, "password": NEW_PASSWORD}
    answers = parallel(10, lambda c, _: c.post(f"{url}/api/v1/auth/invitations/accept", json=body))
    assert max(statuses(answers)) < 500 and statuses(answers).count(200) == 1, statuses(answers)
    assert audit_count(app, "invite_accepted") == 1


def test_38_11_parallel_wrong_sign_up_codes_are_checked_at_most_five_times(
    live: tuple[str, FastAPI], smtp: tuple[Inbox, int]
) -> None:
    url, app = live
    with httpx.Client(timeout=60) as client:
        assert client.post(f"{url}/api/v1/auth/signup", json={"email": "code@clinic.org", "password": NEW_PASSWORD})
    code = code_in(smtp[0].last_to("code@clinic.org"))
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    answers = parallel(
        16, lambda c, _: c.post(f"{url}/api/v1/auth/signup/verify", json={"email": "code@clinic.org", "code": wrong})
    )
    assert statuses(answers) == [400] * 16
    assert audit_count(app, "signup_code_failed") == 5, "each wrong code is counted before it is compared"
    with httpx.Client(timeout=60) as client:
        late = client.post(f"{url}/api/v1/auth/signup/verify", json={"email": "code@clinic.org", "code": code})
    assert late.status_code == 400, "the code is used up"


# --- 12. an unverified sign-up cannot be approved ---------------------------------------------------------


def test_38_12_an_unverified_address_cannot_be_approved(mail: TestClient) -> None:
    assert (
        mail.post("/api/v1/auth/signup", json={"email": "squat@clinic.org", "password": NEW_PASSWORD}).status_code
        == 202
    )
    admin = bearer(mail, "admin@clinic.org")
    user = next(u for u in mail.get("/api/v1/users", headers=admin).json() if u["email"] == "squat@clinic.org")
    refused = mail.post(f"/api/v1/users/{user['id']}/approve", headers=admin)
    assert refused.status_code == 409 and "not verified the address" in refused.json()["detail"]
    mail.cookies.set("oncolens_session", admin["Authorization"].split()[1])
    page = mail.get("/admin/users")
    mail.cookies.delete("oncolens_session")
    row = re.search(rf'<tr data-testid="user-{user["id"]}">(.*?)</tr>', page.text, re.S)
    assert row and "/approve" not in row.group(0), "no Approve button for it"


# --- 13. the web role form takes only a known role ----------------------------------------------------------


def test_38_13_an_unknown_role_from_the_web_form_is_refused_and_the_users_list_stays_readable(
    mail: TestClient,
) -> None:
    target = add_user(mail, "roled@clinic.org", "viewer")
    admin = bearer(mail, "admin@clinic.org")
    mail.cookies.set("oncolens_session", admin["Authorization"].split()[1])
    mail.get("/admin/users")
    csrf = mail.cookies.get("oncolens_csrf")
    for role in ("superuser", ""):
        answer = mail.post(f"/admin/users/{target.id}/role", data={"role": role, "csrf_token": csrf})
        assert answer.status_code == 422 and "unknown role" in answer.text.lower()
    mail.cookies.delete("oncolens_session")
    assert mail.get("/api/v1/users", headers=admin).status_code == 200
    assert mail.get(f"/api/v1/users/{target.id}", headers=admin).json()["role"] == "viewer"


# --- 14. no secrets in the log or the audit trail -------------------------------------------------------------


def test_38_14_a_password_typed_as_the_login_name_is_not_kept(mail: TestClient) -> None:
    typed = "Tr0ub4dor&3-my-password"
    assert mail.post("/api/v1/auth/token", data={"username": typed, "password": "x"}).status_code == 401
    with Session(mail.app.state.engine) as session:  # type: ignore[attr-defined]
        details = [e.detail for e in session.exec(select(AuditEvent).where(AuditEvent.action == "login_failed"))]
    assert details and not any(typed.lower() in d.lower() for d in details)
    assert any("unknown account name (fingerprint" in d for d in details)


def test_38_14_sql_parameters_never_reach_an_error_message(mail: TestClient) -> None:
    from sqlalchemy.exc import IntegrityError

    engine = mail.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        session.add(User(email="admin@clinic.org", hashed_password="$argon2id$secret-hash", role="viewer"))
        with pytest.raises(IntegrityError) as caught:
            session.commit()
    assert "secret-hash" not in str(caught.value)


# --- 18. the smaller account findings ---------------------------------------------------------------------


def test_38_18_a_reset_link_dies_when_the_password_is_changed_on_the_account_page(
    mail: TestClient, smtp: tuple[Inbox, int]
) -> None:
    add_user(mail, "linked@clinic.org", "clinician")
    assert mail.post("/api/v1/auth/password-reset", json={"email": "linked@clinic.org"}).status_code == 202
    token = link_in(smtp[0].last_to("linked@clinic.org"), "/reset-password")
    headers = bearer(mail, "linked@clinic.org")
    changed = mail.patch(
        "/api/v1/users/me", json={"password": NEW_PASSWORD, "current_password": PASSWORD}, headers=headers
    )
    assert changed.status_code == 200
    late = mail.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": "a third passphrase"})
    assert late.status_code == 400
    with Session(mail.app.state.engine) as session:  # type: ignore[attr-defined]
        user = session.exec(select(User).where(User.email == "linked@clinic.org")).one()
        assert (
            session.exec(
                select(AccountToken).where(AccountToken.user_id == user.id, col(AccountToken.used_at).is_(None))
            ).all()
            == []
        )


def test_38_18_the_approval_letter_quotes_the_name_and_refuses_web_addresses_in_it(mail: TestClient) -> None:
    body = {"email": "link.name@clinic.org", "full_name": "Click https://evil.example now", "password": NEW_PASSWORD}
    refused = mail.post("/api/v1/auth/signup", json=body)
    assert refused.status_code == 422 and "web addresses" in refused.json()["detail"]


def test_38_18_the_csrf_cookie_changes_at_login(mail: TestClient) -> None:
    add_user(mail, "csrf@clinic.org", "clinician")
    mail.cookies.clear()
    mail.get("/login")
    before = mail.cookies.get("oncolens_csrf")
    done = mail.post(
        "/login", data={"email": "csrf@clinic.org", "password": PASSWORD, "csrf_token": before}, follow_redirects=False
    )
    assert done.status_code == 303
    assert mail.cookies.get("oncolens_csrf") not in (None, before)
    mail.cookies.clear()


def test_38_18_the_mail_queue_claims_a_letter_for_one_drainer_only(mail: TestClient) -> None:
    from oncolens.accounts.mail import Letter
    from oncolens.services import mailqueue

    engine = mail.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        mailqueue.enqueue(session, Letter(to="nobody@clinic.org", subject="s", text="t"))
        session.commit()
    with ThreadPoolExecutor(6) as pool:
        claims = list(pool.map(lambda _: len(mailqueue.claim(engine)), range(6)))
    assert sum(claims) <= 1  # the server's own drainer may have taken it first
    settle_all()
