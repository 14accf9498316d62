"""What every edge sends into the services, validated once, with the database's own limits.

The API answers a violation with 422, the web form shows it as a message, the oral compat app in
its own error shape; nothing is cut short silently anywhere.
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from oncolens.errors import InvalidInput
from oncolens.store.views import REFERENCE_CLASS, REFERENCE_DATE, REFERENCE_STANDARD, ReferenceStandardName, StatusName

M = TypeVar("M", bound=BaseModel)

# The limits of the columns these fields are stored in (db/models.py, migration 0001).
PATIENT_REF_MAX = 128
NAME_MAX = 255
EMAIL_MAX = 255
NOTES_MAX = 10_000
DIAGNOSIS_MAX = 255
AGE_MAX = 130


class Sex(StrEnum):
    """A patient's sex as recorded; empty when not given."""

    unknown_blank = ""
    female = "female"
    male = "male"
    other = "other"
    unknown = "unknown"


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


class PatientInput(BaseModel):
    """The patient fields of a new case (API form, web form, oral compat app).

    Text is stripped of surrounding blanks; an empty age or e-mail means not given. A case needs a
    patient reference or a name.
    """

    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    patient_ref: str = Field("", max_length=PATIENT_REF_MAX, description="Pseudonymous patient reference.")
    patient_name: str = Field("", max_length=NAME_MAX)
    patient_age: int | None = Field(None, ge=0, le=AGE_MAX, description="Whole years.")
    patient_sex: Sex = Sex.unknown_blank
    patient_email: EmailStr | None = Field(None, max_length=EMAIL_MAX)
    clinical_notes: str = Field("", max_length=NOTES_MAX)

    @field_validator("patient_age", "patient_email", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("patient_sex", mode="before")
    @classmethod
    def _sex_lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _someone(self) -> PatientInput:
        if not self.patient_ref and not self.patient_name:
            raise ValueError("a case needs a patient reference (patient_ref) or a patient name (patient_name)")
        return self

    def columns(self) -> dict[str, Any]:
        """The values as the case table stores them (no e-mail is stored as "")."""
        return self.model_dump() | {"patient_sex": self.patient_sex.value, "patient_email": self.patient_email or ""}


class CaseReview(PartialUpdate):
    """The clinician review: a field left out keeps its value."""

    nullable = frozenset({"reference_class", "reference_standard", "reference_date"})

    status: StatusName | None = None
    confirmed_diagnosis: str | None = Field(None, max_length=DIAGNOSIS_MAX)
    review_notes: str | None = Field(None, max_length=NOTES_MAX)
    reference_class: str | None = Field(
        None, max_length=64, description=REFERENCE_CLASS + " Null clears the reference (with its standard and date)."
    )
    reference_standard: ReferenceStandardName | None = Field(None, description=REFERENCE_STANDARD)
    reference_date: date | None = Field(None, description=REFERENCE_DATE)


def problems(exc: ValidationError) -> str:
    """A validation error as one sentence: ``patient_age: Input should be ...; patient_ref: ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "the input is not valid"


def validated(model: type[M], values: dict[str, Any]) -> M:
    """``model`` built from ``values``, or InvalidInput naming every field that breaks a rule."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidInput(problems(exc)) from exc
