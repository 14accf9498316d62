"""Domain errors -> HTTP responses, in one place. Every error body is ``{"detail": "..."}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from oncolens.auth import AuthError, Forbidden, PasswordTooWeak
from oncolens.imaging import ImageDecodeError
from oncolens.zoo import ModelNotFound, PackageError

log = logging.getLogger("oncolens.api")


class BadRequest(ValueError):
    """The request is malformed in a way the schema cannot express (e.g. no image in it)."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status


def _json(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImageDecodeError)
    async def image_error(_: Request, exc: ImageDecodeError) -> JSONResponse:
        return _json(exc.status, str(exc))

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return _json(exc.status, str(exc))

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, exc: AuthError) -> JSONResponse:
        response = _json(exc.status, str(exc))
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(Forbidden)
    async def forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return _json(403, str(exc))

    @app.exception_handler(PasswordTooWeak)
    async def weak_password(_: Request, exc: PasswordTooWeak) -> JSONResponse:
        return _json(400, str(exc))

    @app.exception_handler(ModelNotFound)
    async def model_not_found(_: Request, exc: ModelNotFound) -> JSONResponse:
        return _json(404, str(exc))

    @app.exception_handler(PackageError)
    async def broken_package(_: Request, exc: PackageError) -> JSONResponse:
        log.error("model package failed to load: %s", exc)
        return _json(503, f"the model is unavailable: {exc}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, "internal error: the request could not be completed (see the server log)")
