"""Browser sessions: the same users, roles and JWTs as the API, carried in an HttpOnly cookie.

Every form carries a CSRF token that must equal the ``oncolens_csrf`` cookie (double submit); the
session cookie is SameSite=Lax, so another site can neither read the token nor post with it.
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request, Response
from sqlmodel import Session

from oncolens.auth import AuthError, revoke_token, user_for_token
from oncolens.db.models import User

SESSION_COOKIE = "oncolens_session"
CSRF_COOKIE = "oncolens_csrf"


class NotLoggedIn(Exception):
    """The page needs a logged-in user; the web app answers with a redirect to the login page."""


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


def start_session(request: Request, response: Response, token: str, minutes: int) -> None:
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
