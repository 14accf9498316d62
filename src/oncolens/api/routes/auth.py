"""Log in (OAuth2 password flow, JWT bearer tokens) and log out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import OAuth2PasswordRequestForm

from oncolens.api.deps import BearerToken, CurrentUser, SessionDep, SettingsDep, client_of
from oncolens.api.records import Token
from oncolens.auth import create_access_token
from oncolens.services import users
from oncolens.services.audit import Actor

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
    user = users.login(session, settings, form.username, form.password, client_of(request))
    minutes = settings.access_token_minutes
    return Token(access_token=create_access_token(user, request.app.state.secret, minutes), expires_in=minutes * 60)


@router.post("/logout", status_code=204, response_class=Response)
def logout(request: Request, user: CurrentUser, token: BearerToken, session: SessionDep) -> Response:
    """End this access token now (other tokens of the account stay valid)."""
    users.logout(session, Actor(user, client_of(request)), token, request.app.state.secret)
    return Response(status_code=204)
