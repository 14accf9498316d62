"""What the users, cases and audit routes accept and return (Create / Public / Update variants)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, EmailStr, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from oncolens.api.schemas import AssessmentPublic
from oncolens.db.models import AuditEvent, Case, CaseImage, User

RoleName = Literal["admin", "clinician", "viewer"]
StatusName = Literal["pending_review", "reviewed", "confirmed"]


def as_utc(moment: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back without a zone, so the zone is put back."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# A time as the API shows it: always with its zone (RFC 3339, e.g. 2026-11-23T18:04:05.123456Z).
UTCDateTime = Annotated[datetime, AfterValidator(as_utc)]


class PartialUpdate(BaseModel):
    """A PATCH body: a field left out keeps its value; null is refused (422), since the columns
    behind these fields cannot be empty. Fields named in ``nullable`` may be null."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _refuse_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = sorted(k for k, v in data.items() if v is None and k in cls.model_fields and k not in cls.nullable)
            if nulls:
                raise ValueError(f"{', '.join(nulls)} cannot be null; leave a field out to keep its value")
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        for name, prop in schema.get("properties", {}).items():
            options = prop.get("anyOf")
            if name in cls.nullable or not options or {"type": "null"} not in options:
                continue
            rest = [option for option in options if option != {"type": "null"}]
            del prop["anyOf"]
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest
            if "default" in prop and prop["default"] is None:
                del prop["default"]
        return schema


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


class PatientPublic(BaseModel):
    ref: str
    name: str
    age: int | None
    sex: str
    email: str
    clinical_notes: str


class ReviewPublic(BaseModel):
    status: StatusName
    confirmed_diagnosis: str
    notes: str
    reviewed_by: int | None
    reviewed_at: UTCDateTime | None


class CaseImagePublic(BaseModel):
    id: str
    position: int
    filename: str
    media_type: str
    width: int
    height: int
    size_bytes: int
    url: str
    result: AssessmentPublic


class CasePublic(BaseModel):
    id: str
    owner_id: int
    model_id: str
    model_version: str
    created_at: UTCDateTime
    updated_at: UTCDateTime
    patient: PatientPublic
    result: AssessmentPublic
    aggregation_rule: str
    review: ReviewPublic
    images: list[CaseImagePublic]
    disclaimer: str

    @classmethod
    def of(cls, case: Case, images: list[CaseImage], disclaimer: str) -> CasePublic:
        return cls(
            id=case.id,
            owner_id=case.owner_id,
            model_id=case.model_id,
            model_version=case.model_version,
            created_at=case.created_at,
            updated_at=case.updated_at,
            patient=PatientPublic(
                ref=case.patient_ref,
                name=case.patient_name,
                age=case.patient_age,
                sex=case.patient_sex,
                email=case.patient_email,
                clinical_notes=case.clinical_notes,
            ),
            result=AssessmentPublic(**json.loads(case.result_json)),
            aggregation_rule=case.aggregation_rule,
            review=ReviewPublic(
                status=case.status,
                confirmed_diagnosis=case.confirmed_diagnosis,
                notes=case.review_notes,
                reviewed_by=case.reviewed_by,
                reviewed_at=case.reviewed_at,
            ),
            images=[
                CaseImagePublic(
                    id=image.id,
                    position=image.position,
                    filename=image.original_filename,
                    media_type=image.media_type,
                    width=image.width,
                    height=image.height,
                    size_bytes=image.size_bytes,
                    url=f"/api/v1/cases/{case.id}/images/{image.id}",
                    result=AssessmentPublic(**json.loads(image.result_json)),
                )
                for image in sorted(images, key=lambda i: i.position)
            ],
            disclaimer=disclaimer,
        )


class CaseSummary(BaseModel):
    id: str
    owner_id: int
    model_id: str
    created_at: UTCDateTime
    patient_ref: str
    top_class: str
    p_malignant: float
    risk_level: str
    status: StatusName

    @classmethod
    def of(cls, case: Case) -> CaseSummary:
        return cls.model_validate(case, from_attributes=True)


class CasesPage(BaseModel):
    items: list[CaseSummary]
    total: int = Field(description="Cases matching the filters, over all pages.")
    limit: int
    offset: int


class CaseUpdate(PartialUpdate):
    """The clinician review."""

    status: StatusName | None = None
    confirmed_diagnosis: str | None = Field(None, max_length=255)
    review_notes: str | None = Field(None, max_length=10_000)


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
