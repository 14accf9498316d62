"""Passwords (argon2 via pwdlib), access tokens (JWT, HS256) and the login throttle."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from pwdlib import PasswordHash
from sqlmodel import Session, select

from oncolens.db.models import LoginThrottle, User, utcnow

ALGORITHM = "HS256"
_hasher = PasswordHash.recommended()
# Verifying against this when the account does not exist keeps both answers equally slow.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))
MIN_PASSWORD_LENGTH = 10


class AuthError(Exception):
    """Authentication failed; the message never says whether the account exists."""

    status = 401


class LoginLocked(AuthError):
    status = 429


class Forbidden(PermissionError):
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
    """The JWT signing key kept in ``data_dir/secret.key`` (created once, readable by the owner only)."""
    path = data_dir / "secret.key"
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(key)
    tmp.chmod(0o600)
    tmp.replace(path)
    return key


def create_access_token(user: User, secret: str, minutes: int, now: datetime | None = None) -> str:
    issued = now or datetime.now(UTC)
    claims = {"sub": str(user.id), "role": user.role, "iat": issued, "exp": issued + timedelta(minutes=minutes)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_access_token(token: str, secret: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("the access token has expired; log in again") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError("the access token is not valid") from exc
    return claims


@dataclass(frozen=True)
class ThrottlePolicy:
    max_failures: int
    lock_minutes: int


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; everything stored is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def authenticate(session: Session, email: str, password: str, policy: ThrottlePolicy) -> User:
    """The active user with these credentials, or AuthError / LoginLocked (same wording either way)."""
    email = email.strip().lower()
    throttle = session.get(LoginThrottle, email) or LoginThrottle(email=email, failures=0)
    now = utcnow()
    if throttle.locked_until and _aware(throttle.locked_until) > now:
        minutes = max(1, round((_aware(throttle.locked_until) - now).total_seconds() / 60))
        raise LoginLocked(f"too many failed logins for this account name; try again in {minutes} minute(s)")
    user = session.exec(select(User).where(User.email == email)).first()
    valid = verify_password(password, user.hashed_password if user else _DUMMY_HASH)
    if user is None or not valid or not user.is_active:
        throttle.failures += 1
        if throttle.failures >= policy.max_failures:
            throttle.locked_until = now + timedelta(minutes=policy.lock_minutes)
            throttle.failures = 0
        session.add(throttle)
        session.commit()
        raise AuthError("incorrect email or password")
    if throttle.failures:
        throttle.failures = 0
        session.add(throttle)
        session.commit()
    return user
