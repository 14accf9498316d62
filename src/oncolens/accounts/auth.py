"""Passwords (argon2 via pwdlib), access tokens (JWT, HS256) and the login throttle."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from pwdlib import PasswordHash
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from oncolens.errors import PermissionDenied
from oncolens.store.db import insert_if_missing
from oncolens.store.db.models import LoginThrottle, RevokedToken, User, utcnow

ALGORITHM = "HS256"
_hasher = PasswordHash.recommended()
# Verifying against this when the account does not exist keeps both answers equally slow.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))
MIN_PASSWORD_LENGTH = 10


class AuthError(Exception):
    """Authentication failed; the message never says whether the account exists."""

    status = 401
    # True when the failure was already written to the audit trail where it was found
    audited = False


class LoginLocked(AuthError):
    status = 429


class Forbidden(PermissionDenied):
    """The user is authenticated but their role may not do this."""


class PasswordTooWeak(ValueError):
    pass


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordTooWeak(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(password: str, hashed: str) -> bool:
    return _hasher.verify(password, hashed)


def load_or_create_secret(data_dir: Path) -> str:
    """The JWT signing key kept in ``data_dir/secret.key`` (created once, readable by the owner only).

    Several worker processes may start at once: the key is written to a file of its own and linked
    into place, so the first one wins and every other reads that one.
    """
    path = data_dir / "secret.key"
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    tmp = data_dir / f"secret.key.{uuid.uuid4().hex}.tmp"
    tmp.write_text(key)
    tmp.chmod(0o600)
    try:
        path.hardlink_to(tmp)  # fails if another process linked its key first
    except FileExistsError:
        key = path.read_text().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return key


class SecretKeyRequired(ValueError):
    """A server on a shared database was started without ``ONCOLENS_SECRET_KEY``."""


def server_secret(secret_key: str | None, data_dir: Path, on_sqlite: bool = True) -> str:
    """The server's signing key: ``ONCOLENS_SECRET_KEY``, else (SQLite only) the one kept in the data folder.

    A server on another database may be one of several replicas: a key file per replica would make
    each refuse the others' tokens, so it must be given the one key they share.
    """
    if secret_key:
        return secret_key
    if not on_sqlite:
        raise SecretKeyRequired(
            "ONCOLENS_SECRET_KEY must be set when the database is not SQLite: every replica of the server "
            "signs and checks sessions with it (the same long random value on each, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    return load_or_create_secret(data_dir)


def create_access_token(user: User, secret: str, minutes: int, now: datetime | None = None) -> str:
    """A signed JWT for ``user``: subject, role, the user's token version and a unique id (jti)."""
    issued = now or datetime.now(UTC)
    claims = {
        "sub": str(user.id),
        "role": user.role,
        "ver": user.token_version,
        "jti": uuid.uuid4().hex,
        "iat": issued,
        "exp": issued + timedelta(minutes=minutes),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_access_token(token: str, secret: str) -> dict[str, Any]:
    """The token's claims after checking signature, expiry and the claims OncoLens relies on."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub", "jti"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("the access token has expired; log in again") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError("the access token is not valid") from exc
    sub, ver, jti = claims.get("sub"), claims.get("ver", 0), claims.get("jti")
    if not (
        isinstance(sub, str) and sub.isdigit() and len(sub) <= 18 and isinstance(ver, int) and isinstance(jti, str)
    ):
        raise AuthError("the access token is not valid")
    return claims


def user_for_token(session: Session, token: str, secret: str) -> User:
    """The active user a token stands for; AuthError when it is invalid, expired or revoked."""
    claims = decode_access_token(token, secret)
    user = session.get(User, int(claims["sub"]))
    if user is None or not user.is_active:
        raise AuthError("the account for this token no longer exists or is disabled")
    if claims.get("ver", 0) != user.token_version or session.get(RevokedToken, claims["jti"]) is not None:
        raise AuthError("the access token has been revoked (logout or password change); log in again")
    return user


def revoke_token(session: Session, token: str, secret: str) -> None:
    """End one token before its expiry (logout); expired revocations are cleared on the way."""
    try:
        claims = decode_access_token(token, secret)
    except AuthError:
        return  # an invalid or expired token opens nothing already
    now = utcnow()
    session.exec(delete(RevokedToken).where(col(RevokedToken.expires_at) < now))
    if session.get(RevokedToken, claims["jti"]) is None:
        session.add(RevokedToken(jti=claims["jti"], expires_at=datetime.fromtimestamp(claims["exp"], UTC)))


def revoke_all_tokens(user: User) -> None:
    """Invalidate every token issued to ``user`` so far (the caller commits)."""
    user.token_version += 1


@dataclass(frozen=True)
class ThrottlePolicy:
    max_failures: int
    lock_minutes: int


def aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; everything stored is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _locked(minutes_left: float) -> LoginLocked:
    return LoginLocked(
        f"too many failed logins for this account name; try again in {max(1, round(minutes_left))} minute(s)"
    )


def _reserve_attempt(session: Session, email: str, policy: ThrottlePolicy) -> int:
    """Count this login attempt before its password is checked; return its number in the series.

    One short transaction: the row is created if missing (insert ... on conflict do nothing), then
    incremented with an UPDATE, which takes the row's write lock (PostgreSQL) or the database's
    (SQLite) before it is read back, so parallel attempts get distinct numbers. Only attempts
    numbered up to ``max_failures`` have their password checked; the rest are refused as locked.
    """
    table = LoginThrottle.__table__  # type: ignore[attr-defined]
    now = utcnow()
    try:
        insert_if_missing(session, table, email=email, failures=0, locked_until=None)
        session.execute(update(table).where(table.c.email == email).values(failures=table.c.failures + 1))
        row = session.execute(select(table.c.failures, table.c.locked_until).where(table.c.email == email)).one()
        failures, locked_until = int(row.failures), row.locked_until
        if locked_until is not None and aware(locked_until) > now:
            # Locked: this attempt does not count towards the next series.
            session.execute(update(table).where(table.c.email == email).values(failures=0))
            session.commit()
            raise _locked((aware(locked_until) - now).total_seconds() / 60)
        if locked_until is not None:  # an expired lock: this attempt starts a new series
            failures = 1
            session.execute(update(table).where(table.c.email == email).values(failures=1, locked_until=None))
        if failures > policy.max_failures:
            session.execute(
                update(table)
                .where(table.c.email == email)
                .values(failures=0, locked_until=now + timedelta(minutes=policy.lock_minutes))
            )
            session.commit()
            raise _locked(policy.lock_minutes)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return failures


def _failed(session: Session, email: str, attempt: int, policy: ThrottlePolicy) -> None:
    if attempt >= policy.max_failures:
        table = LoginThrottle.__table__  # type: ignore[attr-defined]
        until = utcnow() + timedelta(minutes=policy.lock_minutes)
        session.execute(update(table).where(table.c.email == email).values(failures=0, locked_until=until))
        session.commit()


def throttled(session: Session, email: str, policy: ThrottlePolicy, check: Callable[[], User]) -> User:
    """Run ``check`` (a password, a second-factor code) as one throttled attempt on the account name.

    The attempt is counted before ``check`` runs (see ``_reserve_attempt``); an AuthError from it
    leaves it counted (and locks the name at ``max_failures``); only a check that passes clears the count.
    """
    email = email.strip().lower()[:255]
    attempt = _reserve_attempt(session, email, policy)
    try:
        user = check()
    except AuthError:
        _failed(session, email, attempt, policy)
        raise
    table = LoginThrottle.__table__  # type: ignore[attr-defined]
    session.execute(update(table).where(table.c.email == email).values(failures=0))
    session.commit()
    return user


def authenticate(
    session: Session,
    email: str,
    password: str,
    policy: ThrottlePolicy,
    second_factor: Callable[[User], None] | None = None,
) -> User:
    """The active user with these credentials, or AuthError / LoginLocked (same wording either way).

    At most ``policy.max_failures`` passwords are checked per account name per lock period, however
    many attempts arrive at once (see ``_reserve_attempt``). ``second_factor`` runs after a correct
    password and raises AuthError for a missing or wrong code: the attempt then stays a failure, so
    codes are throttled like passwords. An invited account with no password yet never logs in.
    """
    email = email.strip().lower()[:255]

    def check() -> User:
        user = session.exec(select(User).where(User.email == email)).first()
        usable = user is not None and user.has_password
        valid = verify_password(password, user.hashed_password if user is not None and usable else _DUMMY_HASH)
        if user is None or not usable or not valid or not user.is_active:
            raise AuthError("incorrect email or password")
        if second_factor is not None:
            second_factor(user)
        return user

    return throttled(session, email, policy, check)
