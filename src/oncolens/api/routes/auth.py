"""Log in (OAuth2 password flow, JWT bearer tokens, a TOTP code when enrolled), log out, and the
flows that start from an e-mail: invitations, password reset, self-sign-up."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.security import OAuth2PasswordRequestForm

from oncolens.accounts.auth import create_access_token
from oncolens.api.records import (
    InvitationAccept,
    Message,
    ResetConfirm,
    ResetRequest,
    SignUp,
    SignUpVerify,
    Token,
    UserPublic,
)
from oncolens.http.deps import (
    AccountsDep,
    BearerToken,
    EnrollingUser,
    SessionDep,
    SettingsDep,
    client_of,
)
from oncolens.services import users
from oncolens.services.audit import Actor

router = APIRouter(prefix="/auth", tags=["auth"])

RESET_SENT = (
    "If an active account has this address, a link to choose a new password is on its way; "
    "it expires in {minutes} minutes."
)
SIGNUP_SENT = (
    "If this address can sign up, a 6-digit code is on its way to it; enter it with POST /api/v1/auth/signup/verify "
    "within {minutes} minutes."
)


@router.post("/token", response_model=Token)
def login(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    accounts: AccountsDep,
    settings: SettingsDep,
    otp: Annotated[
        str | None, Form(max_length=32, description="The authenticator app's 6-digit code, or a recovery code.")
    ] = None,
) -> Token:
    """OAuth2 password flow: e-mail as ``username`` and password -> a bearer access token (JWT).

    An account with two-factor sign-in also needs ``otp`` (else 401 saying so). Wrong e-mail and
    wrong password get the same answer; repeated failures (wrong codes included) lock the account
    name for a while (429).
    """
    user = accounts.login(form.username, form.password, client_of(request), otp=otp)
    minutes = settings.access_token_minutes
    return Token(access_token=create_access_token(user, request.app.state.secret, minutes), expires_in=minutes * 60)


@router.post("/logout", status_code=204, response_class=Response)
def logout(request: Request, user: EnrollingUser, token: BearerToken, session: SessionDep) -> Response:
    """End this access token now (other tokens of the account stay valid)."""
    users.logout(session, Actor(user, client_of(request)), token, request.app.state.secret)
    return Response(status_code=204)


@router.post("/password-reset", response_model=Message, status_code=202)
def request_reset(request: Request, body: ResetRequest, accounts: AccountsDep, settings: SettingsDep) -> Message:
    """E-mail a single-use link to choose a new password. The answer is the same whether or not the
    address has an account; requests are limited per address and per client (429)."""
    accounts.request_reset(str(body.email), client_of(request))
    return Message(detail=RESET_SENT.format(minutes=settings.reset_minutes))


@router.post("/password-reset/confirm", response_model=Message)
def confirm_reset(request: Request, body: ResetConfirm, accounts: AccountsDep) -> Message:
    """Set a new password with the token from the reset link; every session of the account ends."""
    accounts.reset_password(body.token, body.password, client_of(request))
    return Message(detail="Your password is changed and every earlier session has ended: sign in with it now.")


@router.post("/invitations/accept", response_model=UserPublic)
def accept_invitation(request: Request, body: InvitationAccept, accounts: AccountsDep) -> UserPublic:
    """Choose a password with the token from an invitation link (which also verifies the address)."""
    return UserPublic.of(accounts.accept_invite(body.token, body.password, body.full_name, client_of(request)))


@router.post("/signup", response_model=Message, status_code=202)
def signup(request: Request, body: SignUp, accounts: AccountsDep, settings: SettingsDep) -> Message:
    """Self-sign-up (only with ``ONCOLENS_SELF_SIGNUP=true``): a code goes to the address; after it,
    an administrator approves the account before it can sign in."""
    accounts.signup(str(body.email), body.full_name, body.password, client_of(request))
    return Message(detail=SIGNUP_SENT.format(minutes=settings.signup_code_minutes))


@router.post("/signup/verify", response_model=Message)
def verify_signup(request: Request, body: SignUpVerify, accounts: AccountsDep) -> Message:
    """Check the e-mailed sign-up code (5 tries per code)."""
    accounts.verify_signup(str(body.email), body.code, client_of(request))
    return Message(detail="Your address is verified. An administrator must approve the account before you can sign in.")
