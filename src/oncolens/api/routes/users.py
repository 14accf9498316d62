from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from oncolens.api.deps import AdminUser, CurrentUser, SessionDep, UserId, client_of
from oncolens.api.errors import BadRequest
from oncolens.api.records import UserCreate, UserPublic, UserUpdate, UserUpdateMe
from oncolens.auth import AuthError, hash_password, revoke_all_tokens, verify_password
from oncolens.cases import audit
from oncolens.db.models import User

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserPublic)
def read_me(user: CurrentUser) -> UserPublic:
    return UserPublic.of(user)


@router.patch("/me", response_model=UserPublic)
def update_me(body: UserUpdateMe, user: CurrentUser, session: SessionDep) -> UserPublic:
    """Change your own name or password (the password change needs the current password)."""
    if body.full_name is not None:
        user.full_name = body.full_name
    if body.password is not None:
        if body.current_password is None or not verify_password(body.current_password, user.hashed_password):
            raise AuthError("the current password is wrong")
        user.hashed_password = hash_password(body.password)
        revoke_all_tokens(user)  # this token too: the client logs in again with the new password
    session.add(user)
    session.commit()
    return UserPublic.of(user)


@router.get("", response_model=list[UserPublic])
def list_users(_: AdminUser, session: SessionDep) -> list[UserPublic]:
    return [UserPublic.of(u) for u in session.exec(select(User).order_by(User.id))]  # type: ignore[arg-type]


@router.post("", response_model=UserPublic, status_code=201)
def create_user(request: Request, body: UserCreate, admin: AdminUser, session: SessionDep) -> UserPublic:
    user = User(
        email=str(body.email).lower(),
        full_name=body.full_name,
        hashed_password=hash_password(body.password),
        role=body.role,
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise BadRequest(f"a user with e-mail {user.email} already exists", status=409) from exc
    audit(session, admin, "user_create", detail=f"{user.email} as {user.role}", client=client_of(request))
    session.commit()
    return UserPublic.of(user)


def _get(session: SessionDep, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise BadRequest(f"no user {user_id}", status=404)
    return user


@router.get("/{user_id}", response_model=UserPublic)
def read_user(user_id: UserId, _: AdminUser, session: SessionDep) -> UserPublic:
    return UserPublic.of(_get(session, user_id))


@router.patch("/{user_id}", response_model=UserPublic)
def update_user(
    request: Request, user_id: UserId, body: UserUpdate, admin: AdminUser, session: SessionDep
) -> UserPublic:
    """Change a user's name, role, password or active flag (deactivate instead of deleting)."""
    user = _get(session, user_id)
    if user.id == admin.id and (body.role not in (None, "admin") or body.is_active is False):
        raise BadRequest("you cannot demote or deactivate your own account", status=409)
    changes = body.model_dump(exclude_unset=True, exclude={"password"})
    for field, value in changes.items():
        setattr(user, field, value)
    if body.password is not None:
        user.hashed_password = hash_password(body.password)
        changes["password"] = "changed"
    if body.password is not None or body.is_active is False:
        revoke_all_tokens(user)  # a reset or a deactivation ends every session of the account
    audit(session, admin, "user_update", detail=f"{user.email}: {sorted(changes)}", client=client_of(request))
    session.add(user)
    session.commit()
    return UserPublic.of(user)
