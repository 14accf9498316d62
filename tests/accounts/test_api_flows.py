"""Invitations, password reset, sign-up and the second factor through the API, with the e-mail
delivered to a real SMTP server on loopback and read back from it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import Session, select

from oncolens.store.db.models import AccountToken, User, utcnow
from tests.accounts.conftest import (
    PASSWORD,
    Clock,
    Inbox,
    add_user,
    audit_actions,
    bearer,
    code_in,
    html_of,
    link_in,
    make_client,
    text_of,
)

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture(scope="module")
def mail(smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory, database_url, smtp[1], mail_max_per_hour=3, login_max_failures=4) as client:
        add_user(client, "admin@clinic.org", "admin")
        add_user(client, "doc@clinic.org", "clinician")
        yield client


@pytest.fixture(scope="module")
def inbox(smtp: tuple[Inbox, int]) -> Inbox:
    return smtp[0]


@pytest.fixture(scope="module")
def admin(mail: TestClient) -> dict[str, str]:
    return bearer(mail, "admin@clinic.org")


def expire_tokens(client: TestClient, user_email: str) -> None:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        user = session.exec(select(User).where(User.email == user_email)).one()
        session.exec(
            update(AccountToken)
            .where(AccountToken.user_id == user.id)  # type: ignore[arg-type]
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()


# --- invitations ----------------------------------------------------------------------------------------


def test_an_invitation_is_mailed_and_sets_the_password_once(
    mail: TestClient, inbox: Inbox, admin: dict[str, str]
) -> None:
    sent = mail.post(
        "/api/v1/users/invitations",
        json={"email": "New.Nurse@Clinic.org", "role": "viewer", "full_name": "New Nurse"},
        headers=admin,
    )
    assert sent.status_code == 201, sent.text
    assert sent.json()["state"] == "invited" and sent.json()["role"] == "viewer"
    assert sent.json()["email_verified"] is False
    message = inbox.last_to("new.nurse@clinic.org")
    assert message["Subject"] == "Riverside Clinic: you are invited to OncoLens"
    assert message["From"] == "OncoLens <noreply@clinic.org>"
    assert "as a viewer" in text_of(message) and "expires in 72 hours" in text_of(message)
    assert "https://oncolens.clinic.org/invite?token=" in html_of(message)
    token = link_in(message, "/invite")
    # before accepting, no password opens the account (the answer is the usual one)
    tried = mail.post("/api/v1/auth/token", data={"username": "new.nurse@clinic.org", "password": "x" * 12})
    assert tried.status_code == 401 and tried.json() == {"detail": "incorrect email or password"}
    weak = mail.post("/api/v1/auth/invitations/accept", json={"token": token, "password": "short"})
    assert weak.status_code == 422
    accepted = mail.post("/api/v1/auth/invitations/accept", json={"token": token, "password": NEW_PASSWORD})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["state"] == "active" and accepted.json()["email_verified"] is True
    me = mail.get("/api/v1/users/me", headers=bearer(mail, "new.nurse@clinic.org", NEW_PASSWORD)).json()
    assert me["full_name"] == "New Nurse" and me["role"] == "viewer"
    again = mail.post("/api/v1/auth/invitations/accept", json={"token": token, "password": "another passphrase"})
    assert again.status_code == 400
    assert again.json()["detail"] == "this link is not valid: it has expired or was already used; ask for a new one"
    actions = audit_actions(mail, admin)
    assert "invite_sent" in actions and "invite_accepted" in actions


def test_an_expired_or_renewed_invitation_link_stops_working(
    mail: TestClient, inbox: Inbox, admin: dict[str, str]
) -> None:
    body = {"email": "late@clinic.org", "role": "clinician"}
    assert mail.post("/api/v1/users/invitations", json=body, headers=admin).status_code == 201
    first = link_in(inbox.last_to("late@clinic.org"), "/invite")
    assert mail.post("/api/v1/users/invitations", json=body, headers=admin).status_code == 201, "renewed"
    second = link_in(inbox.last_to("late@clinic.org"), "/invite")
    assert first != second
    old = mail.post("/api/v1/auth/invitations/accept", json={"token": first, "password": NEW_PASSWORD})
    assert old.status_code == 400, "the renewed invitation replaces the first link"
    expire_tokens(mail, "late@clinic.org")
    late = mail.post("/api/v1/auth/invitations/accept", json={"token": second, "password": NEW_PASSWORD})
    assert late.status_code == 400 and "expired" in late.json()["detail"]


def test_only_admins_invite_and_an_existing_account_is_not_reinvited(mail: TestClient, admin: dict[str, str]) -> None:
    doc = bearer(mail, "doc@clinic.org")
    body = {"email": "someone@clinic.org", "role": "admin"}
    assert mail.post("/api/v1/users/invitations", json=body, headers=doc).status_code == 403
    taken = mail.post("/api/v1/users/invitations", json={"email": "doc@clinic.org"}, headers=admin)
    assert taken.status_code == 409 and taken.json()["detail"] == "a user with e-mail doc@clinic.org already exists"
    bad = mail.post("/api/v1/users/invitations", json={"email": "not-an-address"}, headers=admin)
    assert bad.status_code == 422


# --- password reset -------------------------------------------------------------------------------------


def test_password_reset_answers_alike_and_mails_only_an_existing_account(mail: TestClient, inbox: Inbox) -> None:
    add_user(mail, "forgetful@clinic.org", "clinician")
    before = len(inbox.all())
    known = mail.post("/api/v1/auth/password-reset", json={"email": "Forgetful@clinic.org"})
    unknown = mail.post("/api/v1/auth/password-reset", json={"email": "ghost@clinic.org"})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    assert "expires in 30 minutes" in known.json()["detail"]
    assert len(inbox.all()) == before + 1 and not inbox.to("ghost@clinic.org")
    message = inbox.last_to("forgetful@clinic.org")
    assert message["Subject"] == "Riverside Clinic: reset your password"


def test_a_reset_link_works_once_and_ends_every_session(mail: TestClient, inbox: Inbox, admin: dict[str, str]) -> None:
    add_user(mail, "reset@clinic.org", "clinician")
    session_token = bearer(mail, "reset@clinic.org")
    mail.post("/api/v1/auth/password-reset", json={"email": "reset@clinic.org"})
    first = link_in(inbox.last_to("reset@clinic.org"), "/reset-password")
    mail.post("/api/v1/auth/password-reset", json={"email": "reset@clinic.org"})
    token = link_in(inbox.last_to("reset@clinic.org"), "/reset-password")
    assert (
        mail.post("/api/v1/auth/password-reset/confirm", json={"token": first, "password": NEW_PASSWORD}).status_code
        == 400
    )
    weak = mail.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": "tiny"})
    assert weak.status_code == 422, "refused before the link is used up"
    done = mail.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": NEW_PASSWORD})
    assert done.status_code == 200, done.text
    old = mail.get("/api/v1/users/me", headers=session_token)
    assert old.status_code == 401 and "revoked" in old.json()["detail"]
    assert mail.get("/api/v1/users/me", headers=bearer(mail, "reset@clinic.org", NEW_PASSWORD)).status_code == 200
    reuse = mail.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": "yet another phrase"})
    assert reuse.status_code == 400 and "already used" in reuse.json()["detail"]
    actions = audit_actions(mail, admin)
    assert "reset_requested" in actions and "reset_done" in actions


def test_an_expired_reset_link_is_refused(mail: TestClient, inbox: Inbox) -> None:
    add_user(mail, "slow@clinic.org", "viewer")
    mail.post("/api/v1/auth/password-reset", json={"email": "slow@clinic.org"})
    token = link_in(inbox.last_to("slow@clinic.org"), "/reset-password")
    expire_tokens(mail, "slow@clinic.org")
    late = mail.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": NEW_PASSWORD})
    assert late.status_code == 400 and "expired" in late.json()["detail"]
    assert (
        mail.post("/api/v1/auth/token", data={"username": "slow@clinic.org", "password": PASSWORD}).status_code == 200
    )


def test_reset_requests_are_throttled_per_address_whether_or_not_it_exists(mail: TestClient) -> None:
    add_user(mail, "busy@clinic.org", "viewer")
    for address in ("busy@clinic.org", "nobody-here@clinic.org"):
        answers = [mail.post("/api/v1/auth/password-reset", json={"email": address}) for _ in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        assert "too many e-mail requests" in answers[-1].json()["detail"]


# --- second factor --------------------------------------------------------------------------------------


def enrol(client: TestClient, headers: dict[str, str], clock: Clock) -> tuple[str, list[str]]:
    setup = client.post("/api/v1/users/me/2fa/setup", headers=headers)
    assert setup.status_code == 200, setup.text
    body = setup.json()
    assert body["qr_svg"].lstrip().startswith("<svg") and body["otpauth_uri"].startswith("otpauth://totp/")
    assert "issuer=Riverside%20Clinic" in body["otpauth_uri"]
    status = client.get("/api/v1/users/me/2fa", headers=headers).json()
    assert status["enabled"] is False and status["pending"] is True and status["recovery_codes_left"] == 0
    wrong = client.post("/api/v1/users/me/2fa/enable", json={"code": "000000"}, headers=headers)
    assert wrong.status_code == 422 and "does not match" in wrong.json()["detail"]
    enabled = client.post(
        "/api/v1/users/me/2fa/enable", json={"code": clock.next_code(body["secret"])}, headers=headers
    )
    assert enabled.status_code == 200, enabled.text
    codes = enabled.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    return body["secret"], codes


def test_two_factor_sign_in_with_codes_and_recovery_codes(
    mail: TestClient, admin: dict[str, str], clock: Clock
) -> None:
    add_user(mail, "careful@clinic.org", "clinician")
    secret, codes = enrol(mail, bearer(mail, "careful@clinic.org"), clock)
    form = {"username": "careful@clinic.org", "password": PASSWORD}
    missing = mail.post("/api/v1/auth/token", data=form)
    assert missing.status_code == 401 and "'otp'" in missing.json()["detail"]
    wrong = mail.post("/api/v1/auth/token", data=form | {"otp": "123456"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "the two-factor code is wrong or was already used"
    code = clock.next_code(secret)
    assert mail.post("/api/v1/auth/token", data=form | {"otp": code}).status_code == 200
    replay = mail.post("/api/v1/auth/token", data=form | {"otp": code})
    assert replay.status_code == 401, "a code is accepted once"
    assert mail.post("/api/v1/auth/token", data=form | {"otp": codes[0].upper()}).status_code == 200
    assert mail.post("/api/v1/auth/token", data=form | {"otp": codes[0]}).status_code == 401, (
        "recovery codes are single-use"
    )
    headers = bearer(mail, "careful@clinic.org", otp=clock.next_code(secret))
    assert mail.get("/api/v1/users/me/2fa", headers=headers).json()["recovery_codes_left"] == 9
    assert mail.get("/api/v1/users/me", headers=headers).json()["two_factor"] is True
    actions = audit_actions(mail, admin)
    assert {"2fa_enrolled", "2fa_failed", "recovery_code_used"} <= set(actions)
    # the admin resets it (a lost phone): sessions end, the password alone signs in again
    user_id = mail.get("/api/v1/users/me", headers=headers).json()["id"]
    reset = mail.delete(f"/api/v1/users/{user_id}/2fa", headers=admin)
    assert reset.status_code == 200 and reset.json()["two_factor"] is False
    assert mail.get("/api/v1/users/me", headers=headers).status_code == 401
    assert mail.post("/api/v1/auth/token", data=form).status_code == 200
    assert mail.delete(f"/api/v1/users/{user_id}/2fa", headers=admin).status_code == 409
    assert "2fa_reset" in audit_actions(mail, admin)


def test_wrong_codes_count_towards_the_login_lock(mail: TestClient, clock: Clock) -> None:
    add_user(mail, "guessed@clinic.org", "clinician")
    secret, _ = enrol(mail, bearer(mail, "guessed@clinic.org"), clock)
    form = {"username": "guessed@clinic.org", "password": PASSWORD}
    # a correct password without a code never clears the count, so codes cannot be guessed in between
    answers = [mail.post("/api/v1/auth/token", data=form | ({"otp": "000001"} if i % 2 else {})) for i in range(4)]
    assert [a.status_code for a in answers] == [401, 401, 401, 401]
    locked = mail.post("/api/v1/auth/token", data=form | {"otp": clock.next_code(secret)})
    assert locked.status_code == 429 and "too many failed logins" in locked.json()["detail"]


def test_turning_two_factor_off_needs_the_password_and_a_code(mail: TestClient, clock: Clock) -> None:
    add_user(mail, "switch@clinic.org", "clinician")
    secret, codes = enrol(mail, bearer(mail, "switch@clinic.org"), clock)
    headers = bearer(mail, "switch@clinic.org", otp=clock.next_code(secret))
    twice = mail.post("/api/v1/users/me/2fa/setup", headers=headers)
    assert twice.status_code == 409 and "already on" in twice.json()["detail"]
    bad_password = mail.post(
        "/api/v1/users/me/2fa/disable", json={"password": "wrong", "code": codes[1]}, headers=headers
    )
    bad_code = mail.post("/api/v1/users/me/2fa/disable", json={"password": PASSWORD, "code": "999999"}, headers=headers)
    # The same answer whichever is wrong: the route is no oracle for the password (issue 38, finding 5).
    assert bad_password.status_code == bad_code.status_code == 422
    assert bad_password.json() == bad_code.json() == {"detail": "the password or the code is wrong"}
    new = mail.post("/api/v1/users/me/2fa/recovery-codes", json={"code": clock.next_code(secret)}, headers=headers)
    assert new.status_code == 200 and codes[1] not in new.json()["recovery_codes"]
    stale = mail.post("/api/v1/users/me/2fa/disable", json={"password": PASSWORD, "code": codes[1]}, headers=headers)
    assert stale.status_code == 422, "the old recovery codes stopped working"
    off = mail.post(
        "/api/v1/users/me/2fa/disable",
        json={"password": PASSWORD, "code": new.json()["recovery_codes"][0]},
        headers=headers,
    )
    assert off.status_code == 200 and off.json()["two_factor"] is False


# --- servers without e-mail, and servers that require a second factor -----------------------------------


def test_without_smtp_every_e_mail_feature_says_so(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    with make_client(tmp_path_factory, database_url, None, self_signup=True) as client:
        add_user(client, "plain-admin@clinic.org", "admin")
        admin = bearer(client, "plain-admin@clinic.org")
        invite = client.post("/api/v1/users/invitations", json={"email": "x@clinic.org"}, headers=admin)
        reset = client.post("/api/v1/auth/password-reset", json={"email": "plain-admin@clinic.org"})
        signup = client.post("/api/v1/auth/signup", json={"email": "y@clinic.org", "password": NEW_PASSWORD})
        for answer in (invite, reset, signup):
            assert answer.status_code == 409
            assert "e-mail is not set up on this server (ONCOLENS_SMTP_HOST is not set)" in answer.json()["detail"]
            assert "`oncolens users`" in answer.json()["detail"]
        assert "plain-admin@clinic.org" in [u["email"] for u in client.get("/api/v1/users", headers=admin).json()]


def test_a_server_that_requires_two_factor_lets_a_user_only_enrol_first(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, clock: Clock
) -> None:
    with make_client(tmp_path_factory, database_url, None, require_two_factor=True) as client:
        add_user(client, "strict@clinic.org", "clinician")
        headers = bearer(client, "strict@clinic.org")
        refused = client.get("/api/v1/cases", headers=headers)
        assert refused.status_code == 403 and "requires two-factor sign-in" in refused.json()["detail"]
        assert client.get("/api/v1/users/me", headers=headers).status_code == 200
        assert client.get("/api/v1/users/me/2fa", headers=headers).json()["required"] is True
        secret, codes = enrol(client, headers, clock)
        # Turning the second factor on ends the sessions opened with the password alone (finding 18).
        assert client.get("/api/v1/cases", headers=headers).status_code == 401
        headers = bearer(client, "strict@clinic.org", otp=clock.next_code(secret))
        assert client.get("/api/v1/cases", headers=headers).status_code == 200
        off = client.post(
            "/api/v1/users/me/2fa/disable", json={"password": PASSWORD, "code": codes[0]}, headers=headers
        )
        assert off.status_code == 409 and "required on this server" in off.json()["detail"]
        assert (
            client.post(
                "/api/v1/auth/token",
                data={"username": "strict@clinic.org", "password": PASSWORD, "otp": clock.next_code(secret)},
            ).status_code
            == 200
        )


# --- self-sign-up ---------------------------------------------------------------------------------------


def test_self_sign_up_needs_the_e_mailed_code_then_an_admins_approval(
    smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    inbox, port = smtp
    with make_client(tmp_path_factory, database_url, port, self_signup=True) as client:
        add_user(client, "boss@clinic.org", "admin")
        admin = bearer(client, "boss@clinic.org")
        body = {"email": "Walk.In@clinic.org", "full_name": "Walk In", "password": NEW_PASSWORD}
        started = client.post("/api/v1/auth/signup", json=body)
        assert started.status_code == 202, started.text
        code = code_in(inbox.last_to("walk.in@clinic.org"))
        assert f"your sign-up code is {code}" in inbox.last_to("walk.in@clinic.org")["Subject"]
        login = {"username": "walk.in@clinic.org", "password": NEW_PASSWORD}
        early = client.post("/api/v1/auth/token", data=login)
        # The password waits with the code until the code is entered (finding 4): no login before.
        assert early.status_code == 401 and early.json()["detail"] == "incorrect email or password"
        users_now = client.get("/api/v1/users", headers=admin).json()
        pending = next(u for u in users_now if u["email"] == "walk.in@clinic.org")
        assert pending["state"] == "unverified"
        unverified = client.post(f"/api/v1/users/{pending['id']}/approve", headers=admin)
        assert unverified.status_code == 409 and "not verified the address" in unverified.json()["detail"]
        wrong = client.post(
            "/api/v1/auth/signup/verify",
            json={"email": "walk.in@clinic.org", "code": "000000" if code != "000000" else "111111"},
        )
        assert wrong.status_code == 400 and wrong.json()["detail"] == "the code is wrong or has expired"
        ok = client.post("/api/v1/auth/signup/verify", json={"email": "walk.in@clinic.org", "code": code})
        assert ok.status_code == 200 and "administrator must approve" in ok.json()["detail"]
        assert "awaits approval" in inbox.last_to("boss@clinic.org")["Subject"]
        waiting = client.post("/api/v1/auth/token", data=login)
        assert (
            waiting.status_code == 403 and waiting.json()["detail"] == "this account awaits an administrator's approval"
        )
        user = next(u for u in client.get("/api/v1/users", headers=admin).json() if u["email"] == "walk.in@clinic.org")
        assert user["state"] == "awaiting approval" and user["role"] == "viewer"
        approved = client.post(f"/api/v1/users/{user['id']}/approve", headers=admin)
        assert approved.status_code == 200 and approved.json()["state"] == "active"
        assert "approved" in inbox.last_to("walk.in@clinic.org")["Subject"]
        assert client.post(f"/api/v1/users/{user['id']}/approve", headers=admin).status_code == 409
        assert client.post("/api/v1/auth/token", data=login).status_code == 200
        actions = audit_actions(client, admin)
        assert {"signup_requested", "signup_code_failed", "signup_verified", "user_approved"} <= set(actions)
        # an address that has an account gets the same answer and a note, not a code
        again = client.post("/api/v1/auth/signup", json=body)
        assert again.status_code == 202 and again.json() == started.json()
        assert "already have an account" in inbox.last_to("walk.in@clinic.org")["Subject"]


def test_a_sign_up_code_dies_after_five_wrong_tries(
    smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    inbox, port = smtp
    with make_client(tmp_path_factory, database_url, port, self_signup=True) as client:
        body = {"email": "guess@clinic.org", "password": NEW_PASSWORD}
        client.post("/api/v1/auth/signup", json=body)
        code = code_in(inbox.last_to("guess@clinic.org"))
        wrong = f"{(int(code) + 1) % 10**6:06d}"
        for _ in range(5):
            assert (
                client.post("/api/v1/auth/signup/verify", json={"email": "guess@clinic.org", "code": wrong}).status_code
                == 400
            )
        late = client.post("/api/v1/auth/signup/verify", json={"email": "guess@clinic.org", "code": code})
        assert late.status_code == 400, "the right code no longer works"
        unknown = client.post("/api/v1/auth/signup/verify", json={"email": "nobody@clinic.org", "code": code})
        assert unknown.status_code == 400 and unknown.json() == late.json()


def test_sign_up_is_off_by_default(mail: TestClient) -> None:
    answer = mail.post("/api/v1/auth/signup", json={"email": "z@clinic.org", "password": NEW_PASSWORD})
    assert answer.status_code == 403
    assert answer.json()["detail"] == "self sign-up is off on this server: ask an administrator for an invitation"


def test_the_access_log_never_holds_an_e_mailed_token() -> None:
    import logging

    from oncolens.http.middleware import RedactSecrets

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/reset-password?token=SeCrEt-123_x&next=/a", "1.1", 200), None,
    )  # fmt: skip
    assert RedactSecrets().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /reset-password?token=[redacted]&next=/a HTTP/1.1" 200'
