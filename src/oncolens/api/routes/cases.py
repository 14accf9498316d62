"""Cases: create with patient fields and images, list with filters, read, review, delete.

The routes translate HTTP into calls of the case service and its results into the API's shapes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import anyio
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from oncolens.api.records import CasePublic, CasesPage, CaseSummary, CaseUpdate, StatusName
from oncolens.errors import InvalidInput
from oncolens.http.deps import (
    ActorDep,
    CasesDep,
    Cursor,
    Offset,
    SettingsDep,
    ZooDep,
    batcher_for,
    public_base,
    recorder,
)
from oncolens.http.responses import file_response, pdf_response
from oncolens.http.uploads import raw_images
from oncolens.services.cases import CaseFilters, next_case_cursor
from oncolens.services.inputs import Sex
from oncolens.zoo.card import RiskLevel

router = APIRouter(prefix="/cases", tags=["cases"])


@router.post("", response_model=CasePublic, status_code=201)
async def create(
    request: Request,
    actor: ActorDep,
    cases: CasesDep,
    settings: SettingsDep,
    zoo: ZooDep,
    model_id: Annotated[str, Form(description="The model to run, e.g. skin-ham10000.")],
    files: Annotated[list[UploadFile], File(description="1..N images of the case.")],
    patient_ref: Annotated[str, Form(description="Pseudonymous patient reference (at most 128 characters).")] = "",
    patient_name: Annotated[str, Form(description="At most 255 characters.")] = "",
    patient_age: Annotated[int | None, Form(description="Whole years, 0 to 130.")] = None,
    patient_sex: Annotated[Sex, Form()] = Sex.unknown_blank,
    patient_email: Annotated[str, Form(description="An e-mail address, or empty.")] = "",
    clinical_notes: Annotated[str, Form(description="At most 10,000 characters.")] = "",
) -> CasePublic:
    """Analyse the images with the model and store the case (images, per-image and case results).

    The patient fields are checked against the limits of the database (422 naming each field).
    """
    patient = {
        "patient_ref": patient_ref,
        "patient_name": patient_name,
        "patient_age": patient_age,
        "patient_sex": patient_sex,
        "patient_email": patient_email,
        "clinical_notes": clinical_notes,
    }
    model = zoo.get(model_id)
    batcher = batcher_for(request, model)
    raw = await raw_images(files, settings)
    case = await cases.create(actor, model, raw, patient, batcher, recorder(batcher))
    return cases.view(case)


@router.get("", response_model=CasesPage)
def list_cases(
    actor: ActorDep,
    cases: CasesDep,
    model_id: str | None = None,
    risk_level: RiskLevel | None = None,
    status: StatusName | None = None,
    patient_ref: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Offset = 0,
    cursor: Cursor = None,
) -> CasesPage:
    """Cases you may see, newest first, filtered; ``total`` counts all pages. Page with ``cursor`` (the
    ``next_cursor`` of the page before): each page costs the same however deep, and cases added meanwhile
    neither repeat nor hide older ones; ``offset`` still works (each page then costs more the deeper it is)."""
    filters = CaseFilters(model_id, risk_level, status, patient_ref, created_from, created_to)
    if cursor is not None and offset:
        raise InvalidInput("send cursor or offset, not both")
    if cursor is not None or offset == 0:
        rows, total, following = cases.page_after(actor.user, filters, limit, cursor)
    else:
        rows, total = cases.page(actor.user, filters, limit, offset)
        following = next_case_cursor(rows[-1]) if rows and offset + len(rows) < total else None
    items = [CaseSummary.of(c) for c in rows]
    source = "maintained" if cases.total_is_maintained(actor.user, filters) else "counted"
    return CasesPage(items=items, total=total, total_source=source, limit=limit, offset=offset, next_cursor=following)


@router.get("/{case_id}", response_model=CasePublic)
def read_case(case_id: str, actor: ActorDep, cases: CasesDep) -> CasePublic:
    return cases.view(cases.get(actor, case_id))


@router.patch("/{case_id}", response_model=CasePublic)
def review_case(case_id: str, body: CaseUpdate, actor: ActorDep, cases: CasesDep) -> CasePublic:
    """The clinician review: status, confirmed diagnosis and notes."""
    return cases.view(cases.review(actor, case_id, body.model_dump(exclude_unset=True)))


@router.delete("/{case_id}", status_code=204)
def remove_case(case_id: str, actor: ActorDep, cases: CasesDep) -> Response:
    """Delete the case, its results and its stored image files."""
    cases.delete(actor, case_id)
    return Response(status_code=204)


@router.get("/{case_id}/images/{image_id}", response_class=FileResponse)
def read_image(case_id: str, image_id: str, actor: ActorDep, cases: CasesDep) -> Response:
    """The original image file, only to those allowed to see the case (410 when storage lost it)."""
    return file_response(cases.open_image(actor, case_id, image_id))


@router.get(
    "/{case_id}/report.pdf",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}, "description": "The case report as PDF."}},
)
async def case_report(case_id: str, actor: ActorDep, cases: CasesDep) -> Response:
    """The PDF case report: patient, model, images with heat-maps, result, review, model metrics."""
    return pdf_response(await anyio.to_thread.run_sync(cases.report_pdf, actor, case_id), case_id)


@router.get(
    "/{case_id}/dicom-sr",
    summary="The case as a DICOM Structured Report (TID 1500)",
    response_class=Response,
    responses={200: {"content": {"application/dicom": {}}, "description": "A Comprehensive 3D SR, Part 10 file."}},
)
async def case_dicom_sr(case_id: str, actor: ActorDep, cases: CasesDep) -> Response:
    """The case's answer as a DICOM Comprehensive 3D SR following TID 1500: the model as algorithm and
    device observer (id and version), per image P(malignant), the risk level, the named class as the
    finding, in-domain and quality notes, and a reference to the source instance. It joins the study of
    the case's DICOM images; a case made from photos gets a study of its own (its UID from the case id)."""
    data = await anyio.to_thread.run_sync(cases.dicom_sr, actor, case_id)
    disposition = f'attachment; filename="oncolens-{case_id}-sr.dcm"'
    return Response(data, media_type="application/dicom", headers={"Content-Disposition": disposition})


@router.get("/{case_id}/fhir", summary="The case as a FHIR R4 Bundle")
def case_fhir(request: Request, case_id: str, actor: ActorDep, cases: CasesDep) -> JSONResponse:
    """DiagnosticReport, Observations (class probabilities, P(malignant), risk level), Patient and Media."""
    bundle = cases.fhir_bundle(actor, case_id, public_base(request))
    return JSONResponse(bundle, media_type="application/fhir+json")
