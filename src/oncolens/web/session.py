"""Browser sessions: the same users, roles and JWTs as the API, carried in an HttpOnly cookie.

Every form carries a CSRF token that must equal the ``oncolens_csrf`` cookie (double submit); the
session cookie is SameSite=Lax, so another site can neither read the token nor post with it.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime, timedelta

import jwt
from fastapi import Request, Response
from sqlmodel import Session

from oncolens.accounts.auth import ALGORITHM, AuthError, revoke_token, user_for_token
from oncolens.services.accounts import needs_enrolment
from oncolens.store.db.models import User

SESSION_COOKIE = "oncolens_session"
CSRF_COOKIE = "oncolens_csrf"


class NotLoggedIn(Exception):
    """The page needs a logged-in user; the web app answers with a redirect to the login page."""


class MustEnrol(Exception):
    """The server requires a second factor this user has not enrolled; the web app sends them to /account."""


class CsrfFailed(Exception):
    """A form came without the CSRF token of this browser."""


def csrf_token(request: Request) -> str:
    """This browser's CSRF token (made on first use; set as a cookie by ``remember_csrf``)."""
    token = request.cookies.get(CSRF_COOKIE) or getattr(request.state, "new_csrf", None)
    if not token:
        token = secrets.token_urlsafe(24)
        request.state.new_csrf = token
    return str(token)


def remember_csrf(request: Request, response: Response) -> None:
    new = getattr(request.state, "new_csrf", None)
    if new:
        response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="strict", secure=request.url.scheme == "https")


def check_csrf(request: Request, sent: str | None) -> None:
    expected = request.cookies.get(CSRF_COOKIE)
    if not expected or not sent or not hmac.compare_digest(expected, sent):
        raise CsrfFailed("the form has expired or came from another site; reload the page and try again")


def web_user(request: Request, session: Session) -> User:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise NotLoggedIn
    try:
        return user_for_token(session, token, request.app.state.secret)
    except AuthError as exc:
        raise NotLoggedIn from exc


def enrolled_web_user(request: Request, session: Session) -> User:
    """The logged-in user; one who owes the second factor the server requires is sent to /account."""
    user = web_user(request, session)
    if needs_enrolment(request.app.state.settings, user):
        raise MustEnrol
    return user


def start_session(request: Request, response: Response, token: str, minutes: int, rotate_csrf: bool = True) -> None:
    """Sign this browser in with ``token``; a new CSRF token goes with a new login (a token planted
    before the login does not carry over into the session)."""
    if rotate_csrf:
        response.set_cookie(
            CSRF_COOKIE,
            secrets.token_urlsafe(24),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=minutes * 60,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def end_session(request: Request, response: Response, session: Session) -> None:
    """Log this browser out: its token is revoked on the server (a copied cookie stops working too)."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        revoke_token(session, token, request.app.state.secret)
        session.commit()
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=request.url.scheme == "https")


SECOND_FACTOR_COOKIE = "oncolens_2fa"
SECOND_FACTOR_MINUTES = 5


def start_second_factor(request: Request, response: Response, user: User, next_path: str) -> None:
    """After a correct password on an account with a second factor: a short-lived, signed cookie that
    lets this browser send the code (and nothing else)."""
    now = datetime.now(UTC)
    claims = {
        "sub": str(user.id),
        "purpose": "second-factor",
        "ver": user.token_version,
        "next": next_path,
        "iat": now,
        "exp": now + timedelta(minutes=SECOND_FACTOR_MINUTES),
    }
    token = jwt.encode(claims, request.app.state.secret, algorithm=ALGORITHM)
    response.set_cookie(
        SECOND_FACTOR_COOKIE,
        token,
        max_age=SECOND_FACTOR_MINUTES * 60,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def second_factor_user(request: Request, session: Session) -> tuple[User, str]:
    """The user (and the page to go to after) whose password this browser got right a moment ago."""
    expired = AuthError("the sign-in has expired: enter your e-mail and password again")
    try:
        claims = jwt.decode(request.cookies.get(SECOND_FACTOR_COOKIE, ""), request.app.state.secret, [ALGORITHM])
    except jwt.InvalidTokenError as exc:
        raise expired from exc
    sub = claims.get("sub")
    if claims.get("purpose") != "second-factor" or not isinstance(sub, str) or not sub.isdigit():
        raise expired
    user = session.get(User, int(sub))
    if user is None or not user.is_active or user.token_version != claims.get("ver"):
        raise expired
    return user, str(claims.get("next", "/analyze"))


def end_second_factor(request: Request, response: Response) -> None:
    response.delete_cookie(SECOND_FACTOR_COOKIE, httponly=True, samesite="strict", secure=request.url.scheme == "https")
