"""Domain errors: what went wrong, in the words of the domain. The edges map them to their own
answers once (the API in ``api/errors.py``: 404, 403, 409, 410, 422, 503, 507, 429, 400)."""

from __future__ import annotations


class DomainError(Exception):
    """Base of the errors the services raise for a request that cannot be served as asked."""


class NotFound(DomainError):
    """The thing asked for does not exist, or the caller may not know that it does."""


class PermissionDenied(DomainError):
    """The caller is known but their role does not allow this."""


class Conflict(DomainError):
    """The request clashes with the current state (a duplicate e-mail, demoting oneself)."""


class InvalidInput(DomainError):
    """A value the caller sent breaks a rule of the domain (a limit, a required field)."""


class Gone(DomainError):
    """The record exists but the file behind it is missing from storage."""


class Unavailable(DomainError):
    """What is needed to answer is not installed, not loaded or not answering (a model of a compat app,
    the image store, the database); ``retry_after_s`` says when to try again (HTTP Retry-After)."""

    retry_after_s = 10


class OutOfSpace(DomainError):
    """The data folder is (nearly) full: new cases are refused while reads and reviews go on (HTTP 507)."""


class TooManyRequests(DomainError):
    """The caller asked for this too often (e-mails per address or client); wait and try again."""


class LinkInvalid(DomainError):
    """An e-mailed link or code is unknown, expired or already used."""
