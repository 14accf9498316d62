"""The same account flows through the web pages (forms with CSRF tokens), e-mail read back from a real
SMTP server on loopback."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.accounts.conftest import PASSWORD, Clock, Inbox, add_user, code_in, link_in, make_client

NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture(scope="module")
def site(smtp: tuple[Inbox, int], database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory, database_url, smtp[1], self_signup=True) as client:
        add_user(client, "chief@clinic.org", "admin")
        add_user(client, "nurse@clinic.org", "viewer")
        yield client


@pytest.fixture(scope="module")
def inbox(smtp: tuple[Inbox, int]) -> Inbox:
    return smtp[0]


def browser_for(site: TestClient) -> TestClient:
    browser = TestClient(site.app)
    browser.get("/login")
    return browser


def post(browser: TestClient, path: str, **fields: str) -> object:
    data = fields | {"csrf_token": browser.cookies["oncolens_csrf"]}
    return browser.post(path, data=data, follow_redirects=False)


def logged_in(site: TestClient, email: str, password: str = PASSWORD) -> TestClient:
    browser = browser_for(site)
    answer = post(browser, "/login", email=email, password=password)
    assert answer.status_code == 303, answer.text  # type: ignore[attr-defined]
    return browser


def test_forgotten_password_by_the_web_pages(site: TestClient, inbox: Inbox) -> None:
    add_user(site, "web-forgot@clinic.org", "clinician")
    browser = browser_for(site)
    assert 'href="/forgot-password"' in browser.get("/login").text
    sent = post(browser, "/forgot-password", email="web-forgot@clinic.org")
    assert sent.status_code == 200 and "Check your e-mail" in sent.text  # type: ignore[attr-defined]
    unknown = post(browser, "/forgot-password", email="nobody@clinic.org")
    assert unknown.text.replace("nobody@clinic.org", "X") == sent.text.replace("web-forgot@clinic.org", "X")  # type: ignore[attr-defined]
    token = link_in(inbox.last_to("web-forgot@clinic.org"), "/reset-password")
    page = browser.get(f"/reset-password?token={token}")
    assert page.status_code == 200 and "Account: web-forgot@clinic.org." in page.text
    differ = post(browser, "/reset-password", token=token, password=NEW_PASSWORD, confirm=NEW_PASSWORD + "x")
    assert differ.status_code == 400 and "The two passwords differ." in differ.text  # type: ignore[attr-defined]
    done = post(browser, "/reset-password", token=token, password=NEW_PASSWORD, confirm=NEW_PASSWORD)
    assert done.status_code == 200 and "Password changed" in done.text  # type: ignore[attr-defined]
    used = browser.get(f"/reset-password?token={token}")
    assert used.status_code == 400 and "already used" in used.text
    logged_in(site, "web-forgot@clinic.org", NEW_PASSWORD)


def test_an_admin_invites_from_the_users_page_and_the_invitee_joins(site: TestClient, inbox: Inbox) -> None:
    chief = logged_in(site, "chief@clinic.org")
    page = chief.get("/admin/users")
    assert page.status_code == 200 and "Send invitation" in page.text
    sent = post(chief, "/admin/users/invite", email="web-invitee@clinic.org", full_name="Dr Web", role="clinician")
    assert sent.status_code == 200 and "Invitation sent to web-invitee@clinic.org." in sent.text  # type: ignore[attr-defined]
    assert re.search(r"web-invitee@clinic.org</td><td>Dr Web</td><td>invited</td>", sent.text)  # type: ignore[attr-defined]
    token = link_in(inbox.last_to("web-invitee@clinic.org"), "/invite")
    invitee = browser_for(site)
    form = invitee.get(f"/invite?token={token}")
    assert "Accept your invitation" in form.text and "(role: clinician)" in form.text
    joined = post(invitee, "/invite", token=token, full_name="Dr Web", password=NEW_PASSWORD, confirm=NEW_PASSWORD)
    assert joined.status_code == 200 and "Welcome to OncoLens" in joined.text  # type: ignore[attr-defined]
    # Accepting the invitation signed this browser in: no second log-in.
    assert "you are signed in" in joined.text  # type: ignore[attr-defined]
    assert invitee.get("/cases", follow_redirects=False).status_code == 200
    assert logged_in(site, "web-invitee@clinic.org", NEW_PASSWORD).get("/cases").status_code == 200
    nurse = logged_in(site, "nurse@clinic.org")
    assert nurse.get("/admin/users", headers={"accept": "text/html"}).status_code == 403


def test_two_factor_enrolment_and_the_second_sign_in_step(site: TestClient, clock: Clock) -> None:
    add_user(site, "web-2fa@clinic.org", "clinician")
    browser = logged_in(site, "web-2fa@clinic.org")
    setup = post(browser, "/account/2fa/setup")
    assert setup.status_code == 200 and "<svg" in setup.text  # type: ignore[attr-defined]
    found = re.search(r'data-testid="totp-secret">([A-Z2-7]+)<', setup.text)  # type: ignore[attr-defined]
    assert found
    secret = found.group(1)
    wrong = post(browser, "/account/2fa/enable", code="000000")
    assert wrong.status_code == 422 and "The code does not match" in wrong.text  # type: ignore[attr-defined]
    # a failed try leaves the enrolment pending: set it up again and enter a right code
    setup = post(browser, "/account/2fa/setup")
    secret = re.search(r'data-testid="totp-secret">([A-Z2-7]+)<', setup.text).group(1)  # type: ignore[union-attr, attr-defined]
    on = post(browser, "/account/2fa/enable", code=clock.next_code(secret))
    assert on.status_code == 200 and 'data-testid="recovery-codes"' in on.text  # type: ignore[attr-defined]
    assert len(re.findall(r"<code>[a-z0-9]{4}-[a-z0-9]{4}-[a-z0-9]{2}</code>", on.text)) == 10  # type: ignore[attr-defined]

    again = browser_for(site)
    first = post(again, "/login", email="web-2fa@clinic.org", password=PASSWORD)
    assert first.status_code == 200 and "Two-factor sign-in" in first.text  # type: ignore[attr-defined]
    assert "oncolens_session" not in again.cookies, "no session before the code"
    bad = post(again, "/login/code", code="123456")
    assert bad.status_code == 401 and "The two-factor code is wrong" in bad.text  # type: ignore[attr-defined]
    good = post(again, "/login/code", code=clock.next_code(secret))
    assert good.status_code == 303 and good.headers["location"] == "/analyze"  # type: ignore[attr-defined]
    assert again.get("/cases").status_code == 200
    stranger = browser_for(site)
    no_password = post(stranger, "/login/code", code=clock.next_code(secret))
    assert no_password.status_code == 401 and "The sign-in has expired" in no_password.text  # type: ignore[attr-defined]


def test_the_admin_approves_deactivates_and_resets_a_second_factor(
    site: TestClient, inbox: Inbox, clock: Clock
) -> None:
    walk_in = browser_for(site)
    started = post(walk_in, "/signup", email="web-walkin@clinic.org", full_name="Walk In", password=NEW_PASSWORD)
    assert started.status_code == 200 and "Enter your sign-up code" in started.text  # type: ignore[attr-defined]
    code = code_in(inbox.last_to("web-walkin@clinic.org"))
    verified = post(walk_in, "/signup/verify", email="web-walkin@clinic.org", code=code)
    assert "Address verified" in verified.text  # type: ignore[attr-defined]
    early = post(walk_in, "/login", email="web-walkin@clinic.org", password=NEW_PASSWORD)
    assert early.status_code == 403 and "This account awaits an administrator&#39;s approval." in early.text  # type: ignore[attr-defined]

    chief = logged_in(site, "chief@clinic.org")
    listing = chief.get("/admin/users").text
    user_id = re.search(r'data-testid="user-(\d+)">\s*<td>web-walkin@clinic.org', listing).group(1)  # type: ignore[union-attr]
    assert "awaiting approval" in listing
    approved = post(chief, f"/admin/users/{user_id}/approve")
    assert "Account approved." in approved.text  # type: ignore[attr-defined]
    assert post(chief, f"/admin/users/{user_id}/role", role="clinician").status_code == 200
    member = logged_in(site, "web-walkin@clinic.org", NEW_PASSWORD)
    assert "(clinician)" in member.get("/analyze").text

    setup = post(member, "/account/2fa/setup")
    secret = re.search(r'data-testid="totp-secret">([A-Z2-7]+)<', setup.text).group(1)  # type: ignore[union-attr, attr-defined]
    post(member, "/account/2fa/enable", code=clock.next_code(secret))
    reset = post(chief, f"/admin/users/{user_id}/reset-2fa")
    assert "Second factor reset" in reset.text  # type: ignore[attr-defined]
    assert member.get("/cases", follow_redirects=False).status_code == 303, "the reset ended the user's sessions"
    off = post(chief, f"/admin/users/{user_id}/active", active="false")
    assert "Account deactivated" in off.text  # type: ignore[attr-defined]
    refused = post(browser_for(site), "/login", email="web-walkin@clinic.org", password=NEW_PASSWORD)
    assert refused.status_code == 401  # type: ignore[attr-defined]


def test_a_server_requiring_two_factor_sends_the_user_to_enrol(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, clock: Clock
) -> None:
    with make_client(tmp_path_factory, database_url, None, require_two_factor=True) as client:
        add_user(client, "web-strict@clinic.org", "clinician")
        browser = logged_in(client, "web-strict@clinic.org")
        sent_away = browser.get("/cases", follow_redirects=False)
        assert sent_away.status_code == 303 and sent_away.headers["location"] == "/account"
        page = browser.get("/account")
        assert "This server requires two-factor sign-in" in page.text
        setup = post(browser, "/account/2fa/setup")
        secret = re.search(r'data-testid="totp-secret">([A-Z2-7]+)<', setup.text).group(1)  # type: ignore[union-attr, attr-defined]
        post(browser, "/account/2fa/enable", code=clock.next_code(secret))
        assert browser.get("/cases").status_code == 200
        assert "Turn two-factor sign-in off" not in browser.get("/account").text
