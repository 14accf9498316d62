"""Users: your own account, and the admin's management of all accounts (no deletion: deactivate)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from oncolens.api.deps import AdminUser, CurrentUser, SessionDep, UserId, client_of
from oncolens.api.records import UserCreate, UserPublic, UserUpdate, UserUpdateMe
from oncolens.services import users
from oncolens.services.audit import Actor

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserPublic)
def read_me(user: CurrentUser) -> UserPublic:
    return UserPublic.of(user)


@router.patch("/me", response_model=UserPublic)
def update_me(request: Request, body: UserUpdateMe, user: CurrentUser, session: SessionDep) -> UserPublic:
    """Change your own name or password (the password change needs the current password)."""
    actor = Actor(user, client_of(request))
    return UserPublic.of(users.update_me(session, actor, body.full_name, body.password, body.current_password))


@router.get("", response_model=list[UserPublic])
def list_users(_: AdminUser, session: SessionDep) -> list[UserPublic]:
    return [UserPublic.of(u) for u in users.list_users(session)]


@router.post("", response_model=UserPublic, status_code=201)
def create_user(request: Request, body: UserCreate, admin: AdminUser, session: SessionDep) -> UserPublic:
    actor = Actor(admin, client_of(request))
    return UserPublic.of(users.create_user(session, actor, str(body.email), body.password, body.full_name, body.role))


@router.get("/{user_id}", response_model=UserPublic)
def read_user(user_id: UserId, _: AdminUser, session: SessionDep) -> UserPublic:
    return UserPublic.of(users.get_user(session, user_id))


@router.patch("/{user_id}", response_model=UserPublic)
def update_user(
    request: Request, user_id: UserId, body: UserUpdate, admin: AdminUser, session: SessionDep
) -> UserPublic:
    """Change a user's name, role, password or active flag (deactivate instead of deleting)."""
    actor = Actor(admin, client_of(request))
    changed = users.update_user(session, actor, user_id, body.full_name, body.role, body.is_active, body.password)
    return UserPublic.of(changed)
