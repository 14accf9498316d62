"""Named dependencies, so routes read like sentences: ``model: ModelDep, images: ImagesDep``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Annotated

import anyio
from fastapi import Depends, Path, Query, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from oncolens.accounts.auth import AuthError, Forbidden, user_for_token
from oncolens.config import Settings
from oncolens.http.batching import InferenceBatcher
from oncolens.services.accounts import Accounts, TwoFactorNeeded, needs_enrolment
from oncolens.services.analysis import Recorder
from oncolens.services.audit import Actor
from oncolens.services.cases import CaseService
from oncolens.services.paging import CURSOR_MAX
from oncolens.store.db.models import Role, User
from oncolens.store.images import ImageStore
from oncolens.zoo import ModelPackage, Zoo

log = logging.getLogger("oncolens.api")

# Dependencies that only look something up are ``async def``: FastAPI runs a plain ``def`` dependency on
# a worker thread, and each such hop cost the predict path CPU and latency under load (README,
# Performance). Those that touch the database or files stay plain ``def`` or hand that part to a thread.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_zoo(request: Request) -> Zoo:
    zoo: Zoo = request.app.state.zoo
    return zoo


SettingsDep = Annotated[Settings, Depends(get_settings)]

# Integers from a query or path go to the database: both engines store 32-bit integers in these
# columns, and Python would pass a larger number through to an OverflowError (a 500).
DB_INT_MAX = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=DB_INT_MAX, description="Rows to skip.")]
Cursor = Annotated[
    str | None,
    Query(
        max_length=CURSOR_MAX,
        description="The next_cursor of the previous page: keyset paging, as fast deep down as on the first "
        "page (instead of offset).",
    ),
]
UserId = Annotated[int, Path(ge=1, le=DB_INT_MAX)]
ZooDep = Annotated[Zoo, Depends(get_zoo)]


async def get_model(model_id: str, zoo: ZooDep) -> ModelPackage:
    """A loaded package straight from the zoo; the first use of one loads it on a worker thread."""
    loaded = zoo.loaded(model_id)
    return loaded if loaded is not None else await anyio.to_thread.run_sync(zoo.get, model_id)


ModelDep = Annotated[ModelPackage, Depends(get_model)]


RETIRE_AFTER_S = 30.0


def retire(tasks: set[asyncio.Task[None]], batcher: InferenceBatcher) -> None:
    """Stop ``batcher`` once the requests that already hold it are answered (``RETIRE_AFTER_S`` later)."""

    async def later() -> None:
        await asyncio.sleep(RETIRE_AFTER_S)
        await batcher.stop()

    task = asyncio.get_running_loop().create_task(later())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def batcher_for(request: Request, model: ModelPackage) -> InferenceBatcher:
    """The batcher for ``model`` on the running event loop (created on first use).

    A server has one loop per process; keying by loop as well keeps an app that is driven from
    several loops (test clients, embedding) from queueing work to a loop that never runs it.
    """
    batchers: dict[tuple[str, int], InferenceBatcher] = request.app.state.batchers
    key = (model.id, id(asyncio.get_running_loop()))
    if key in batchers and batchers[key].package is not model:
        # A promotion or rollback put another package in place: new requests queue for the package that
        # serves now; the old batcher answers what it holds and stops a while later.
        retire(request.app.state.retired_batchers, batchers.pop(key))
    if key not in batchers:
        settings: Settings = request.app.state.settings
        batchers[key] = InferenceBatcher(
            model,
            request.app.state.executor,
            model.images_per_run(settings.batch_max),
            settings.batch_wait_ms,
            request.app.state.metrics,
            request.app.state.idle_release,
        )
    return batchers[key]


async def get_batcher(request: Request, model: ModelDep) -> InferenceBatcher:
    return batcher_for(request, model)


BatcherDep = Annotated[InferenceBatcher, Depends(get_batcher)]


def get_session(request: Request) -> Iterator[Session]:
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        try:
            session.close()
        except Exception as exc:  # the connection died under the request (a database restart):
            # its rollback cannot reach the server; the pool drops that connection, the answer stands.
            log.warning("closing a database session failed (%s); its connection is dropped", type(exc).__name__)
            session.invalidate()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_store(request: Request) -> ImageStore:
    store: ImageStore = request.app.state.store
    return store


StoreDep = Annotated[ImageStore, Depends(get_store)]

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token")


def enrolling_user(request: Request, session: SessionDep, token: Annotated[str, Depends(oauth2_scheme)]) -> User:
    """The caller, whether or not they still owe the second factor the server requires (the routes
    that let them enrol one, read their own account or log out)."""
    return user_for_token(session, token, request.app.state.secret)


EnrollingUser = Annotated[User, Depends(enrolling_user)]


def enrolled(settings: Settings, user: User) -> User:
    if needs_enrolment(settings, user):
        raise TwoFactorNeeded(
            "this server requires two-factor sign-in: enrol an authenticator app first "
            "(POST /api/v1/users/me/2fa/setup, then /api/v1/users/me/2fa/enable; on the web: /account)"
        )
    return user


def current_user(request: Request, user: EnrollingUser) -> User:
    return enrolled(request.app.state.settings, user)


CurrentUser = Annotated[User, Depends(current_user)]
BearerToken = Annotated[str, Depends(oauth2_scheme)]


async def predict_access(request: Request) -> None:
    """With ``ONCOLENS_REQUIRE_AUTH_FOR_PREDICT`` on, the open predict and compat routes need a login:
    a Bearer token, or the web app's session cookie (checked against the database on a worker thread).
    Off by default, as in the apps replaced."""
    settings: Settings = request.app.state.settings
    if not settings.require_auth_for_predict:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else request.cookies.get("oncolens_session", "")
    if not token:
        raise AuthError(
            "this server requires a login for predictions (ONCOLENS_REQUIRE_AUTH_FOR_PREDICT): send "
            "'Authorization: Bearer <token>' with a token from POST /api/v1/auth/token"
        )
    await anyio.to_thread.run_sync(_check_login, request, settings, token)


def _check_login(request: Request, settings: Settings, token: str) -> None:
    with Session(request.app.state.engine) as session:
        enrolled(settings, user_for_token(session, token, request.app.state.secret))


PredictAccess = Depends(predict_access)


def require_roles(*roles: Role) -> object:
    def check(user: CurrentUser) -> User:
        if user.role not in roles:
            allowed = " or ".join(r.value for r in roles)
            raise Forbidden(f"this needs the {allowed} role; you are {user.role}")
        return user

    return Depends(check)


AdminUser = Annotated[User, require_roles(Role.admin)]
WriterUser = Annotated[User, require_roles(Role.admin, Role.clinician)]


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


def api_actor(request: Request, user: CurrentUser) -> Actor:
    """The caller of an API route as the services' audit trail records it."""
    return Actor(user, client_of(request))


ActorDep = Annotated[Actor, Depends(api_actor)]


def get_cases(
    request: Request, session: SessionDep, store: StoreDep, zoo: ZooDep, settings: SettingsDep
) -> CaseService:
    return CaseService(session, store, zoo, settings)


CasesDep = Annotated[CaseService, Depends(get_cases)]


def get_accounts(request: Request, session: SessionDep, settings: SettingsDep) -> Accounts:
    return Accounts(session, settings, request.app.state.secret, request.app.state.mailer)


AccountsDep = Annotated[Accounts, Depends(get_accounts)]


def public_base(request: Request) -> str:
    """The origin of absolute URLs in answers (FHIR): ``ONCOLENS_PUBLIC_URL``, else none (relative
    URLs); never the address the request names (its Host header is the client's to choose)."""
    settings: Settings = request.app.state.settings
    return (settings.public_url or "").rstrip("/")


def recorder(batcher: InferenceBatcher) -> Recorder | None:
    """What counts each analysed case in the server's Prometheus metrics (None without metrics)."""
    return batcher.metrics.record_case if batcher.metrics is not None else None
