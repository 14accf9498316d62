from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import OAuth2PasswordRequestForm
from sqlmodel import Session

from oncolens.api.deps import BearerToken, CurrentUser, SessionDep, SettingsDep, client_of
from oncolens.api.records import Token
from oncolens.auth import AuthError, ThrottlePolicy, authenticate, create_access_token, revoke_token
from oncolens.cases import audit
from oncolens.config import Settings
from oncolens.db.models import User

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/token", response_model=Token)
def login(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
) -> Token:
    """OAuth2 password flow: e-mail as ``username`` and password -> a bearer access token (JWT).

    Wrong e-mail and wrong password get the same answer; repeated failures lock the account name
    for a while (429).
    """
    user = audited_login(session, settings, form.username, form.password, client_of(request))
    minutes = settings.access_token_minutes
    return Token(access_token=create_access_token(user, request.app.state.secret, minutes), expires_in=minutes * 60)


@router.post("/logout", status_code=204, response_class=Response)
def logout(request: Request, user: CurrentUser, token: BearerToken, session: SessionDep) -> Response:
    """End this access token now (other tokens of the account stay valid)."""
    revoke_token(session, token, request.app.state.secret)
    audit(session, user, "logout", client=client_of(request))
    session.commit()
    return Response(status_code=204)


def audited_login(
    session: Session, settings: Settings, email: str, password: str, client: str, channel: str = ""
) -> User:
    """Check the password under the login throttle and record the attempt in the audit trail.

    Raises AuthError (after auditing the failure) for a wrong password or a locked account name.
    """
    policy = ThrottlePolicy(settings.login_max_failures, settings.login_lock_minutes)
    note = f" ({channel})" if channel else ""
    try:
        user = authenticate(session, email, password, policy)
    except AuthError as exc:
        audit(session, None, "login_failed", detail=f"{email.strip().lower()[:200]}: {exc}{note}", client=client)
        session.commit()
        raise
    audit(session, user, "login", detail=channel, client=client)
    session.commit()
    return user
