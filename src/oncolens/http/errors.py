"""Domain errors -> HTTP responses, in one place. Every error body is ``{"detail": "..."}``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from oncolens.accounts.auth import AuthError, PasswordTooWeak
from oncolens.errors import (
    Conflict,
    DomainError,
    Gone,
    InvalidInput,
    LinkInvalid,
    NotFound,
    OutOfSpace,
    PermissionDenied,
    TooManyRequests,
    Unavailable,
)
from oncolens.services.audit import out_of_space
from oncolens.vision.decode import ImageDecodeError
from oncolens.zoo import ModelNotFound, PackageError

log = logging.getLogger("oncolens.api")
DATABASE_DOWN = "the database is not answering right now; try again in a few seconds"
DATABASE_RETRY_S = 5
DISK_FULL = "the server's disk is full: nothing new can be stored until space is freed (reading goes on)"


# The one place a domain error becomes an HTTP status.
DOMAIN_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    PermissionDenied: 403,
    Conflict: 409,
    Gone: 410,
    InvalidInput: 422,
    Unavailable: 503,
    OutOfSpace: 507,
    TooManyRequests: 429,
    LinkInvalid: 400,
}


def status_of(exc: DomainError) -> int:
    """The HTTP status of a domain error (its nearest listed class; 400 if none is listed)."""
    for kind in type(exc).__mro__:
        if kind in DOMAIN_STATUS:
            return DOMAIN_STATUS[kind]
    return 400


class BadRequest(ValueError):
    """The HTTP request itself is malformed in a way the schema cannot express (e.g. no image in it)."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status


def _json(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _answer(request: Request, status: int, detail: str) -> Response:
    """JSON for API clients; a web page for a browser on a web page (when the web app is mounted)."""
    page = getattr(request.app.state, "html_error", None)
    wants_html = "text/html" in request.headers.get("accept", "")
    if page is not None and wants_html and not request.url.path.startswith(("/api/", "/compat/")):
        return page(request, status, detail)  # type: ignore[no-any-return]
    return _json(status, detail)


def validation_message(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one sentence: ``body.role: Input should be ...; query.limit: ...``."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(parts) or "the request is not valid"


def first_line(exc: BaseException) -> str:
    """The first line of an error (of the driver's error for a database one): for one log line."""
    return (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]


def _transient(exc: DBAPIError) -> bool:
    """A failure of the database connection or server, not of the statement (OperationalError and
    InterfaceError in DB-API terms: a restart, a dropped connection, a full disk)."""
    return isinstance(exc, OperationalError | InterfaceError)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return _answer(request, 422, validation_message(exc.errors()))

    @app.exception_handler(ImageDecodeError)
    async def image_error(request: Request, exc: ImageDecodeError) -> Response:
        return _answer(request, exc.status, str(exc))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return _answer(request, exc.status, str(exc))

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, exc: AuthError) -> JSONResponse:
        response = _json(exc.status, str(exc))
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> Response:
        response = _answer(request, status_of(exc), str(exc))
        if isinstance(exc, Unavailable):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    # The database restarting, unreachable or out of connections is the server's temporary state, not
    # a bug: a prompt 503 with Retry-After (a full disk: 507), never a 500, and one log line, not a traceback.
    @app.exception_handler(DBAPIError)
    @app.exception_handler(DisconnectionError)
    @app.exception_handler(PoolTimeout)
    async def database_down(request: Request, exc: Exception) -> Response:
        if isinstance(exc, DBAPIError) and not exc.connection_invalidated and not _transient(exc):
            log.exception("database error on %s %s", request.method, request.url.path)
            return _json(500, "internal error: the request could not be completed (see the server log)")
        if out_of_space(exc):
            log.error("the database's disk is full on %s %s", request.method, request.url.path)
            return _answer(request, 507, DISK_FULL)
        log.error("the database is unavailable on %s %s: %s", request.method, request.url.path, first_line(exc))
        response = _answer(request, 503, DATABASE_DOWN)
        response.headers["Retry-After"] = str(DATABASE_RETRY_S)
        return response

    @app.exception_handler(PasswordTooWeak)
    async def weak_password(_: Request, exc: PasswordTooWeak) -> JSONResponse:
        return _json(400, str(exc))

    @app.exception_handler(ModelNotFound)
    async def model_not_found(request: Request, exc: ModelNotFound) -> Response:
        return _answer(request, 404, str(exc))

    @app.exception_handler(PackageError)
    async def broken_package(_: Request, exc: PackageError) -> JSONResponse:
        log.error("model package failed to load: %s", exc)
        return _json(503, f"the model is unavailable: {exc}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, "internal error: the request could not be completed (see the server log)")
