"""User accounts and logins: create, change, look up; every change and login attempt audited."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from oncolens.accounts.auth import (
    AuthError,
    ThrottlePolicy,
    authenticate,
    hash_password,
    revoke_all_tokens,
    revoke_token,
    throttled,
    verify_password,
)
from oncolens.config import Settings
from oncolens.errors import Conflict, InvalidInput, NotFound
from oncolens.services.audit import Actor, audit, audit_by
from oncolens.store.db.models import AccountToken, LoginThrottle, Role, User, utcnow

ROLES = tuple(role.value for role in Role)
NAME_MAX = 120
# A person's name is shown to admins and written into e-mail: no control characters, no web addresses.
_NOT_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f<>]|://|\bwww\.", re.IGNORECASE)


def valid_email(address: str) -> str:
    """``address`` as one plain mailbox (lower case), else InvalidInput saying what is wrong.

    The same rule as the API's schema (email-validator), for every edge: a display name, a list of
    addresses or a line break never reaches the mailer or the account table.
    """
    address = address.strip()
    if len(address) > 254:
        raise InvalidInput("the e-mail address is too long (at most 254 characters)")
    try:
        checked = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidInput(f"enter one e-mail address, like name@clinic.org ({exc})") from None
    return str(checked.normalized).lower()


def person_name(name: str) -> str:
    """A full name as given (trimmed), else InvalidInput: at most ``NAME_MAX`` characters, no control
    characters, angle brackets or web addresses."""
    name = " ".join(name.split())
    if len(name) > NAME_MAX:
        raise InvalidInput(f"the name is too long (at most {NAME_MAX} characters)")
    if _NOT_IN_A_NAME.search(name):
        raise InvalidInput("a name may not hold line breaks, angle brackets or web addresses")
    return name


def valid_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; choose {', '.join(ROLES)}")
    return role


def end_links(session: Session, user: User) -> None:
    """Every unused e-mailed link or code of ``user`` stops working (a password was set another way)."""
    session.exec(
        update(AccountToken)
        .where(col(AccountToken.user_id) == user.id, col(AccountToken.used_at).is_(None))
        .values(used_at=utcnow())
    )


def policy_of(settings: Settings) -> ThrottlePolicy:
    return ThrottlePolicy(settings.login_max_failures, settings.login_lock_minutes)


def create_user(
    session: Session, actor: Actor | None, email: str, password: str, full_name: str = "", role: str = "clinician"
) -> User:
    """A new account (audited ``user_create``; ``actor`` None: made on the command line)."""
    valid_role(role)
    user = User(
        email=valid_email(email), full_name=person_name(full_name), hashed_password=hash_password(password), role=role
    )
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
    if role is not None:
        valid_role(role)
    if full_name is not None:
        full_name = person_name(full_name)
    if user.id == actor.user.id and (role not in (None, Role.admin.value) or is_active is False):
        raise Conflict("you cannot demote or deactivate your own account")
    changes = {k: v for k, v in {"full_name": full_name, "role": role, "is_active": is_active}.items() if v is not None}
    for field, value in changes.items():
        setattr(user, field, value)
    if password is not None:
        user.hashed_password = hash_password(password)
        end_links(session, user)
        changes["password"] = "changed"
    if password is not None or is_active is False:
        revoke_all_tokens(user)
    audit_by(session, actor, "user_update", detail=f"{user.email}: {', '.join(sorted(changes)) or 'nothing'} changed")
    session.add(user)
    session.commit()
    return user


def update_me(
    session: Session,
    settings: Settings,
    actor: Actor,
    full_name: str | None = None,
    password: str | None = None,
    current_password: str | None = None,
) -> User:
    """A user's change of their own name or password (the password needs the current one, checked
    as a counted attempt under the login lock; it ends every session and e-mailed link of the account)."""
    user = actor.user
    changes = []
    if full_name is not None:
        user.full_name = person_name(full_name)
        changes.append("full_name")
    if password is not None:
        hashed = hash_password(password)

        def check() -> User:
            if current_password is None or not verify_password(current_password, user.hashed_password):
                audit_by(session, actor, "login_failed", detail=f"{user.email}: wrong current password")
                raise AuthError("the current password is wrong")
            return user

        try:
            throttled(session, user.email, policy_of(settings), check)
        except AuthError:
            session.commit()
            raise
        user.hashed_password = hashed
        revoke_all_tokens(user)
        end_links(session, user)
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
    note = f" ({channel})" if channel else ""
    try:
        user = authenticate(session, email, password, policy_of(settings), second_factor)
    except AuthError as exc:
        if not exc.audited:  # a wrong second-factor code is audited (2fa_failed) where it is checked
            name = login_name_for_audit(session, email)
            audit(session, None, "login_failed", detail=f"{name}: {exc}{note}", client=client)
        session.commit()
        raise
    audit(session, user, "login", detail=channel, client=client)
    session.commit()
    return user


def login_name_for_audit(session: Session, typed: str) -> str:
    """What the audit trail keeps of a failed login's name: the address of an existing account, else
    only a short fingerprint, since what was typed into the name field may be a password."""
    name = typed.strip().lower()[:255]
    if session.exec(select(User.id).where(User.email == name)).first() is not None:
        return name
    return f"unknown account name (fingerprint {hashlib.sha256(name.encode()).hexdigest()[:10]})"


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
        end_links(session, user)
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
