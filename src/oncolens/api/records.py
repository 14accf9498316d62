"""What the users, cases and audit routes accept and return (Create / Public / Update variants)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, EmailStr, Field

from oncolens.db.models import AuditEvent, Case, User
from oncolens.services.inputs import CaseReview, PartialUpdate
from oncolens.views import CasePublic, StatusName, UTCDateTime
from oncolens.zoo.card import RiskLevel

__all__ = ["CasePublic", "CaseUpdate", "StatusName", "UTCDateTime"]

RoleName = Literal["admin", "clinician", "viewer"]


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int = Field(description="Seconds until the token expires.")


class UserPublic(BaseModel):
    id: int
    email: str
    full_name: str
    role: RoleName
    is_active: bool
    created_at: UTCDateTime

    @classmethod
    def of(cls, user: User) -> UserPublic:
        return cls.model_validate(user, from_attributes=True)


class UserCreate(BaseModel):
    email: EmailStr
    password: str = Field(min_length=10, max_length=128)
    full_name: str = Field("", max_length=255)
    role: RoleName = "clinician"


class UserUpdate(PartialUpdate):
    """Admin changes to an account; every field optional."""

    full_name: str | None = Field(None, max_length=255)
    role: RoleName | None = None
    is_active: bool | None = None
    password: str | None = Field(None, min_length=10, max_length=128)


class UserUpdateMe(PartialUpdate):
    nullable = frozenset({"current_password"})

    full_name: str | None = Field(None, max_length=255)
    password: str | None = Field(None, min_length=10, max_length=128)
    current_password: str | None = Field(None, description="Needed to change the password.")


class CaseSummary(BaseModel):
    id: str
    owner_id: int
    model_id: str
    created_at: UTCDateTime
    patient_ref: str
    top_class: str
    p_malignant: float
    risk_level: RiskLevel
    status: StatusName

    @classmethod
    def of(cls, case: Case) -> CaseSummary:
        return cls.model_validate(case, from_attributes=True)


class CasesPage(BaseModel):
    items: list[CaseSummary]
    total: int = Field(description="Cases matching the filters, over all pages.")
    limit: int
    offset: int


# The clinician review: the API takes the services' own input model.
CaseUpdate = CaseReview


class AuditEventPublic(BaseModel):
    id: int
    at: UTCDateTime
    user_id: int | None
    actor: str
    action: str
    case_id: str | None
    detail: str
    client: str

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventPublic:
        return cls.model_validate(event, from_attributes=True)


class AuditPage(BaseModel):
    items: list[AuditEventPublic]
    total: int
    limit: int
    offset: int
