"""Cases: create with patient fields and images, list with filters, read, review, delete."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image as PILImage
from pydantic import EmailStr
from sqlalchemy import func
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from oncolens.analysis import DISCLAIMER, Explanation, RawImage, explanation, prepare
from oncolens.api.deps import (
    CurrentUser,
    Offset,
    SessionDep,
    SettingsDep,
    StoreDep,
    WriterUser,
    ZooDep,
    batcher_for,
    client_of,
)
from oncolens.api.errors import BadRequest
from oncolens.api.records import CasePublic, CasesPage, CaseSummary, CaseUpdate, StatusName
from oncolens.api.uploads import run_case
from oncolens.cases import CaseStore, PatientFields, UploadedImage, audit, create_case, delete_case
from oncolens.config import Settings
from oncolens.db.models import Case, CaseImage, Role, User, utcnow
from oncolens.explain import display_image
from oncolens.imaging import decode_image
from oncolens.zoo import ModelNotFound, ModelPackage, Zoo
from oncolens.zoo.preprocess import preprocess

router = APIRouter(prefix="/cases", tags=["cases"])

Sex = Literal["female", "male", "other", "unknown", ""]


def visible(query: SelectOfScalar[Case], user: User) -> SelectOfScalar[Case]:
    """Clinicians see their own cases; admins and viewers see all."""
    return query.where(Case.owner_id == user.id) if user.role == Role.clinician else query


def load_case(session: Session, case_id: str, user: User) -> Case:
    """The case if this user may see it; another clinician's case is reported as not found."""
    case = session.get(Case, case_id)
    if case is None or (user.role == Role.clinician and case.owner_id != user.id):
        raise BadRequest(f"no case {case_id}", status=404)
    return case


def images_of(session: Session, case: Case) -> list[CaseImage]:
    return list(session.exec(select(CaseImage).where(CaseImage.case_id == case.id)))


@router.post("", response_model=CasePublic, status_code=201)
async def create(
    request: Request,
    user: WriterUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    zoo: ZooDep,
    model_id: Annotated[str, Form(description="The model to run, e.g. skin-ham10000.")],
    files: Annotated[list[UploadFile], File(description="1..N images of the case.")],
    patient_ref: Annotated[str, Form(max_length=128, description="Pseudonymous patient reference.")] = "",
    patient_name: Annotated[str, Form(max_length=255)] = "",
    patient_age: Annotated[int | None, Form(ge=0, le=130)] = None,
    patient_sex: Annotated[Sex, Form()] = "",
    patient_email: Annotated[EmailStr | None, Form()] = None,
    clinical_notes: Annotated[str, Form(max_length=10_000)] = "",
) -> CasePublic:
    """Analyse the images with the model and store the case (images, per-image and case results)."""
    if not patient_ref.strip() and not patient_name.strip():
        raise BadRequest("a case needs a patient reference (patient_ref) or a patient name (patient_name)")
    if len(files) > settings.max_images_per_request:
        raise BadRequest(f"{len(files)} images sent; at most {settings.max_images_per_request} per case", status=413)
    model = zoo.get(model_id)
    raw = [RawImage(await f.read(settings.max_image_bytes + 1), f.filename) for f in files]
    patient = PatientFields(
        patient_ref=patient_ref.strip(),
        patient_name=patient_name.strip(),
        patient_age=patient_age,
        patient_sex=patient_sex,
        patient_email=str(patient_email or ""),
        clinical_notes=clinical_notes,
    )
    case = await analyse_and_store(request, user, session, store, model, raw, patient)
    return CasePublic.of(case, images_of(session, case), DISCLAIMER)


async def analyse_and_store(
    request: Request,
    user: User,
    session: Session,
    store: CaseStore,
    model: ModelPackage,
    raw: list[RawImage],
    patient: PatientFields,
) -> Case:
    """Run the model on a case's images and store the case atomically (images, results, audit)."""
    settings: Settings = request.app.state.settings
    prepared = await anyio.to_thread.run_sync(prepare, raw, model, settings)
    result, _ = await run_case(model, batcher_for(request, model), prepared)
    uploads = [UploadedImage(r.data, d, r.filename) for r, d in zip(raw, prepared.decoded, strict=True)]
    return await anyio.to_thread.run_sync(
        lambda: create_case(session, store, user, result, uploads, patient, client_of(request))
    )


