"""The web pages of accounts: the second sign-in step, forgotten password, invitation, sign-up, your
account (password, two-factor sign-in) and the admin's users page. Same services as the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import Session

from oncolens.accounts.auth import AuthError, PasswordTooWeak, create_access_token
from oncolens.errors import DomainError, NotFound, PermissionDenied
from oncolens.http.deps import AccountsDep, SessionDep, SettingsDep, client_of
from oncolens.http.errors import status_of
from oncolens.services import users
from oncolens.services.accounts import SIGNUP_OFF, Accounts, Enrolment, account_state
from oncolens.services.audit import Actor
from oncolens.store.db.models import Role, TokenPurpose, User
from oncolens.web.render import render, sentence
from oncolens.web.session import (
    check_csrf,
    end_second_factor,
    enrolled_web_user,
    second_factor_user,
    start_session,
    web_user,
)

router = APIRouter(include_in_schema=False)
CODE_FIELD = {
    "name": "code",
    "label": "Code",
    "inputmode": "numeric",
    "autocomplete": "one-time-code",
    "required": True,
}
NEW_PASSWORD = [
    {
        "name": "password",
        "label": "New password",
        "type": "password",
        "autocomplete": "new-password",
        "required": True,
        "minlength": 10,
        "hint": "At least 10 characters.",
    },
    {
        "name": "confirm",
        "label": "New password again",
        "type": "password",
        "autocomplete": "new-password",
        "required": True,
        "minlength": 10,
    },
]


def account_user(request: Request, session: SessionDep) -> User:
    """The logged-in user, even one who still has to enrol the second factor the server requires."""
    return web_user(request, session)


AccountUser = Annotated[User, Depends(account_user)]


def form_page(request: Request, title: str, status: int = 200, **context: Any) -> HTMLResponse:
    defaults: dict[str, Any] = {
        "intro": "",
        "error": None,
        "notice": None,
        "fields": [],
        "hidden": {},
        "links": [],
        "action": "",
        "submit": "Send",
        "user": None,
    }
    return render(request, "form.html", status, title=title, **(defaults | context))


def _status(exc: Exception) -> int:
    if isinstance(exc, AuthError):
        return exc.status
    if isinstance(exc, DomainError):
        return status_of(exc)
    return 400


def _sentence(exc: Exception) -> str:
    return sentence(str(exc))


def _new_passwords(password: str, confirm: str) -> None:
    if password != confirm:
        raise PasswordTooWeak("the two passwords differ")


# --- the second sign-in step ---------------------------------------------------------------------------


def code_page(request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
    return form_page(
        request,
        "Two-factor sign-in",
        status,
        intro="Enter the 6-digit code your authenticator app shows now, or one of your recovery codes.",
        error=error,
        fields=[CODE_FIELD | {"label": "Code from the app"}],
        action="/login/code",
        submit="Sign in",
        links=[("/login", "Start again")],
    )


@router.post("/login/code", response_model=None)
def login_code(
    request: Request,
    session: SessionDep,
    accounts: AccountsDep,
    settings: SettingsDep,
    code: Annotated[str, Form(max_length=32)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    try:
        user, target = second_factor_user(request, session)
        accounts.code_step(user, code, client_of(request), channel="web")
    except (AuthError, DomainError) as exc:
        return code_page(request, _status(exc), _sentence(exc))
    response = RedirectResponse(target, status_code=303)
    end_second_factor(request, response)
    token = create_access_token(user, request.app.state.secret, settings.access_token_minutes)
    start_session(request, response, token, settings.access_token_minutes)
    return response


# --- forgotten password --------------------------------------------------------------------------------


def forgot_page(request: Request, status: int = 200, **context: Any) -> HTMLResponse:
    return form_page(
        request,
        "Forgot your password?",
        status,
        intro="Enter your e-mail address: if it has an account, a link to choose a new password is sent to it.",
        fields=[{"name": "email", "label": "E-mail", "type": "email", "autocomplete": "username", "required": True}],
        action="/forgot-password",
        submit="Send the link",
        links=[("/login", "Back to log in")],
        **context,
    )


@router.get("/forgot-password", response_class=HTMLResponse)
def forgot_form(request: Request) -> HTMLResponse:
    return forgot_page(request)


@router.post("/forgot-password", response_class=HTMLResponse)
def forgot(
    request: Request,
    accounts: AccountsDep,
    settings: SettingsDep,
    email: Annotated[str, Form(max_length=255)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_csrf(request, csrf_token)
    try:
        accounts.request_reset(email, client_of(request))
    except DomainError as exc:
        return forgot_page(request, _status(exc), error=_sentence(exc))
    return form_page(
        request,
        "Check your e-mail",
        notice=f"If an active account has the address {email.strip().lower()}, a link to choose a new password "
        f"is on its way. It works once and expires in {settings.reset_minutes} minutes.",
        links=[("/login", "Back to log in")],
    )


def _token_form(
    request: Request, accounts: Accounts, token: str, purpose: TokenPurpose, status: int = 200, error: str | None = None
) -> HTMLResponse:
    invite = purpose is TokenPurpose.invite
    title = "Accept your invitation" if invite else "Choose a new password"
    try:
        user = accounts.check_link(token, purpose)
    except DomainError as exc:
        return form_page(
            request, title, _status(exc), error=_sentence(exc), links=[("/forgot-password", "Ask for a new link")]
        )
    fields = ([{"name": "full_name", "label": "Your name", "value": user.full_name}] if invite else []) + NEW_PASSWORD
    return form_page(
        request,
        title,
        status,
        intro=f"Account: {user.email}" + (f" (role: {user.role})." if invite else "."),
        error=error,
        fields=fields,
        hidden={"token": token},
        action="/invite" if invite else "/reset-password",
        submit="Set the password",
    )


@router.get("/reset-password", response_class=HTMLResponse)
def reset_form(request: Request, accounts: AccountsDep, token: str = "") -> HTMLResponse:
    return _token_form(request, accounts, token, TokenPurpose.reset)


def _password_from_link(
    request: Request, accounts: Accounts, purpose: TokenPurpose, token: str, password: str, confirm: str, name: str
) -> HTMLResponse:
    """The form of a reset or invitation link posted: set the password, or show the form again with why not."""
    try:
        _new_passwords(password, confirm)
        if purpose is TokenPurpose.invite:
            user = accounts.accept_invite(token, password, name.strip() or None, client_of(request))
        else:
            user = accounts.reset_password(token, password, client_of(request))
    except (PasswordTooWeak, DomainError) as exc:
        return _token_form(request, accounts, token, purpose, _status(exc), _sentence(exc))
    if purpose is TokenPurpose.invite:
        # Accepting an invitation signs this browser in: the link and the new password have just proved
        # who it is (a new account has no second factor yet).
        settings = request.app.state.settings
        page = form_page(
            request,
            "Welcome to OncoLens",
            notice=f"Your account {user.email} is ready and you are signed in.",
            links=[("/analyze", "Analyze a case"), ("/account", "Your account (set up two-factor sign-in)")],
        )
        minutes = settings.access_token_minutes
        start_session(request, page, create_access_token(user, request.app.state.secret, minutes), minutes)
        return page
    else:
        title = "Password changed"
        notice = "Your password is changed and every earlier session has ended. Log in with the new password."
    return form_page(request, title, notice=notice, links=[("/login", "Log in")])


PasswordForm = Annotated[str, Form(max_length=128)]


@router.post("/reset-password", response_class=HTMLResponse)
def reset(
    request: Request,
    accounts: AccountsDep,
    token: PasswordForm = "",
    password: PasswordForm = "",
    confirm: PasswordForm = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_csrf(request, csrf_token)
    return _password_from_link(request, accounts, TokenPurpose.reset, token, password, confirm, "")


@router.get("/invite", response_class=HTMLResponse)
def invite_form(request: Request, accounts: AccountsDep, token: str = "") -> HTMLResponse:
    return _token_form(request, accounts, token, TokenPurpose.invite)


@router.post("/invite", response_class=HTMLResponse)
def accept_invite(
    request: Request,
    accounts: AccountsDep,
    token: PasswordForm = "",
    full_name: Annotated[str, Form(max_length=255)] = "",
    password: PasswordForm = "",
    confirm: PasswordForm = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_csrf(request, csrf_token)
    return _password_from_link(request, accounts, TokenPurpose.invite, token, password, confirm, full_name)


# --- self-sign-up --------------------------------------------------------------------------------------


def signup_page(request: Request, status: int = 200, **context: Any) -> HTMLResponse:
    return form_page(
        request,
        "Create an account",
        status,
        intro="A code is sent to your address; after you enter it, an administrator approves the account.",
        fields=[
            {"name": "email", "label": "E-mail", "type": "email", "autocomplete": "username", "required": True},
            {"name": "full_name", "label": "Your name", "autocomplete": "name"},
            {
                "name": "password",
                "label": "Password",
                "type": "password",
                "autocomplete": "new-password",
                "required": True,
                "minlength": 10,
                "hint": "At least 10 characters.",
            },
        ],
        action="/signup",
        submit="Send me a code",
        links=[("/login", "Back to log in")],
        **context,
    )


def verify_page(request: Request, email: str, status: int = 200, **context: Any) -> HTMLResponse:
    return form_page(
        request,
        "Enter your sign-up code",
        status,
        fields=[
            {"name": "email", "label": "E-mail", "type": "email", "required": True, "value": email},
            CODE_FIELD | {"label": "6-digit code from the e-mail"},
        ],
        action="/signup/verify",
        submit="Verify",
        **context,
    )


@router.get("/signup", response_class=HTMLResponse)
def signup_form(request: Request, settings: SettingsDep) -> HTMLResponse:
    if not settings.self_signup:
        return form_page(request, "Create an account", 403, error=_sentence(PermissionDenied(SIGNUP_OFF)))
    return signup_page(request)


@router.post("/signup", response_class=HTMLResponse)
def signup(
    request: Request,
    accounts: AccountsDep,
    settings: SettingsDep,
    email: Annotated[str, Form(max_length=255)] = "",
    full_name: Annotated[str, Form(max_length=255)] = "",
    password: Annotated[str, Form(max_length=128)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_csrf(request, csrf_token)
    try:
        accounts.signup(email, full_name.strip(), password, client_of(request))
    except (PasswordTooWeak, DomainError) as exc:
        return signup_page(request, _status(exc), error=_sentence(exc))
    return verify_page(
        request,
        email.strip().lower(),
        notice=f"If this address can sign up, a 6-digit code is on its way; it expires in "
        f"{settings.signup_code_minutes} minutes.",
    )


@router.get("/signup/verify", response_class=HTMLResponse)
def verify_form(request: Request, email: str = "") -> HTMLResponse:
    return verify_page(request, email[:255])


@router.post("/signup/verify", response_class=HTMLResponse)
def verify(
    request: Request,
    accounts: AccountsDep,
    email: Annotated[str, Form(max_length=255)] = "",
    code: Annotated[str, Form(max_length=32)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_csrf(request, csrf_token)
    try:
        accounts.verify_signup(email, code, client_of(request))
    except DomainError as exc:
        return verify_page(request, email, _status(exc), error=_sentence(exc))
    return form_page(
        request,
        "Address verified",
        notice="Thank you. An administrator must approve the account before you can log in; you will get an e-mail.",
        links=[("/login", "Back to log in")],
    )


# --- your account --------------------------------------------------------------------------------------


def account_page(
    request: Request,
    user: User,
    accounts: Accounts,
    status: int = 200,
    enrolment: Enrolment | None = None,
    recovery_codes: list[str] | None = None,
    **context: Any,
) -> HTMLResponse:
    settings = accounts.settings
    return render(
        request,
        "account.html",
        status,
        user=user,
        enrolment=enrolment,
        recovery_codes=recovery_codes,
        codes_left=accounts.recovery_codes_left(user),
        required=settings.require_two_factor,
        must_enrol=settings.require_two_factor and not user.two_factor,
        error=context.pop("error", None),
        notice=context.pop("notice", None),
        **context,
    )


def _actor(request: Request, user: User) -> Actor:
    return Actor(user, client_of(request), channel="web")


@router.get("/account", response_class=HTMLResponse)
def account(request: Request, user: AccountUser, accounts: AccountsDep) -> HTMLResponse:
    return account_page(request, user, accounts)


@router.post("/account/password", response_model=None)
def change_password(
    request: Request,
    user: AccountUser,
    session: SessionDep,
    accounts: AccountsDep,
    current_password: Annotated[str, Form(max_length=128)] = "",
    password: Annotated[str, Form(max_length=128)] = "",
    confirm: Annotated[str, Form(max_length=128)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    try:
        _new_passwords(password, confirm)
        users.update_me(
            session, accounts.settings, _actor(request, user), password=password, current_password=current_password
        )
    except (PasswordTooWeak, AuthError) as exc:
        return account_page(request, user, accounts, _status(exc), error=_sentence(exc))
    return RedirectResponse("/login?" + "next=/account", status_code=303)


@router.post("/account/2fa/{step}", response_class=HTMLResponse)
def two_factor_step(
    request: Request,
    step: str,
    user: AccountUser,
    accounts: AccountsDep,
    code: Annotated[str, Form(max_length=32)] = "",
    password: Annotated[str, Form(max_length=128)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """``setup`` (a new secret and QR code), ``enable`` (its first code), ``recovery-codes``, ``disable``."""
    check_csrf(request, csrf_token)
    actor = _actor(request, user)
    try:
        if step == "setup":
            return account_page(request, user, accounts, enrolment=accounts.begin_enrolment(actor))
        if step == "enable":
            page = account_page(request, user, accounts, recovery_codes=accounts.confirm_enrolment(actor, code))
            # Turning the second factor on ended every earlier session, this browser's too: a new one.
            minutes = accounts.settings.access_token_minutes
            token = create_access_token(user, request.app.state.secret, minutes)
            start_session(request, page, token, minutes, rotate_csrf=False)
            return page
        if step == "recovery-codes":
            codes = accounts.regenerate_recovery_codes(actor, code)
            return account_page(request, user, accounts, recovery_codes=codes)
        if step == "disable":
            accounts.disable(actor, password, code)
            return account_page(request, user, accounts, notice="Two-factor sign-in is off.")
    except (AuthError, DomainError) as exc:
        return account_page(request, user, accounts, _status(exc), error=_sentence(exc))
    raise NotFound(f"no two-factor step {step!r}; choose setup, enable, recovery-codes or disable")


# --- the admin's users page ----------------------------------------------------------------------------


def users_page(
    request: Request, admin: User, session: Session, settings: Any, status: int = 200, **context: Any
) -> HTMLResponse:
    rows = [{"user": u, "state": account_state(u)} for u in users.list_users(session)]
    return render(
        request,
        "users.html",
        status,
        user=admin,
        rows=rows,
        roles=users.ROLES,
        mail=settings.mail_configured and bool(settings.public_url),
        invite_hours=settings.invite_hours,
        error=context.pop("error", None),
        notice=context.pop("notice", None),
    )


def admin_user(request: Request, session: SessionDep) -> User:
    user = enrolled_web_user(request, session)
    if user.role != Role.admin.value:
        raise PermissionDenied("The users page is for administrators.")
    return user


AdminWeb = Annotated[User, Depends(admin_user)]


@router.get("/admin/users", response_class=HTMLResponse)
def users_list(request: Request, admin: AdminWeb, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    return users_page(request, admin, session, settings)


def _admin_action(
    request: Request, admin: User, session: Session, settings: Any, csrf: str, action: Any, done: str
) -> HTMLResponse:
    check_csrf(request, csrf)
    try:
        action()
    except (DomainError, PasswordTooWeak) as exc:
        return users_page(request, admin, session, settings, _status(exc), error=_sentence(exc))
    return users_page(request, admin, session, settings, notice=done)


@router.post("/admin/users/invite", response_class=HTMLResponse)
def invite(
    request: Request,
    admin: AdminWeb,
    session: SessionDep,
    accounts: AccountsDep,
    settings: SettingsDep,
    email: Annotated[str, Form(max_length=255)] = "",
    full_name: Annotated[str, Form(max_length=255)] = "",
    role: Annotated[str, Form(max_length=16)] = "clinician",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    def send() -> None:
        accounts.invite(_actor(request, admin), email, role, full_name.strip())

    done = f"Invitation sent to {email.strip().lower()}."
    return _admin_action(request, admin, session, settings, csrf_token, send, done)


@router.post("/admin/users/{user_id}/{action}", response_class=HTMLResponse)
def user_action(
    request: Request,
    user_id: int,
    action: str,
    admin: AdminWeb,
    session: SessionDep,
    accounts: AccountsDep,
    settings: SettingsDep,
    role: Annotated[str, Form(max_length=16)] = "",
    active: Annotated[str, Form(max_length=5)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """One admin action on one account: ``role``, ``active`` (true/false), ``approve``, ``reset-2fa``."""
    actor = _actor(request, admin)
    actions: dict[str, tuple[Callable[[], object], str]] = {
        "role": (lambda: users.update_user(session, actor, user_id, role=role), f"Role set to {role}."),
        "active": (
            lambda: users.update_user(session, actor, user_id, is_active=active == "true"),
            "Account reactivated." if active == "true" else "Account deactivated: its sessions have ended.",
        ),
        "approve": (
            lambda: accounts.approve(actor, user_id),
            "Account approved.",
        ),
        "reset-2fa": (
            lambda: accounts.admin_reset(actor, user_id),
            "Second factor reset: the user signs in with the password alone (and must enrol again if required).",
        ),
    }
    if action not in actions:
        raise NotFound(f"no user action {action!r}; choose {', '.join(actions)}")
    change, done = actions[action]
    return _admin_action(request, admin, session, settings, csrf_token, change, done)
