"""Second factor: time-based one-time passwords (RFC 6238: HMAC-SHA1, 30 s steps, 6 digits) and
single-use recovery codes.

The shared TOTP secret is kept encrypted (Fernet, a key derived from the server's signing key), so a
copy of the database alone cannot make codes; recovery codes are kept as keyed hashes only. A code is
accepted for the current step and one step either side (clock drift), and never twice: the last step
used is stored and a code of that step or an earlier one is refused (replay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import pyotp
import segno
from cryptography.fernet import Fernet, InvalidToken

STEP_S = 30
DIGITS = 6
DRIFT_STEPS = 1
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i


def clock() -> float:
    """Seconds since the epoch: the time codes are checked against (a seam for tests)."""
    return time.time()


class SecretUnreadable(Exception):
    """The stored TOTP secret was encrypted under another server key (ONCOLENS_SECRET_KEY changed)."""


def _fernet(server_key: str) -> Fernet:
    digest = hashlib.sha256(b"oncolens totp secret v1\x00" + server_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def new_secret() -> str:
    """A random base32 secret of 160 bits (RFC 4226's recommended length)."""
    secret: str = pyotp.random_base32(32)
    return secret


def seal(secret: str, server_key: str) -> str:
    token: bytes = _fernet(server_key).encrypt(secret.encode())
    return token.decode()


def unseal(sealed: str, server_key: str) -> str:
    try:
        plain: bytes = _fernet(server_key).decrypt(sealed.encode())
        return plain.decode()
    except InvalidToken as exc:
        raise SecretUnreadable(
            "the stored second-factor secret cannot be read with this server's key; an administrator must "
            "reset the second factor"
        ) from exc


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """The ``otpauth://totp/...`` URI an authenticator app reads from the QR code."""
    uri: str = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).provisioning_uri(name=account, issuer_name=issuer)
    return uri


def qr_svg(uri: str) -> str:
    """The QR code of ``uri`` as an inline SVG document (rendered here, no network)."""
    svg: str = segno.make(uri, error="m").svg_inline(scale=5, border=2, dark="#111", light="#fff")
    return svg


def normalise(code: str) -> str:
    return "".join(code.split()).replace("-", "").lower()


def matching_step(secret: str, code: str, last_step: int | None, now: float | None = None) -> int | None:
    """The time step at which ``code`` is valid (current ±1), if later than ``last_step``; else None."""
    code = normalise(code)
    if len(code) != DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S)
    moment = clock() if now is None else now
    current = int(moment // STEP_S)
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.at(step * STEP_S), code) and (last_step is None or step > last_step):
            return step
    return None


def code_at(secret: str, moment: float) -> str:
    """The code an authenticator shows at ``moment`` (for tests and the CLI's check)."""
    return str(pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).at(moment))


@dataclass(frozen=True)
class RecoveryCodes:
    """Codes shown to the user once, and the keyed hashes that are stored."""

    codes: list[str]
    hashes: list[str]


def keyed_hash(value: str, server_key: str, purpose: str) -> str:
    """HMAC-SHA256 of a normalised code under the server key: a stolen table alone cannot test guesses."""
    return hmac.new(f"{purpose}\x00{server_key}".encode(), normalise(value).encode(), hashlib.sha256).hexdigest()


def new_recovery_codes(server_key: str, n: int = RECOVERY_CODES) -> RecoveryCodes:
    """``n`` codes like ``k7dm-q2xa-9f`` (10 characters of a 30-letter alphabet: about 49 bits each)."""
    codes = []
    for _ in range(n):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(10))
        codes.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
    return RecoveryCodes(codes, [keyed_hash(c, server_key, "recovery") for c in codes])
