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
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from oncolens.api.compat.common import model_for, uploaded_files
from oncolens.errors import InvalidInput
from oncolens.http.deps import DB_INT_MAX, ActorDep, CasesDep, batcher_for, recorder
from oncolens.services.audit import Actor
from oncolens.services.cases import CaseFilters, CaseService
from oncolens.services.inputs import AGE_MAX, DIAGNOSIS_MAX, EMAIL_MAX, NAME_MAX
from oncolens.store.db.models import Case, CaseStatus
from oncolens.store.views import UTCDateTime

APP = "oral"
router = APIRouter(prefix="/api/v1/result/results", tags=["compat: oral app"])

CANCER, NON_CANCER = "cancer", "non_cancer"
LABELS = {CANCER: "CANCER", NON_CANCER: "NON CANCER"}
# The app's gender values -> the sex OncoLens records; anything else is checked as a sex.
SEX_ALIASES = {"m": "male", "f": "female"}


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
    """The app's PUT body; the values are checked by the case service like any patient input."""

    name: str | None = Field(None, max_length=NAME_MAX)
    email: str | None = Field(None, max_length=EMAIL_MAX, description="An e-mail address, or empty.")
    age: int | None = Field(None, ge=0, le=AGE_MAX)
    gender: str | None = Field(None, max_length=16, description="Male, Female or Other (M, F too).")
    result: str | None = Field(None, max_length=DIAGNOSIS_MAX, description="The clinician's confirmed result.")


def _sex(value: str) -> str:
    text = value.strip().lower()
    return SEX_ALIASES.get(text, text)


def _read(cases: CaseService, case: Case) -> ResultRead:
    aggregate = json.loads(case.result_json)
    called = CANCER if aggregate.get("is_malignant", case.top_class == CANCER) else NON_CANCER
    return ResultRead(
        id=case.id,
        user_id=case.owner_id,
        # The app's CANCER / NON CANCER is the model's malignant call, a risk level border, so it never
        # disagrees with the risk level; its confidence is that answer's own probability. Out of domain:
        # the model gives no answer the app could show.
        result="INDETERMINATE" if case.risk_level == "indeterminate" else LABELS[called],
        confidence=round(aggregate["probabilities"][called] * 100, 2),
        images=[f"/api/v1/cases/{case.id}/images/{image.id}" for image in cases.images_of(case)],
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
            "note": aggregate.get("note", ""),
        },
    )


def _oral(actor: Actor) -> Actor:
    return replace(actor, channel="oral app")


@router.post("/", response_model=ResultRead, summary="Oral app: upload photos, predict and store the result")
async def create_result(request: Request, actor: ActorDep, cases: CasesDep) -> ResultRead:
    model = model_for(request, APP)
    raw, form = await uploaded_files(request, ("files", "file"))
    if not form.get("name", "").strip():
        raise InvalidInput("form field 'name' (the patient's name) is required")
    patient = {
        "patient_name": form.get("name", ""),
        "patient_age": form.get("age", ""),
        "patient_sex": _sex(form.get("gender", "")),
        "patient_email": form.get("email", ""),
    }
    batcher = batcher_for(request, model)
    case = await cases.create(_oral(actor), model, raw, patient, batcher, recorder(batcher))
    return _read(cases, case)


@router.get("/", response_model=list[ResultRead], summary="Oral app: list results, newest first")
def list_results(
    request: Request,
    actor: ActorDep,
    cases: CasesDep,
    skip: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[ResultRead]:
    rows, _ = cases.page(actor.user, CaseFilters(model_id=model_for(request, APP).id), limit, skip)
    return [_read(cases, case) for case in rows]


@router.get("/{result_id}", response_model=ResultRead, summary="Oral app: one result")
def read_result(request: Request, result_id: str, actor: ActorDep, cases: CasesDep) -> ResultRead:
    return _read(cases, cases.get(_oral(actor), result_id, model_for(request, APP).id))


@router.put("/{result_id}", response_model=ResultRead, summary="Oral app: update a result's patient fields")
def update_result(request: Request, result_id: str, body: ResultUpdate, actor: ActorDep, cases: CasesDep) -> ResultRead:
    model_id = model_for(request, APP).id
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise InvalidInput("nothing to update: send name, email, age, gender or result")
    names = {"name": "patient_name", "email": "patient_email", "age": "patient_age", "gender": "patient_sex"}
    patient = {names[k]: v for k, v in changes.items() if k in names}
    if "patient_sex" in patient:
        patient["patient_sex"] = _sex(patient["patient_sex"] or "")
    if "name" in changes and not (body.name or "").strip():
        raise InvalidInput("name cannot be empty")
    case = cases.update_patient(_oral(actor), result_id, patient, model_id) if patient else None
    if "result" in changes:
        review = {"confirmed_diagnosis": (body.result or "").strip(), "status": CaseStatus.reviewed.value}
        case = cases.review(_oral(actor), result_id, review, model_id)
    assert case is not None  # changes is not empty, so one of the two ran
    return _read(cases, case)


@router.delete("/{result_id}", summary="Oral app: delete a result and its images")
def delete_result(request: Request, result_id: str, actor: ActorDep, cases: CasesDep) -> dict[str, Any]:
    cases.delete(_oral(actor), result_id, model_for(request, APP).id)
    return {"ok": True, "id": result_id}