def filtered_cases(
    user: User,
    model_id: str | None = None,
    risk_level: str | None = None,
    status: str | None = None,
    patient_ref: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
) -> SelectOfScalar[Case]:
    """The select() of the cases ``user`` may see, narrowed by the given filters (API and web)."""
    query = visible(select(Case), user)
    if model_id:
        query = query.where(Case.model_id == model_id)
    if risk_level:
        query = query.where(Case.risk_level == risk_level)
    if status:
        query = query.where(Case.status == status)
    if patient_ref:
        query = query.where(Case.patient_ref == patient_ref)
    if created_from:
        query = query.where(col(Case.created_at) >= created_from)
    if created_to:
        query = query.where(col(Case.created_at) < created_to)
    return query


@router.get("", response_model=CasesPage)
def list_cases(
    user: CurrentUser,
    session: SessionDep,
    model_id: str | None = None,
    risk_level: str | None = None,
    status: StatusName | None = None,
    patient_ref: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Offset = 0,
) -> CasesPage:
    """Cases you may see, newest first, filtered; ``total`` counts all pages."""
    query = filtered_cases(user, model_id, risk_level, status, patient_ref, created_from, created_to)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(Case.created_at).desc(), col(Case.id)).offset(offset).limit(limit)).all()
    return CasesPage(items=[CaseSummary.of(c) for c in rows], total=total, limit=limit, offset=offset)


@router.get("/{case_id}", response_model=CasePublic)
def read_case(request: Request, case_id: str, user: CurrentUser, session: SessionDep) -> CasePublic:
    case = load_case(session, case_id, user)
    audit(session, user, "view", case.id, client=client_of(request))
    session.commit()
    return CasePublic.of(case, images_of(session, case), DISCLAIMER)


@router.patch("/{case_id}", response_model=CasePublic)
def review_case(request: Request, case_id: str, body: CaseUpdate, user: WriterUser, session: SessionDep) -> CasePublic:
    """The clinician review: status, confirmed diagnosis and notes."""
    case = load_case(session, case_id, user)
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise BadRequest("nothing to update: send status, confirmed_diagnosis or review_notes")
    record_review(session, case, user, changes, client_of(request))
    return CasePublic.of(case, images_of(session, case), DISCLAIMER)


def record_review(
    session: Session, case: Case, user: User, changes: dict[str, Any], client: str, channel: str = ""
) -> None:
    """Apply a clinician review (status, confirmed_diagnosis, review_notes), stamp who and when, audit."""
    for field, value in changes.items():
        setattr(case, field, value)
    case.reviewed_by, case.reviewed_at = user.id, utcnow()
    case.updated_at = case.reviewed_at
    prefix = f"{channel}: " if channel else ""
    audit(session, user, "review", case.id, f"{prefix}{sorted(changes)} -> status {case.status}", client)
    session.add(case)
    session.commit()


@router.delete("/{case_id}", status_code=204)
def remove_case(request: Request, case_id: str, user: WriterUser, session: SessionDep, store: StoreDep) -> Response:
    """Delete the case, its results and its stored image files."""
    delete_case(session, store, load_case(session, case_id, user), user, client_of(request))
    return Response(status_code=204)


@router.get("/{case_id}/images/{image_id}", response_class=FileResponse)
def read_image(
    request: Request, case_id: str, image_id: str, user: CurrentUser, session: SessionDep, store: StoreDep
) -> FileResponse:
    """The original image file, only to those allowed to see the case."""
    case = load_case(session, case_id, user)
    image = case_image_of(session, case, image_id)
    response = image_file(store, image)
    audit(session, user, "image_view", case.id, image.id, client_of(request))
    session.commit()
    return response


def case_image_of(session: Session, case: Case, image_id: str) -> CaseImage:
    """One image row of ``case`` (404 when the id belongs to no image of that case)."""
    image = session.get(CaseImage, image_id)
    if image is None or image.case_id != case.id:
        raise BadRequest(f"case {case.id} has no image {image_id}", status=404)
    return image


def image_file(store: CaseStore, image: CaseImage) -> FileResponse:
    """The stored original file, never cached by shared caches (410 when storage lost it)."""
    path = store.path(image.stored_name)
    if not path.is_file():
        raise BadRequest(f"the file of image {image.id} is missing from storage", status=410)
    return FileResponse(path, media_type=image.media_type, headers={"Cache-Control": "private, no-store"})


