from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from oncolens.api.deps import SessionDep, SettingsDep, client_of
from oncolens.api.records import Token
from oncolens.auth import AuthError, ThrottlePolicy, authenticate, create_access_token
from oncolens.cases import audit

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
    policy = ThrottlePolicy(settings.login_max_failures, settings.login_lock_minutes)
    try:
        user = authenticate(session, form.username, form.password, policy)
    except AuthError as exc:
        audit(
            session,
            None,
            "login_failed",
            detail=f"{form.username.strip().lower()[:200]}: {exc}",
            client=client_of(request),
        )
        session.commit()
        raise
    audit(session, user, "login", client=client_of(request))
    session.commit()
    minutes = settings.access_token_minutes
    return Token(access_token=create_access_token(user, request.app.state.secret, minutes), expires_in=minutes * 60)
