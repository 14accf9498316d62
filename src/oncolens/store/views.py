"""How a stored case reads: the one shape that the API, the web pages, the compat routes and the
PDF and FHIR builders all start from (a core module: it imports no edge)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from oncolens.decision import Assessment, statement_of
from oncolens.store.db.models import Case, CaseImage
from oncolens.zoo.card import RiskLevel

StatusName = Literal["pending_review", "reviewed", "confirmed"]
ReferenceStandardName = Literal["histopathology", "cytology", "clinical_follow_up", "expert_consensus"]
EXAMPLE_PROBS = {"akiec": 0.02, "bcc": 0.03, "bkl": 0.05, "df": 0.01, "mel": 0.71, "nv": 0.17, "vasc": 0.01}


def as_utc(moment: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back without a zone, so the zone is put back."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# A time as the API shows it: always with its zone (RFC 3339, e.g. 2026-11-23T18:04:05.123456Z).
UTCDateTime = Annotated[datetime, AfterValidator(as_utc)]


class DomainPublic(BaseModel):
    in_domain: bool = Field(description="False: the image is unlike the model's training images; no risk level.")
    score: float = Field(description="Squared Mahalanobis distance of the image's features / feature count.")
    threshold: float = Field(description="Scores above it are out of domain (chosen on val: 95% of val pass).")
    reason: str = Field(
        "",
        description="Out of domain only: 'other_kind' (another kind of image: choose the model for it) or "
        "'unusual' (an unusual image of the model's kind: retake it, or judge it clinically).",
    )


class AlsoConsiderPublic(BaseModel):
    class_id: str = Field(examples=["mel"])
    name: str = Field(examples=["Melanoma"])
    probability: float = Field(description="Its calibrated probability (lower than the named class's).")
    reason: str = Field(examples=["rare classes weighted up"])


class QualityPublic(BaseModel):
    code: str = Field(examples=["blurred"])
    message: str


class AssessmentPublic(BaseModel):
    top_class: str = Field(
        description="The named class: always the class with the highest calibrated probability in "
        "'probabilities'. On an indeterminate result it is not shown as an answer.",
        examples=["mel"],
    )
    top_class_name: str = Field(examples=["Melanoma"])
    confidence: float = Field(description="Calibrated probability of the named class.", examples=[0.71])
    probabilities: dict[str, float] = Field(
        description="Calibrated probability of every class (sums to 1).", examples=[EXAMPLE_PROBS]
    )
    p_malignant: float = Field(description="Sum of the malignant classes' probabilities.", examples=[0.76])
    is_malignant: bool = Field(description="P(malignant) at or above the model's threshold.", examples=[True])
    risk_level: RiskLevel = Field(examples=["high"])
    recommendation: str = Field(examples=["High risk. Prompt specialist referral is recommended."])
    domain: DomainPublic | None = Field(
        None, description="Out-of-domain check of one image (null on a case's combined result, or a model without one)."
    )
    quality: list[QualityPublic] = Field(default_factory=list, description="Image-quality warnings of one image.")
    note: str = Field("", description="On a combined result: which images were left out as out of domain.")
    also_consider: AlsoConsiderPublic | None = Field(
        None,
        description="The class of the card's rebalanced rule (rare classes weighted up), where it is not the "
        "named class; never the most likely class.",
    )
    statement: str = Field(
        "",
        description="The result in one statement: risk level, recommendation, named class; or, when "
        "indeterminate, the advice alone. Web page, PDF, FHIR, CLI and batch repeat it verbatim.",
        examples=[
            "Risk level high: High risk. Prompt specialist referral is recommended. Most likely class: "
            "Melanoma (71.0%); P(malignant) 0.76."
        ],
    )

    @model_validator(mode="after")
    def _stated(self) -> AssessmentPublic:
        """A result stored before results carried their statement gets it composed from what it stored
        (the class and level it stated then)."""
        if not self.statement:
            fields = self.model_dump(exclude={"also_consider", "statement"})
            fields["also_consider"] = self.also_consider.model_dump() if self.also_consider else None
            self.statement = statement_of(Assessment(**fields))
        return self

    @classmethod
    def from_assessment(cls, assessment: Assessment) -> AssessmentPublic:
        return cls(**assessment.to_dict())

    @classmethod
    def stored(cls, text: str) -> AssessmentPublic:
        """A result as stored with its case (as JSON)."""
        return cls(**json.loads(text))


class PatientPublic(BaseModel):
    ref: str
    name: str
    age: int | None
    sex: str
    email: str
    clinical_notes: str


REFERENCE_CLASS = (
    "The reference diagnosis as one of the model's class ids (what monitoring and site adaptation measure against)."
)
REFERENCE_STANDARD = "How the reference class was established."
REFERENCE_DATE = "When the reference was established (the review's date if not given)."


class ReviewPublic(BaseModel):
    status: StatusName
    confirmed_diagnosis: str
    notes: str
    reviewed_by: int | None
    reviewed_at: UTCDateTime | None
    reference_class: str | None = Field(None, description=REFERENCE_CLASS)
    reference_standard: ReferenceStandardName | None = Field(None, description=REFERENCE_STANDARD)
    reference_date: date | None = Field(None, description=REFERENCE_DATE)


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
    status: StatusName = Field(description="The review status (as in 'review').")
    reference_class: str | None = Field(None, description=REFERENCE_CLASS)
    reference_standard: ReferenceStandardName | None = Field(None, description=REFERENCE_STANDARD)
    reference_date: date | None = Field(None, description=REFERENCE_DATE)
    dicom_study_uid: str | None = Field(
        None, description="The DICOM study the case was made from by the DICOM listener (null for uploads)."
    )
    patient: PatientPublic
    result: AssessmentPublic
    aggregation_rule: str
    review: ReviewPublic
    images: list[CaseImagePublic]
    disclaimer: str

    @model_validator(mode="before")
    @classmethod
    def _status_of_review(cls, data: Any) -> Any:
        """``status`` (top level) is the review's status: given only the review, it is taken from it."""
        if isinstance(data, dict) and "status" not in data and data.get("review") is not None:
            review = data["review"]
            data = data | {"status": review.status if isinstance(review, ReviewPublic) else review.get("status")}
        return data

    @classmethod
    def of(cls, case: Case, images: list[CaseImage], disclaimer: str) -> CasePublic:
        reference = {
            "reference_class": case.reference_class,
            "reference_standard": case.reference_standard,
            "reference_date": case.reference_date,
        }
        return cls(
            id=case.id,
            owner_id=case.owner_id,
            model_id=case.model_id,
            model_version=case.model_version,
            created_at=case.created_at,
            updated_at=case.updated_at,
            status=case.status,
            **reference,
            dicom_study_uid=case.dicom_study_uid,
            patient=PatientPublic(
                ref=case.patient_ref,
                name=case.patient_name,
                age=case.patient_age,
                sex=case.patient_sex,
                email=case.patient_email,
                clinical_notes=case.clinical_notes,
            ),
            result=AssessmentPublic.stored(case.result_json),
            aggregation_rule=case.aggregation_rule,
            review=ReviewPublic(
                status=case.status,
                confirmed_diagnosis=case.confirmed_diagnosis,
                notes=case.review_notes,
                reviewed_by=case.reviewed_by,
                reviewed_at=case.reviewed_at,
                **reference,
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
                    result=AssessmentPublic.stored(image.result_json),
                )
                for image in sorted(images, key=lambda i: i.position)
            ],
            disclaimer=disclaimer,
        )
