"""Users: your own account and second factor, and the admin's management of all accounts
(invitations, approval, second-factor reset; no deletion: deactivate)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from oncolens.api.records import (
    Code,
    DisableTwoFactor,
    Invitation,
    RecoveryCodes,
    TwoFactorSetup,
    TwoFactorStatus,
    UserCreate,
    UserPublic,
    UserUpdate,
    UserUpdateMe,
)
from oncolens.http.deps import (
    AccountsDep,
    AdminUser,
    CurrentUser,
    EnrollingUser,
    SessionDep,
    SettingsDep,
    UserId,
    client_of,
)
from oncolens.services import users
from oncolens.services.audit import Actor

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserPublic)
def read_me(user: EnrollingUser) -> UserPublic:
    return UserPublic.of(user)


@router.patch("/me", response_model=UserPublic)
def update_me(
    request: Request, body: UserUpdateMe, user: EnrollingUser, session: SessionDep, settings: SettingsDep
) -> UserPublic:
    """Change your own name or password (the password change needs the current password; a wrong one
    counts towards the account's login lock)."""
    actor = Actor(user, client_of(request))
    changed = users.update_me(session, settings, actor, body.full_name, body.password, body.current_password)
    return UserPublic.of(changed)


@router.get("/me/2fa", response_model=TwoFactorStatus)
def two_factor_status(user: EnrollingUser, accounts: AccountsDep, settings: SettingsDep) -> TwoFactorStatus:
    return TwoFactorStatus(
        enabled=user.two_factor,
        pending=bool(user.totp_secret) and not user.two_factor,
        required=settings.require_two_factor,
        recovery_codes_left=accounts.recovery_codes_left(user),
    )


@router.post("/me/2fa/setup", response_model=TwoFactorSetup)
def begin_two_factor(request: Request, user: EnrollingUser, accounts: AccountsDep) -> TwoFactorSetup:
    """Start enrolling an authenticator app: a new secret and its QR code (not in force until /enable)."""
    made = accounts.begin_enrolment(Actor(user, client_of(request)))
    return TwoFactorSetup(secret=made.secret, otpauth_uri=made.uri, qr_svg=made.qr_svg)


@router.post("/me/2fa/enable", response_model=RecoveryCodes)
def enable_two_factor(request: Request, body: Code, user: EnrollingUser, accounts: AccountsDep) -> RecoveryCodes:
    """Turn two-factor sign-in on with a first code from the app; answers the recovery codes, once."""
    return RecoveryCodes(recovery_codes=accounts.confirm_enrolment(Actor(user, client_of(request)), body.code))


@router.post("/me/2fa/recovery-codes", response_model=RecoveryCodes)
def new_recovery_codes(request: Request, body: Code, user: CurrentUser, accounts: AccountsDep) -> RecoveryCodes:
    """Replace the recovery codes (the old ones stop working); needs a current code from the app."""
    return RecoveryCodes(recovery_codes=accounts.regenerate_recovery_codes(Actor(user, client_of(request)), body.code))


@router.post("/me/2fa/disable", response_model=UserPublic)
def disable_two_factor(
    request: Request, body: DisableTwoFactor, user: CurrentUser, accounts: AccountsDep
) -> UserPublic:
    """Turn two-factor sign-in off (needs the password and a code; refused when the server requires it)."""
    return UserPublic.of(accounts.disable(Actor(user, client_of(request)), body.password, body.code))


@router.get("", response_model=list[UserPublic])
def list_users(_: AdminUser, session: SessionDep) -> list[UserPublic]:
    return [UserPublic.of(u) for u in users.list_users(session)]


@router.post("", response_model=UserPublic, status_code=201)
def create_user(request: Request, body: UserCreate, admin: AdminUser, session: SessionDep) -> UserPublic:
    actor = Actor(admin, client_of(request))
    return UserPublic.of(users.create_user(session, actor, str(body.email), body.password, body.full_name, body.role))


@router.post("/invitations", response_model=UserPublic, status_code=201)
def invite(request: Request, body: Invitation, admin: AdminUser, accounts: AccountsDep) -> UserPublic:
    """Invite someone by e-mail with a role: the link lets them choose a password (single use,
    ``ONCOLENS_INVITE_HOURS``). Inviting an address again renews its invitation."""
    actor = Actor(admin, client_of(request))
    return UserPublic.of(accounts.invite(actor, str(body.email), body.role, body.full_name))


@router.get("/{user_id}", response_model=UserPublic)
def read_user(user_id: UserId, _: AdminUser, session: SessionDep) -> UserPublic:
    return UserPublic.of(users.get_user(session, user_id))


@router.patch("/{user_id}", response_model=UserPublic)
def update_user(
    request: Request, user_id: UserId, body: UserUpdate, admin: AdminUser, session: SessionDep
) -> UserPublic:
    """Change a user's name, role, password or active flag (deactivate instead of deleting)."""
    actor = Actor(admin, client_of(request))
    changed = users.update_user(session, actor, user_id, body.full_name, body.role, body.is_active, body.password)
    return UserPublic.of(changed)


@router.post("/{user_id}/approve", response_model=UserPublic)
def approve(request: Request, user_id: UserId, admin: AdminUser, accounts: AccountsDep) -> UserPublic:
    """Approve a self-signed-up account whose address is verified (give it a role first with PATCH);
    the user is told by e-mail."""
    accounts.approve(Actor(admin, client_of(request)), user_id)
    return UserPublic.of(users.get_user(accounts.session, user_id))


@router.delete("/{user_id}/2fa", response_model=UserPublic)
def reset_two_factor(request: Request, user_id: UserId, admin: AdminUser, accounts: AccountsDep) -> UserPublic:
    """Turn a user's second factor off (a lost phone); their sessions end. Audited as ``2fa_reset``."""
    return UserPublic.of(accounts.admin_reset(Actor(admin, client_of(request)), user_id))
