"""User accounts and logins: create, change, look up; every change and login attempt audited."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from oncolens.auth import (
    AuthError,
    ThrottlePolicy,
    authenticate,
    hash_password,
    revoke_all_tokens,
    revoke_token,
    verify_password,
)
from oncolens.config import Settings
from oncolens.db.models import LoginThrottle, Role, User
from oncolens.errors import Conflict, InvalidInput, NotFound
from oncolens.services.audit import Actor, audit, audit_by

ROLES = tuple(role.value for role in Role)


def create_user(
    session: Session, actor: Actor | None, email: str, password: str, full_name: str = "", role: str = "clinician"
) -> User:
    """A new account (audited ``user_create``; ``actor`` None: made on the command line)."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; choose {', '.join(ROLES)}")
    user = User(email=email.strip().lower(), full_name=full_name, hashed_password=hash_password(password), role=role)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"a user with e-mail {user.email} already exists") from exc
    detail = f"{user.email} as {user.role}"
    if actor is None:
        audit(session, None, "user_create", detail=f"command line: {detail}")
    else:
        audit_by(session, actor, "user_create", detail=detail)
    session.commit()
    return user


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.exec(select(User).order_by(col(User.id))))


def update_user(
    session: Session,
    actor: Actor,
    user_id: int,
    full_name: str | None = None,
    role: str | None = None,
    is_active: bool | None = None,
    password: str | None = None,
) -> User:
    """An admin's change of an account (audited ``user_update``); a reset or a deactivation ends every
    session of the account. An admin cannot demote or deactivate themselves."""
    user = get_user(session, user_id)
    if user.id == actor.user.id and (role not in (None, Role.admin.value) or is_active is False):
        raise Conflict("you cannot demote or deactivate your own account")
    changes = {k: v for k, v in {"full_name": full_name, "role": role, "is_active": is_active}.items() if v is not None}
    for field, value in changes.items():
        setattr(user, field, value)
    if password is not None:
        user.hashed_password = hash_password(password)
        changes["password"] = "changed"
    if password is not None or is_active is False:
        revoke_all_tokens(user)
    audit_by(session, actor, "user_update", detail=f"{user.email}: {', '.join(sorted(changes)) or 'nothing'} changed")
    session.add(user)
    session.commit()
    return user


def update_me(
    session: Session,
    actor: Actor,
    full_name: str | None = None,
    password: str | None = None,
    current_password: str | None = None,
) -> User:
    """A user's change of their own name or password (the password needs the current one; it ends
    every session of the account, this one too)."""
    user = actor.user
    changes = []
    if full_name is not None:
        user.full_name = full_name
        changes.append("full_name")
    if password is not None:
        if current_password is None or not verify_password(current_password, user.hashed_password):
            raise AuthError("the current password is wrong")
        user.hashed_password = hash_password(password)
        revoke_all_tokens(user)
        changes.append("password")
    audit_by(
        session, actor, "user_update", detail=f"{user.email} (own account): {', '.join(changes) or 'nothing'} changed"
    )
    session.add(user)
    session.commit()
    return user


def login(
    session: Session,
    settings: Settings,
    email: str,
    password: str,
    client: str,
    channel: str = "",
    second_factor: Callable[[User], None] | None = None,
) -> User:
    """Check the password (and ``second_factor``, see ``authenticate``) under the login throttle and
    record the attempt in the audit trail.

    Raises AuthError (after auditing the failure) for a wrong password or code, or a locked account name.
    """
    policy = ThrottlePolicy(settings.login_max_failures, settings.login_lock_minutes)
    note = f" ({channel})" if channel else ""
    try:
        user = authenticate(session, email, password, policy, second_factor)
    except AuthError as exc:
        if not exc.audited:  # a wrong second-factor code is audited (2fa_failed) where it is checked
            audit(session, None, "login_failed", detail=f"{email.strip().lower()[:200]}: {exc}{note}", client=client)
        session.commit()
        raise
    audit(session, user, "login", detail=channel, client=client)
    session.commit()
    return user


def logout(session: Session, actor: Actor, token: str, secret: str) -> None:
    """End one access token now (audited ``logout``); other tokens of the account stay valid."""
    revoke_token(session, token, secret)
    audit_by(session, actor, "logout")
    session.commit()


def find_by_email(session: Session, email: str) -> User:
    user = session.exec(select(User).where(User.email == email.strip().lower())).first()
    if user is None:
        raise NotFound(f"no user with e-mail {email.strip().lower()}")
    return user


def change_on_command_line(
    session: Session,
    email: str,
    password: str | None = None,
    is_active: bool | None = None,
    approved: bool | None = None,
) -> User:
    """What the server's operator may do without logging in (``oncolens users``): set a password (the
    way back for an admin who forgot theirs; it also clears the login lock), (de)activate, approve.
    Audited with the detail ``command line: ...``; a new password or a deactivation ends every session."""
    user = find_by_email(session, email)
    changes = []
    if password is not None:
        user.hashed_password = hash_password(password)
        session.exec(delete(LoginThrottle).where(col(LoginThrottle.email) == user.email))
        changes.append("password")
    if is_active is not None:
        user.is_active = is_active
        changes.append("is_active")
    if approved is not None:
        user.approved = approved
        changes.append("approved")
    if password is not None or is_active is False:
        revoke_all_tokens(user)
    session.add(user)
    audit(session, None, "user_update", detail=f"command line: {user.email}: {', '.join(changes)} changed")
    session.commit()
    return user
