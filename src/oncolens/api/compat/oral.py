"""The oral app (FastAPI + SQLModel): results stored per upload, with list / get / update / delete.

``POST /api/v1/result/results/`` takes the form fields ``email``, ``name``, ``age``, ``gender`` and one
or more ``files``; it runs ``oral-photo`` and stores an OncoLens case (so it shows up in the case
list, the audit trail and reports). Results read back in the app's shape: ``result`` is "CANCER" or
"NON CANCER", ``confidence`` a percentage, ``images`` the URLs of the stored images. Where the app
took a majority vote over images, OncoLens aggregates by the model card's rule (the highest
P(cancer) over the images: one suspicious photo is enough to flag the case), and ``confidence`` is
the calibrated probability of the reported result. Authentication is OncoLens's (Bearer token):
clinicians and admins create, update and delete; viewers read.

``PUT`` updates the patient fields; a ``result`` sent there is recorded as the clinician's
confirmed diagnosis and marks the case reviewed; the model's own output is never overwritten.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, EmailStr, Field
from sqlmodel import Session, col, select

from oncolens.api.compat.common import model_for, uploaded_files
from oncolens.api.deps import DB_INT_MAX, CurrentUser, SessionDep, StoreDep, WriterUser, client_of
from oncolens.api.errors import BadRequest
from oncolens.api.records import UTCDateTime
from oncolens.api.routes.cases import analyse_and_store, images_of, load_case, record_review, visible
from oncolens.cases import PatientFields, audit, delete_case
from oncolens.db.models import Case, CaseStatus, utcnow

APP = "oral"
router = APIRouter(prefix="/api/v1/result/results", tags=["compat: oral app"])

LABELS = {"cancer": "CANCER", "non_cancer": "NON CANCER"}
SEXES = {"male": "male", "m": "male", "female": "female", "f": "female", "other": "other", "": ""}


class ResultRead(BaseModel):
    id: str
    user_id: int
    result: str | None = Field(examples=["CANCER"])
    confidence: float | None = Field(description="Calibrated probability of the result, in percent.", examples=[93.22])
    images: list[str]
    created_by: int | None
    date: UTCDateTime
    oncolens: dict[str, Any]


class ResultUpdate(BaseModel):
    name: str | None = Field(None, max_length=255)
    email: EmailStr | None = None
    age: int | None = Field(None, ge=0, le=130)
    gender: str | None = Field(None, max_length=16)
    result: str | None = Field(None, max_length=255, description="The clinician's confirmed result.")


def _sex(value: str) -> str:
    try:
        return SEXES[value.strip().lower()]
    except KeyError:
        raise BadRequest(f"gender {value!r} is not one of Male, Female, Other") from None


def _read(session: Session, case: Case) -> ResultRead:
    aggregate = json.loads(case.result_json)
    return ResultRead(
        id=case.id,
        user_id=case.owner_id,
        result=LABELS.get(case.top_class, case.top_class),
        confidence=round(aggregate["probabilities"][case.top_class] * 100, 2),
        images=[f"/api/v1/cases/{case.id}/images/{image.id}" for image in images_of(session, case)],
        created_by=case.owner_id,
        date=case.created_at,
        oncolens={
            "case_id": case.id,
            "model_id": case.model_id,
            "model_version": case.model_version,
            "p_malignant": case.p_malignant,
            "risk_level": case.risk_level,
            "recommendation": case.recommendation,
            "status": case.status,
            "confirmed_result": case.confirmed_diagnosis or None,
        },
    )


def _oral_case(session: Session, result_id: str, user: Any, model_id: str) -> Case:
    case = load_case(session, result_id, user)
    if case.model_id != model_id:
        raise BadRequest(f"no result {result_id}", status=404)
    return case


@router.post("/", response_model=ResultRead, summary="Oral app: upload photos, predict and store the result")
async def create_result(request: Request, user: WriterUser, session: SessionDep, store: StoreDep) -> ResultRead:
    model = model_for(request, APP)
    raw, form = await uploaded_files(request, ("files", "file"))
    name, email = form.get("name", "").strip(), form.get("email", "").strip()
    if not name:
        raise BadRequest("form field 'name' (the patient's name) is required")
    age_text = form.get("age", "").strip()
    if age_text and not (age_text.isdigit() and int(age_text) <= 130):
        raise BadRequest(f"age {age_text!r} is not a whole number of years between 0 and 130")
    if email:
        try:
            ResultUpdate(email=email)
        except ValueError as exc:
            raise BadRequest(f"email {email!r} is not a valid address") from exc
    patient = PatientFields(
        patient_name=name[:255],
        patient_age=int(age_text) if age_text else None,
        patient_sex=_sex(form.get("gender", "")),
        patient_email=email,
    )
    case = await analyse_and_store(request, user, session, store, model, raw, patient)
    return _read(session, case)


@router.get("/", response_model=list[ResultRead], summary="Oral app: list results, newest first")
def list_results(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    skip: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[ResultRead]:
    model_id = model_for(request, APP).id
    query = visible(select(Case), user).where(Case.model_id == model_id)
    rows = session.exec(query.order_by(col(Case.created_at).desc(), col(Case.id)).offset(skip).limit(limit)).all()
    return [_read(session, case) for case in rows]


@router.get("/{result_id}", response_model=ResultRead, summary="Oral app: one result")
def read_result(request: Request, result_id: str, user: CurrentUser, session: SessionDep) -> ResultRead:
    case = _oral_case(session, result_id, user, model_for(request, APP).id)
    audit(session, user, "view", case.id, client=client_of(request))
    session.commit()
    return _read(session, case)


@router.put("/{result_id}", response_model=ResultRead, summary="Oral app: update a result's patient fields")
def update_result(
    request: Request, result_id: str, body: ResultUpdate, user: WriterUser, session: SessionDep
) -> ResultRead:
    case = _oral_case(session, result_id, user, model_for(request, APP).id)
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise BadRequest("nothing to update: send name, email, age, gender or result")
    if "name" in changes:
        if not (body.name or "").strip():
            raise BadRequest("name cannot be empty")
        case.patient_name = (body.name or "").strip()
    if "email" in changes:
        case.patient_email = str(body.email or "")
    if "age" in changes:
        case.patient_age = body.age
    if "gender" in changes:
        case.patient_sex = _sex(body.gender or "")
    patient_changes = sorted(set(changes) - {"result"})
    if patient_changes:
        case.updated_at = utcnow()
        audit(session, user, "update", case.id, f"oral app PUT {patient_changes}", client_of(request))
        session.add(case)
        session.commit()
    if "result" in changes:
        review = {"confirmed_diagnosis": (body.result or "").strip(), "status": CaseStatus.reviewed.value}
        record_review(session, case, user, review, client_of(request), channel="oral app")
    return _read(session, case)


@router.delete("/{result_id}", summary="Oral app: delete a result and its images")
def delete_result(
    request: Request, result_id: str, user: WriterUser, session: SessionDep, store: StoreDep
) -> dict[str, Any]:
    case = _oral_case(session, result_id, user, model_for(request, APP).id)
    delete_case(session, store, case, user, client_of(request))
    return {"ok": True, "id": result_id}
