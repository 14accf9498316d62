"""Named dependencies, so routes read like sentences: ``model: ModelDep, images: ImagesDep``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from oncolens.api.batching import InferenceBatcher
from oncolens.auth import AuthError, Forbidden, decode_access_token
from oncolens.cases import CaseStore
from oncolens.config import Settings
from oncolens.db.models import Role, User
from oncolens.zoo import ModelPackage, Zoo


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_zoo(request: Request) -> Zoo:
    zoo: Zoo = request.app.state.zoo
    return zoo


SettingsDep = Annotated[Settings, Depends(get_settings)]
ZooDep = Annotated[Zoo, Depends(get_zoo)]


def get_model(model_id: str, zoo: ZooDep) -> ModelPackage:
    return zoo.get(model_id)


ModelDep = Annotated[ModelPackage, Depends(get_model)]


def batcher_for(request: Request, model: ModelPackage) -> InferenceBatcher:
    """The batcher for ``model`` on the running event loop (created on first use).

    A server has one loop per process; keying by loop as well keeps an app that is driven from
    several loops (test clients, embedding) from queueing work to a loop that never runs it.
    """
    batchers: dict[tuple[str, int], InferenceBatcher] = request.app.state.batchers
    key = (model.id, id(asyncio.get_running_loop()))
    if key not in batchers:
        settings: Settings = request.app.state.settings
        batchers[key] = InferenceBatcher(
            model, request.app.state.executor, settings.batch_max, settings.batch_wait_ms, request.app.state.metrics
        )
    return batchers[key]


async def get_batcher(request: Request, model: ModelDep) -> InferenceBatcher:
    return batcher_for(request, model)


BatcherDep = Annotated[InferenceBatcher, Depends(get_batcher)]


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(request: Request) -> CaseStore:
    store: CaseStore = request.app.state.store
    return store


StoreDep = Annotated[CaseStore, Depends(get_store)]

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token")


def current_user(request: Request, session: SessionDep, token: Annotated[str, Depends(oauth2_scheme)]) -> User:
    claims = decode_access_token(token, request.app.state.secret)
    user = session.get(User, int(claims["sub"]))
    if user is None or not user.is_active:
        raise AuthError("the account for this token no longer exists or is disabled")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


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
