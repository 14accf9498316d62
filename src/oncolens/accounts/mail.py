"""E-mail over SMTP (invitations, password resets, sign-up codes): plain text and HTML in one message.

Sent by the standard library's SMTP client to the server in the ``ONCOLENS_SMTP_*`` settings, in
plain SMTP, STARTTLS or SMTPS, logging in when a user is set. With no ``ONCOLENS_SMTP_HOST`` nothing is
sent: every feature that needs e-mail says so (:class:`MailNotConfigured`) and the command line
(``oncolens users``) stays the way to create accounts and set passwords.
"""

from __future__ import annotations

import html
import ipaddress
import json
import smtplib
import ssl
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import formataddr, make_msgid
from urllib.parse import urlsplit

from oncolens.config import Settings
from oncolens.errors import Conflict, Unavailable

NOT_CONFIGURED = (
    "e-mail is not set up on this server (ONCOLENS_SMTP_HOST is not set): an administrator can create "
    "accounts and set passwords with the command line, `oncolens users`"
)


NO_PUBLIC_URL = (
    "e-mail with links needs ONCOLENS_PUBLIC_URL, the address users reach this server at "
    "(e.g. https://oncolens.clinic.org): links are never built from the address a request names"
)


class MailNotConfigured(Conflict):
    """An e-mail feature was asked for on a server with no SMTP settings, or without the public
    address its links must point to (``ONCOLENS_PUBLIC_URL``)."""

    def __init__(self, detail: str = NOT_CONFIGURED) -> None:
        super().__init__(detail)


class MailFailed(Unavailable):
    """The SMTP server could not be reached or refused the message."""


@dataclass(frozen=True)
class Letter:
    """One e-mail: the plain-text body is what every client shows; ``html`` is the same text, laid out."""

    to: str
    subject: str
    text: str
    action_url: str = ""
    action_label: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Letter:
        return cls(**json.loads(text))


class Mailer:
    """Sends :class:`Letter`s through the configured SMTP server (a new connection per message)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def configured(self) -> bool:
        """SMTP is set up and so is the public address that links point to."""
        return self.settings.mail_configured and bool(self.settings.public_url)

    def require(self) -> None:
        if not self.settings.mail_configured:
            raise MailNotConfigured
        if not self.settings.public_url:
            raise MailNotConfigured(NO_PUBLIC_URL)

    @property
    def link_base(self) -> str:
        """``ONCOLENS_PUBLIC_URL`` without its trailing slash: the one origin of every link in e-mail."""
        self.require()
        return str(self.settings.public_url).rstrip("/")

    @property
    def sender(self) -> str:
        """``ONCOLENS_SMTP_FROM``, or oncolens@ the host of ``ONCOLENS_PUBLIC_URL`` (the address the
        recipients know the server by; never the SMTP relay's address, such as 127.0.0.1)."""
        s = self.settings
        if s.smtp_from:
            return s.smtp_from
        host = urlsplit(s.public_url or "").hostname or ""
        relay = s.smtp_host or ""
        domain = host or (relay if relay and not _is_ip(relay) and relay != "localhost" else "localhost")
        return formataddr((s.clinic_name, f"oncolens@{domain}"))

    def message(self, letter: Letter) -> EmailMessage:
        clinic = self.settings.clinic_name
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = letter.to
        msg["Subject"] = f"{clinic}: {letter.subject}"
        msg["Message-ID"] = make_msgid(domain="oncolens")
        footer = f"\n\n-- \n{clinic} (OncoLens). If you did not expect this message, you can ignore it."
        link = f"\n\n{letter.action_label}:\n{letter.action_url}" if letter.action_url else ""
        msg.set_content(letter.text + link + footer)
        msg.add_alternative(_html(clinic, letter), subtype="html")
        return msg

    def send(self, letter: Letter) -> None:
        """Deliver ``letter``; MailNotConfigured without SMTP settings, MailFailed when delivery fails."""
        if not self.settings.mail_configured:
            raise MailNotConfigured
        s = self.settings
        host = str(s.smtp_host)
        port = s.smtp_port or (465 if s.smtp_ssl else 587 if s.smtp_starttls else 25)
        context = ssl.create_default_context()
        try:
            client: smtplib.SMTP = (
                smtplib.SMTP_SSL(host, port, timeout=s.smtp_timeout_s, context=context)
                if s.smtp_ssl
                else smtplib.SMTP(host, port, timeout=s.smtp_timeout_s)
            )
            with client:
                if s.smtp_starttls:
                    client.starttls(context=context)
                if s.smtp_user:
                    client.login(s.smtp_user, s.smtp_password.get_secret_value() if s.smtp_password else "")
                client.send_message(self.message(letter))
        except (OSError, smtplib.SMTPException) as exc:
            raise MailFailed(f"the e-mail to {letter.to} could not be sent ({host}:{port}: {exc})") from exc


def _html(clinic: str, letter: Letter) -> str:
    paragraphs = "".join(
        f'<p style="margin:0 0 12px">{html.escape(part).replace(chr(10), "<br>")}</p>'
        for part in letter.text.split("\n\n")
    )
    button = (
        f'<p style="margin:20px 0"><a href="{html.escape(letter.action_url, quote=True)}" '
        'style="background:#1d4f91;color:#fff;padding:10px 18px;border-radius:4px;text-decoration:none">'
        f"{html.escape(letter.action_label)}</a></p>"
        f'<p style="font-size:12px;color:#555">Or copy this address into your browser:<br>'
        f"{html.escape(letter.action_url)}</p>"
        if letter.action_url
        else ""
    )
    return (
        '<!doctype html><html><body style="font-family:sans-serif;color:#222;max-width:560px">'
        f'<h2 style="color:#1d4f91">{html.escape(clinic)}</h2>{paragraphs}{button}'
        '<p style="font-size:12px;color:#777">OncoLens. If you did not expect this message, you can ignore it.</p>'
        "</body></html>"
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
