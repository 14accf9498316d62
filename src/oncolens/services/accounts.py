"""Accounts by e-mail and the second factor: invitations, password reset, self-sign-up with an e-mail
code and admin approval, TOTP enrolment, recovery codes. Every step is audited.

Secrets sent by e-mail (links, codes) are single-use and expiring, and only their keyed hashes are
stored (``account_tokens``); each is used up by one conditional UPDATE that only one of several
parallel requests can win. Answers that could tell whether an address has an account (reset,
sign-up) are the same either way, and their e-mails go to a queue that the server sends from later
(``services.mailqueue``), so the time taken does not tell either. Links point only at
``ONCOLENS_PUBLIC_URL``, never at the address a request names. Every password or second-factor
check, whichever route it comes through, counts towards the account name's login lock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlencode

from sqlalchemy import case, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from oncolens.accounts import totp
from oncolens.accounts.auth import AuthError, aware, hash_password, revoke_all_tokens, throttled, verify_password
from oncolens.accounts.mail import Letter, Mailer
from oncolens.config import Settings
from oncolens.errors import Conflict, InvalidInput, LinkInvalid, PermissionDenied, TooManyRequests
from oncolens.services import mailqueue, users
from oncolens.services.audit import Actor, audit, audit_by
from oncolens.services.users import end_links, get_user, person_name, policy_of, valid_email, valid_role
from oncolens.store.db import insert_if_missing
from oncolens.store.db.models import (
    AccountToken,
    LoginThrottle,
    RecoveryCode,
    RequestThrottle,
    Role,
    TokenPurpose,
    User,
)
from oncolens.store.db.models import utcnow as _now

log = logging.getLogger("oncolens.accounts")

SIGNUP_CODE_ATTEMPTS = 5
LINK_INVALID = "this link is not valid: it has expired or was already used; ask for a new one"
CODE_INVALID = "the code is wrong or has expired"
SIGNUP_OFF = "self sign-up is off on this server: ask an administrator for an invitation"
WRONG_PASSWORD_OR_CODE = "the password or the code is wrong"


class TwoFactorRequired(AuthError):
    """The password was right; the account also needs its second-factor code."""


class WrongCode(AuthError):
    """The second-factor code (or recovery code) was wrong or already used (audited as ``2fa_failed``)."""

    audited = True


class AccountPending(AuthError):
    """The password was right but the account cannot be used yet (unverified or unapproved sign-up)."""

    status = 403


class TwoFactorNeeded(PermissionDenied):
    """The server requires a second factor and this user has not enrolled one."""


@dataclass(frozen=True)
class Enrolment:
    """What an authenticator app needs: the secret (to type in), its otpauth URI and QR code (SVG)."""

    secret: str
    uri: str
    qr_svg: str


class Accounts:
    """The account flows on one database session; ``secret`` is the server key (JWT signing key)."""

    def __init__(self, session: Session, settings: Settings, secret: str, mailer: Mailer | None = None) -> None:
        self.session = session
        self.settings = settings
        self.secret = secret
        self.mailer = mailer or Mailer(settings)

    def _counted(self, user: User, check: Callable[[], None]) -> None:
        """Run a password or second-factor ``check`` for ``user`` as one attempt under the login lock."""

        def run() -> User:
            check()
            return user

        throttled(self.session, user.email, policy_of(self.settings), run)

    # --- tokens sent by e-mail ------------------------------------------------------------------------

    def _hash(self, raw: str, purpose: str) -> str:
        return hmac.new(
            f"account-token\x00{purpose}\x00{self.secret}".encode(), raw.encode(), hashlib.sha256
        ).hexdigest()

    def _issue(
        self,
        user: User,
        purpose: TokenPurpose,
        lifetime: timedelta,
        raw: str | None = None,
        payload: str | None = None,
        replace: bool = True,
    ) -> str:
        """A new secret for ``user``; with ``replace``, earlier unused ones of the same purpose stop working."""
        assert user.id is not None
        if replace:
            self.session.exec(
                delete(AccountToken).where(
                    col(AccountToken.user_id) == user.id,
                    col(AccountToken.purpose) == purpose.value,
                    col(AccountToken.used_at).is_(None),
                )
            )
        raw = raw or secrets.token_urlsafe(32)
        self.session.add(
            AccountToken(
                user_id=user.id,
                purpose=purpose.value,
                token_hash=self._hash(raw, purpose.value),
                expires_at=_now() + lifetime,
                payload=payload,
            )
        )
        return raw

    def _valid(self, raw: str, purpose: TokenPurpose) -> tuple[AccountToken, User]:
        """The unused, unexpired token ``raw`` of ``purpose`` and its active user, else LinkInvalid."""
        found = self.session.exec(
            select(AccountToken).where(col(AccountToken.token_hash) == self._hash(raw.strip(), purpose.value))
        ).first()
        user = self.session.get(User, found.user_id) if found is not None else None
        if found is None or found.used_at is not None or aware(found.expires_at) <= _now():
            raise LinkInvalid(LINK_INVALID)
        if user is None or not user.is_active:
            raise LinkInvalid(LINK_INVALID)
        return found, user

    def _use(self, token_id: int | None, invalid: str = LINK_INVALID) -> None:
        """Mark the token used, in one conditional UPDATE: of parallel requests with one token, one
        wins; the others get LinkInvalid(``invalid``) (the caller commits)."""
        won = self.session.exec(
            update(AccountToken)
            .where(col(AccountToken.id) == token_id, col(AccountToken.used_at).is_(None))
            .values(used_at=_now())
        )
        if won.rowcount != 1:
            self.session.rollback()
            raise LinkInvalid(invalid)

    def _redeem(self, raw: str, purpose: TokenPurpose) -> tuple[AccountToken, User]:
        """:meth:`_valid`, and the token is now used (by this request only)."""
        found, user = self._valid(raw, purpose)
        self._use(found.id)
        set_committed_value(found, "used_at", _now())
        return found, user

    def check_link(self, raw: str, purpose: TokenPurpose) -> User:
        """The user a still-valid link belongs to, without using it (the web page's first view)."""
        return self._valid(raw, purpose)[1]

    def _count_request(self, key: str, limit: int) -> None:
        """Count one e-mail request under ``key``; TooManyRequests beyond ``limit`` in the hour window.

        One UPDATE ... RETURNING counts and reads back (after an insert that does nothing when the row
        exists), so parallel requests each get their own number and the limit holds exactly.
        """
        key = key[:300]
        now = _now()
        table = RequestThrottle.__table__  # type: ignore[attr-defined]
        insert_if_missing(self.session, table, key=key, window_start=now, count=0)
        stale = table.c.window_start <= now - timedelta(hours=1)
        row = self.session.execute(
            update(table)
            .where(table.c.key == key)
            .values(
                count=case((stale, 1), else_=table.c.count + 1),
                window_start=case((stale, now), else_=table.c.window_start),
            )
            .returning(table.c.count, table.c.window_start)
        ).one()
        self.session.commit()
        count, window_start = int(row[0]), row[1]
        if count > limit:
            wait = timedelta(hours=1) - (now - aware(window_start))
            minutes = max(1, round(wait.total_seconds() / 60))
            raise TooManyRequests(
                f"too many e-mail requests from here or for this address; try again in {minutes} minute(s)"
            )

    def _throttle(self, kind: str, email: str, client: str) -> None:
        limit = self.settings.mail_max_per_hour
        self._count_request(f"{kind}:{email}", limit)
        if client:
            self._count_request(f"{kind}-client:{client}", limit * 4)

    def _send(self, to: str, subject: str, text: str, path: str = "", label: str = "") -> None:
        """Queue a letter (sent with the caller's commit); ``path`` becomes a link under the public URL."""
        url = f"{self.mailer.link_base}{path}" if path else ""
        mailqueue.enqueue(self.session, Letter(to=to, subject=subject, text=text, action_url=url, action_label=label))

    # --- invitations ----------------------------------------------------------------------------------

    def invite(self, actor: Actor, email: str, role: str, full_name: str) -> User:
        """Create (or renew) an invitation; its e-mail is queued with the commit."""
        self.mailer.require()
        valid_role(role)
        email, full_name = valid_email(email), person_name(full_name)
        user = self.session.exec(select(User).where(User.email == email)).first()
        if user is not None and (user.has_password or not user.is_active):
            raise Conflict(f"a user with e-mail {email} already exists")
        if user is None:
            user = User(email=email, full_name=full_name, hashed_password="", role=role)
        else:  # an earlier invitation, or a sign-up that was never verified: the invitation replaces it
            user.role, user.full_name = role, full_name or user.full_name
            user.approved = True
            end_links(self.session, user)  # a pending sign-up's codes (and the passwords they carry) end
        self.session.add(user)
        self.session.flush()
        hours = self.settings.invite_hours
        raw = self._issue(user, TokenPurpose.invite, timedelta(hours=hours))
        inviter = actor.user.full_name or actor.user.email
        self._send(
            email,
            "you are invited to OncoLens",
            f"{inviter} invites you to use OncoLens at {self.settings.clinic_name} as a {role}.\n\n"
            f"Open the link below to choose your password. It works once and expires in {hours} hours.\n\n"
            "OncoLens is decision support for cancer screening, not a diagnosis.",
            f"/invite?{urlencode({'token': raw})}",
            "Accept the invitation",
        )
        audit_by(self.session, actor, "invite_sent", detail=f"{email} as {role}")
        self.session.commit()
        return user

    def accept_invite(self, raw: str, password: str, full_name: str | None = None, client: str = "") -> User:
        hashed = hash_password(password)  # a weak password is refused before the link is used up
        name = person_name(full_name or "")
        _, user = self._redeem(raw, TokenPurpose.invite)
        user.hashed_password = hashed
        user.email_verified_at = user.email_verified_at or _now()
        if name:
            user.full_name = name
        self.session.add(user)
        audit(self.session, user, "invite_accepted", client=client)
        self.session.commit()
        return user

    # --- password reset -------------------------------------------------------------------------------

    def request_reset(self, email: str, client: str) -> None:
        """The same answer, and the same work, whether or not ``email`` has an account; a link is
        queued only for an active one."""
        self.mailer.require()
        email = valid_email(email)
        self._throttle("reset", email, client)
        user = self.session.exec(select(User).where(User.email == email)).first()
        if user is None or not user.is_active:
            audit(
                self.session, None, "reset_requested", detail=f"{email}: no active account, nothing sent", client=client
            )
            self.session.commit()
            return
        minutes = self.settings.reset_minutes
        raw = self._issue(user, TokenPurpose.reset, timedelta(minutes=minutes))
        self._send(
            email,
            "reset your password",
            "Someone (hopefully you) asked to reset the password of your OncoLens account.\n\n"
            f"The link below lets you choose a new one. It works once and expires in {minutes} minutes. "
            "Choosing a new password signs you out everywhere.\n\n"
            "If you did not ask for this, ignore this message: your password stays as it is.",
            f"/reset-password?{urlencode({'token': raw})}",
            "Choose a new password",
        )
        audit(self.session, user, "reset_requested", client=client)
        self.session.commit()

    def reset_password(self, raw: str, password: str, client: str = "") -> User:
        """Set the password from a reset link: every token of the user ends (sessions, other links)."""
        hashed = hash_password(password)  # a weak password is refused before the link is used up
        _, user = self._redeem(raw, TokenPurpose.reset)
        user.hashed_password = hashed
        user.email_verified_at = user.email_verified_at or _now()
        revoke_all_tokens(user)
        self.session.add(user)
        end_links(self.session, user)
        self.session.exec(delete(LoginThrottle).where(col(LoginThrottle.email) == user.email))
        audit(self.session, user, "reset_done", client=client)
        self.session.commit()
        return user

    # --- self-sign-up ---------------------------------------------------------------------------------

    def signup(self, email: str, full_name: str, password: str, client: str) -> None:
        """Start a sign-up: a 6-digit code by e-mail. The same answer for an address that has an account
        (its owner gets a note instead of a code).

        The password and name wait with the code (``AccountToken.payload``) and reach the account only
        when that code is entered: another sign-up for the same pending address neither replaces them
        nor ends the first code.
        """
        if not self.settings.self_signup:
            raise PermissionDenied(SIGNUP_OFF)
        self.mailer.require()
        email, full_name = valid_email(email), person_name(full_name)
        hashed = hash_password(password)
        self._throttle("signup", email, client)
        user = self._pending_user(email)
        if user is None:
            self._send(
                email,
                "you already have an account",
                "Someone asked to sign up for OncoLens with this address, which already has an account. "
                "If it was you, sign in, or reset your password if you forgot it.",
                "/login",
                "Sign in",
            )
            audit(self.session, None, "signup_requested", detail=f"{email}: account exists, note sent", client=client)
            self.session.commit()
            return
        minutes = self.settings.signup_code_minutes
        code = f"{secrets.randbelow(10**6):06d}"
        payload = json.dumps({"password": hashed, "full_name": full_name})
        raw = self._signup_raw(email, code)
        self._issue(user, TokenPurpose.signup, timedelta(minutes=minutes), raw=raw, payload=payload, replace=False)
        self._send(
            email,
            f"your sign-up code is {code}",
            f"Your OncoLens sign-up code is {code}. Enter it on the sign-up page within {minutes} minutes.\n\n"
            "After that an administrator approves the account before you can sign in.",
            f"/signup/verify?{urlencode({'email': email})}",
            "Enter the code",
        )
        audit(self.session, user, "signup_requested", client=client)
        self.session.commit()

    def _pending_user(self, email: str) -> User | None:
        """The not yet verified account of ``email`` (made now if there is none); None when the
        address already has an account (approved, verified or invited). Parallel sign-ups for one new
        address make one account."""
        for _ in range(2):
            user = self.session.exec(select(User).where(User.email == email)).first()
            if user is not None:
                pending = not user.approved and user.email_verified_at is None
                return user if pending else None
            try:
                with self.session.begin_nested():
                    user = User(email=email, role=Role.viewer.value, approved=False, hashed_password="")
                    self.session.add(user)
                return user
            except IntegrityError:  # another request made it meanwhile: read it
                continue
        raise Conflict(f"the account of {email} is being changed by another request; try again")

    @staticmethod
    def _signup_raw(email: str, code: str) -> str:
        return f"{email}\x00{totp.normalise(code)}"

    def verify_signup(self, email: str, code: str, client: str) -> None:
        """Check the e-mailed code (5 tries per code, counted before the code is compared, so parallel
        guesses cannot exceed them); the address is then verified and the admins told."""
        if not self.settings.self_signup:
            raise PermissionDenied(SIGNUP_OFF)
        email = email.strip().lower()[:255]
        user = self.session.exec(select(User).where(User.email == email)).first()
        if user is None:
            raise LinkInvalid(CODE_INVALID)
        table = AccountToken.__table__  # type: ignore[attr-defined]
        live = self.session.execute(
            update(table)
            .where(
                table.c.user_id == user.id,
                table.c.purpose == TokenPurpose.signup.value,
                table.c.used_at.is_(None),
                table.c.expires_at > _now(),
                table.c.attempts < SIGNUP_CODE_ATTEMPTS,
            )
            .values(attempts=table.c.attempts + 1)
            .returning(table.c.id, table.c.token_hash, table.c.attempts, table.c.payload)
        ).all()
        self.session.commit()
        if not live:
            raise LinkInvalid(CODE_INVALID)
        digest = self._hash(self._signup_raw(email, code), TokenPurpose.signup.value)
        match = next((row for row in live if hmac.compare_digest(row.token_hash, digest)), None)
        if match is None:
            attempt = max(int(row.attempts) for row in live)
            audit(self.session, user, "signup_code_failed", detail=f"attempt {attempt}", client=client)
            self.session.commit()
            raise LinkInvalid(CODE_INVALID)
        self._use(match.id, CODE_INVALID)
        pending = json.loads(match.payload) if match.payload else {}
        if pending.get("password"):
            user.hashed_password = pending["password"]
        user.full_name = pending.get("full_name", user.full_name)
        user.email_verified_at = _now()
        self.session.add(user)
        end_links(self.session, user)  # the other codes of this sign-up (and their passwords) are void now
        audit(self.session, user, "signup_verified", client=client)
        admins = self.session.exec(select(User).where(User.role == Role.admin.value, col(User.is_active))).all()
        for admin in admins:
            self._send(
                admin.email,
                "a new account awaits approval",
                f"The address {user.email} signed up (name given: \u201c{user.full_name or 'none'}\u201d) and "
                "verified the address. Check who it is, then approve the account (and give it a role) on the "
                "users page before it can be used.",
                "/admin/users",
                "Open the users page",
            )
        self.session.commit()

    def approve(self, actor: Actor, user_id: int) -> None:
        """An admin approves a verified sign-up (an address never verified cannot be approved)."""
        user = get_user(self.session, user_id)
        if user.approved:
            raise Conflict(f"{user.email} is already approved")
        if user.email_verified_at is None or not user.has_password:
            raise Conflict(
                f"{user.email} has not verified the address yet (the code sent to it was never entered): "
                "it cannot be approved before"
            )
        user.approved = True
        self.session.add(user)
        audit_by(self.session, actor, "user_approved", detail=f"{user.email} as {user.role}")
        if self.mailer.configured:
            self._send(
                user.email,
                "your account is approved",
                f"An administrator approved your OncoLens account at {self.settings.clinic_name} "
                f"(role: {user.role}). You can sign in now.",
                "/login",
                "Sign in",
            )
        self.session.commit()

    # --- signing in ------------------------------------------------------------------------------------

    def login(self, email: str, password: str, client: str, channel: str = "", otp: str | None = None) -> User:
        """Password, then (if enrolled) the second factor, both under the login throttle; then the
        account must be usable (verified and approved)."""

        def second_factor(user: User) -> None:
            if user.two_factor:
                self.check_second_factor(user, otp, client)

        user = users.login(self.session, self.settings, email, password, client, channel, second_factor)
        usable(user)
        return user

    def password_step(self, email: str, password: str, client: str, channel: str) -> User:
        """The web's first step: the password alone. For an account with a second factor it stays a
        counted attempt (TwoFactorRequired) until ``code_step`` sees the code, so codes cannot be
        guessed between correct passwords."""

        def second_factor(user: User) -> None:
            if user.two_factor:
                raise TwoFactorRequired("enter the code from your authenticator app")

        try:
            user = users.login(self.session, self.settings, email, password, client, channel, second_factor)
        except TwoFactorRequired:
            found = self.session.exec(select(User).where(User.email == email.strip().lower()[:255])).one()
            return found
        usable(user)
        return user

    def code_step(self, user: User, code: str, client: str, channel: str) -> User:
        """The web's second step: the code for ``user`` (whose password was right), throttled like a login."""
        try:
            self._counted(user, lambda: self.check_second_factor(user, code, client))
        except AuthError as exc:
            if not exc.audited:
                audit(self.session, None, "login_failed", detail=f"{user.email}: {exc} ({channel})", client=client)
            self.session.commit()
            raise
        audit(self.session, user, "login", detail=f"{channel}, second factor", client=client)
        self.session.commit()
        usable(user)
        return user

    # --- second factor --------------------------------------------------------------------------------

    def begin_enrolment(self, actor: Actor) -> Enrolment:
        """A new secret, kept (encrypted) but not in force until ``confirm_enrolment`` sees a code of it."""
        user = actor.user
        if user.two_factor:
            raise Conflict("two-factor sign-in is already on for this account; turn it off first to enrol again")
        secret = totp.new_secret()
        user.totp_secret = totp.seal(secret, self.secret)
        self.session.add(user)
        self.session.commit()
        uri = totp.provisioning_uri(secret, user.email, self.settings.clinic_name)
        return Enrolment(secret, uri, totp.qr_svg(uri))

    def confirm_enrolment(self, actor: Actor, code: str) -> list[str]:
        """Turn the second factor on with a first code from the app; returns the recovery codes (shown
        once). Every earlier session of the account ends (the caller starts a new one for this browser)."""
        user = actor.user
        if user.two_factor:
            raise Conflict("two-factor sign-in is already on for this account")
        if not user.totp_secret:
            raise Conflict("start the enrolment first (a new secret and QR code)")
        secret = totp.unseal(user.totp_secret, self.secret)
        found: list[int] = []

        def check() -> None:
            step = totp.matching_step(secret, code, None)
            if step is None:
                audit_by(self.session, actor, "2fa_failed", detail="enrolment code")
                raise WrongCode(
                    "the code does not match: scan the QR code again and enter the 6 digits the app shows now "
                    "(the phone's clock must be right)"
                )
            found.append(step)

        try:
            self._counted(user, check)
        except WrongCode as exc:
            self.session.commit()
            raise InvalidInput(str(exc)) from exc
        user.totp_enabled_at, user.totp_last_step = _now(), found[0]
        codes = self._new_recovery_codes(user)
        revoke_all_tokens(user)
        self.session.add(user)
        audit_by(self.session, actor, "2fa_enrolled", detail="every earlier session ended")
        self.session.commit()
        return codes

    def _new_recovery_codes(self, user: User) -> list[str]:
        self.session.exec(delete(RecoveryCode).where(col(RecoveryCode.user_id) == user.id))
        made = totp.new_recovery_codes(self.secret)
        assert user.id is not None
        self.session.add_all([RecoveryCode(user_id=user.id, code_hash=h) for h in made.hashes])
        return made.codes

    def regenerate_recovery_codes(self, actor: Actor, code: str) -> list[str]:
        """New recovery codes (the old ones stop working), for a current code from the app."""
        self._require_code(actor, code, allow_recovery=False)
        codes = self._new_recovery_codes(actor.user)
        audit_by(self.session, actor, "2fa_recovery_codes", detail="new recovery codes made")
        self.session.commit()
        return codes

    def disable(self, actor: Actor, password: str, code: str) -> User:
        """Turn the second factor off: the password and a code, checked as one counted attempt that
        answers the same whichever of the two is wrong."""
        if self.settings.require_two_factor:
            raise Conflict("two-factor sign-in is required on this server; it cannot be turned off")
        user = actor.user
        if not user.two_factor:
            raise Conflict("two-factor sign-in is not on for this account")

        def check() -> None:
            if not user.has_password or not verify_password(password, user.hashed_password):
                audit_by(self.session, actor, "2fa_failed", detail="turning it off: wrong password or code")
                raise WrongCode(WRONG_PASSWORD_OR_CODE)
            try:
                self.check_second_factor(user, code, actor.client, allow_recovery=True)
            except AuthError as exc:
                raise WrongCode(WRONG_PASSWORD_OR_CODE) from exc

        try:
            self._counted(user, check)
        except WrongCode as exc:
            self.session.commit()
            raise InvalidInput(str(exc)) from exc
        self._clear_second_factor(user)
        audit_by(self.session, actor, "2fa_disabled")
        self.session.commit()
        return user

    def admin_reset(self, actor: Actor | None, user_id: int) -> User:
        """An admin (``actor`` None: the command line) turns a user's second factor off (a lost phone):
        the user's sessions end; audited as ``2fa_reset``."""
        user = get_user(self.session, user_id)
        if not user.two_factor and not user.totp_secret:
            raise Conflict(f"{user.email} has no second factor to reset")
        self._clear_second_factor(user)
        revoke_all_tokens(user)
        if actor is None:
            audit(self.session, None, "2fa_reset", detail=f"command line: {user.email}")
        else:
            audit_by(self.session, actor, "2fa_reset", detail=user.email)
        self.session.commit()
        return user

    def _clear_second_factor(self, user: User) -> None:
        user.totp_secret = user.totp_enabled_at = user.totp_last_step = None
        self.session.exec(delete(RecoveryCode).where(col(RecoveryCode.user_id) == user.id))
        self.session.add(user)

    def _require_code(self, actor: Actor, code: str, allow_recovery: bool) -> None:
        """A current code from the app (or a recovery code), as a counted attempt; InvalidInput if wrong."""
        if not actor.user.two_factor:
            raise Conflict("two-factor sign-in is not on for this account")
        try:
            self._counted(
                actor.user,
                lambda: self.check_second_factor(actor.user, code, actor.client, allow_recovery=allow_recovery),
            )
        except WrongCode as exc:
            self.session.commit()
            raise InvalidInput(str(exc)) from exc

    def check_second_factor(self, user: User, code: str | None, client: str = "", allow_recovery: bool = True) -> None:
        """Accept a current TOTP code (each time step at most once) or an unused recovery code; else AuthError.

        Each is used up by one conditional UPDATE, so of parallel requests with the same code one is
        accepted. The caller commits (the login throttle does, whatever the outcome).
        """
        if not code or not code.strip():
            raise TwoFactorRequired(
                "this account signs in with a second factor: send the 6-digit code from the authenticator "
                "app (or a recovery code) as the form field 'otp'"
            )
        assert user.totp_secret is not None
        step = totp.matching_step(totp.unseal(user.totp_secret, self.secret), code, user.totp_last_step)
        if step is not None:
            last = col(User.totp_last_step)
            won = self.session.exec(
                update(User).where(col(User.id) == user.id, last.is_(None) | (last < step)).values(totp_last_step=step)
            )
            if won.rowcount == 1:
                set_committed_value(user, "totp_last_step", step)
                return
        elif allow_recovery:
            digest = totp.keyed_hash(code, self.secret, "recovery")
            for stored in self.session.exec(
                select(RecoveryCode).where(col(RecoveryCode.user_id) == user.id, col(RecoveryCode.used_at).is_(None))
            ).all():
                if not hmac.compare_digest(stored.code_hash, digest):
                    continue
                won = self.session.exec(
                    update(RecoveryCode)
                    .where(col(RecoveryCode.id) == stored.id, col(RecoveryCode.used_at).is_(None))
                    .values(used_at=_now())
                )
                if won.rowcount == 1:
                    left = self.recovery_codes_left(user)
                    audit(self.session, user, "recovery_code_used", detail=f"{left} left", client=client)
                    return
        audit(self.session, user, "2fa_failed", client=client)
        raise WrongCode("the two-factor code is wrong or was already used")

    def recovery_codes_left(self, user: User) -> int:
        rows = self.session.exec(
            select(RecoveryCode.id).where(col(RecoveryCode.user_id) == user.id, col(RecoveryCode.used_at).is_(None))
        ).all()
        return len(rows)


def account_state(user: User) -> str:
    """How an admin sees an account: invited, unverified, awaiting approval, deactivated or active."""
    if not user.is_active:
        return "deactivated"
    if not user.approved:
        return "awaiting approval" if user.email_verified_at and user.has_password else "unverified"
    if not user.has_password:
        return "invited"
    return "active"


def usable(user: User) -> None:
    """AccountPending for a correct password on an account that may not be used yet."""
    if not user.approved:
        if user.email_verified_at is None:
            raise AccountPending("this account's e-mail address is not verified yet: enter the code sent to it")
        raise AccountPending("this account awaits an administrator's approval")


def needs_enrolment(settings: Settings, user: User) -> bool:
    return settings.require_two_factor and not user.two_factor