@router.get(
    "/{case_id}/report.pdf",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}, "description": "The case report as PDF."}},
)
async def case_report(
    request: Request,
    case_id: str,
    user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    zoo: ZooDep,
    settings: SettingsDep,
) -> Response:
    """The PDF case report: patient, model, images with heat-maps, result, review, model metrics."""
    return await report_download(request, session, store, zoo, settings, user, case_id)


@router.get("/{case_id}/fhir", summary="The case as a FHIR R4 Bundle")
def case_fhir(request: Request, case_id: str, user: CurrentUser, session: SessionDep, zoo: ZooDep) -> JSONResponse:
    """DiagnosticReport, Observations (class probabilities, P(malignant), risk level), Patient and Media."""
    case = load_case(session, case_id, user)
    public = CasePublic.of(case, images_of(session, case), DISCLAIMER)
    model = installed_model(zoo, case.model_id)
    from oncolens.reports.fhir import case_bundle

    bundle = case_bundle(public, model.card if model is not None else None, str(request.base_url))
    audit(session, user, "fhir_export", case.id, client=client_of(request))
    session.commit()
    return JSONResponse(bundle, media_type="application/fhir+json")


def stored_explanation(
    store: CaseStore, model: ModelPackage | None, case: Case, image: CaseImage, settings: Settings
) -> tuple[PILImage.Image, Explanation | None] | None:
    """A stored image and its heat-map (None when the case's model version is not installed).

    None when the file is gone. The heat-map is recomputed from the stored image, which gives the
    analysis's own result as long as the same model version is installed.
    """
    path = store.path(image.stored_name)
    if not path.is_file():
        return None
    full = decode_image(path.read_bytes(), settings.max_image_bytes, settings.max_image_pixels)
    shown = display_image(full.image)
    if model is None or model.version != case.model_version:
        return shown, None
    inputs = preprocess([full.image], model.input_spec)
    del full  # only the display copy is kept from here on
    _, features = model.run(inputs, with_features=True)
    if features is None:
        return shown, None
    return shown, explanation(model, shown, features[0], original_size=(image.width, image.height))


def installed_model(zoo: Zoo, model_id: str) -> ModelPackage | None:
    try:
        return zoo.get(model_id)
    except ModelNotFound:
        return None


def case_report_pdf(session: Session, store: CaseStore, zoo: Zoo, settings: Settings, case: Case) -> bytes:
    """The PDF report of a case (API and web page share it)."""
    from oncolens.reports.pdf import ReportImage, build_case_pdf  # reportlab only when a report is made

    rows = sorted(images_of(session, case), key=lambda i: i.position)
    public = CasePublic.of(case, rows, DISCLAIMER)
    reviewer = session.get(User, case.reviewed_by) if case.reviewed_by is not None else None
    model = installed_model(zoo, case.model_id)
    pictures, missing, no_heatmap = [], 0, False
    for row, shown in zip(rows, public.images, strict=True):
        found = stored_explanation(store, model, case, row, settings)
        if found is None:
            missing += 1
            continue
        image, ex = found
        no_heatmap = no_heatmap or ex is None
        overlay = PILImage.open(io.BytesIO(ex.overlay_png)) if ex is not None else None
        pictures.append(ReportImage(row.original_filename, image, overlay, shown.result))
    notes = []
    if no_heatmap:
        notes.append(
            f"Heat-maps omitted: the case was analysed with {case.model_id} v{case.model_version}, "
            "which is not the installed version."
        )
    if missing:
        notes.append(f"{missing} image file(s) are missing from storage.")
    return build_case_pdf(
        public,
        pictures,
        model.card if model is not None else None,
        settings.clinic_name,
        reviewer=(reviewer.full_name or reviewer.email) if reviewer is not None else None,
        note=" ".join(notes) or None,
    )


async def report_download(
    request: Request,
    session: Session,
    store: CaseStore,
    zoo: Zoo,
    settings: Settings,
    user: User,
    case_id: str,
    detail: str = "",
) -> Response:
    """The case's PDF as a download, audited (the API route and the web page share it)."""
    case = load_case(session, case_id, user)
    pdf = await anyio.to_thread.run_sync(case_report_pdf, session, store, zoo, settings, case)
    audit(session, user, "report", case.id, detail, client_of(request))
    session.commit()
    headers = {
        "Content-Disposition": f'attachment; filename="oncolens-case-{case.id}.pdf"',
        "Cache-Control": "private, no-store",
    }
    return Response(pdf, media_type="application/pdf", headers=headers)
