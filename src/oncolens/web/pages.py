"""The web app's pages: server-rendered (Jinja2) on top of the same database, zoo and predict path."""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import func
from sqlmodel import Session, col, select

from oncolens.analysis import DISCLAIMER, RawImage
from oncolens.api.deps import SessionDep, SettingsDep, StoreDep, ZooDep, client_of
from oncolens.api.errors import BadRequest
from oncolens.api.records import CasePublic, CaseUpdate
from oncolens.api.routes.auth import audited_login
from oncolens.api.routes.cases import (
    analyse_and_store,
    case_image_of,
    filtered_cases,
    image_file,
    images_of,
    installed_model,
    load_case,
    record_review,
    report_download,
    stored_explanation,
)
from oncolens.auth import AuthError, create_access_token
from oncolens.cases import BROWSER_IMAGE_TYPES, PatientFields, audit
from oncolens.config import Settings
from oncolens.db.models import AuditEvent, Case, CaseStatus, Role, User, utcnow
from oncolens.explain import display_image, png_bytes
from oncolens.imaging import ImageDecodeError, decode_image
from oncolens.web.session import (
    CsrfFailed,
    NotLoggedIn,
    check_csrf,
    csrf_token,
    end_session,
    remember_csrf,
    start_session,
    web_user,
)
from oncolens.zoo import ModelNotFound, Zoo

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)

RISK_LEVELS = ("low", "borderline", "moderate", "high")
STATUSES = [s.value for s in CaseStatus]
PAGE_SIZE = 20
SEXES = ("", "female", "male", "other", "unknown")


def user_dep(request: Request, session: SessionDep) -> User:
    return web_user(request, session)


WebUser = Annotated[User, Depends(user_dep)]


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    context |= {"csrf": csrf_token(request), "disclaimer": DISCLAIMER}
    response = templates.TemplateResponse(request, name, context, status_code=status)
    remember_csrf(request, response)
    return response


def model_groups(zoo: Zoo) -> list[tuple[str, list[dict[str, Any]]]]:
    """Installed models grouped by organ, each with what a clinician needs to pick it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for model_id in zoo.ids():
        try:
            card = zoo.get(model_id).card
        except Exception:  # a broken package is left out of the picker, not fatal to the page
            continue
        groups.setdefault(str(card.get("organ", "other")), []).append(
            {
                "id": model_id,
                "title": card.get("title", model_id),
                "modality": card.get("modality", ""),
                "use_for": card.get("use_for", ""),
                "version": card.get("version", ""),
            }
        )
    return sorted(groups.items())


def can_write(user: User) -> bool:
    return user.role in (Role.admin.value, Role.clinician.value)


# --- login / logout ------------------------------------------------------------------------------------


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this site only (never //other-host or a full URL)."""
    return target if target.startswith("/") and not target.startswith("//") else "/analyze"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/analyze") -> HTMLResponse:
    return render(request, "login.html", next=safe_next(next), error=None)


@router.post("/login", response_model=None)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    email: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/analyze",
) -> Response:
    check_csrf(request, csrf_token)
    target = safe_next(next)
    try:
        user = audited_login(session, settings, email, password, client_of(request), channel="web")
    except AuthError as exc:
        return render(request, "login.html", status=exc.status, next=target, error=str(exc), email=email)
    response = RedirectResponse(target, status_code=303)
    start_session(
        request,
        response,
        create_access_token(user, request.app.state.secret, settings.access_token_minutes),
        settings.access_token_minutes,
    )
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, csrf_token: Annotated[str, Form()] = "") -> RedirectResponse:
    check_csrf(request, csrf_token)
    response = RedirectResponse("/login", status_code=303)
    end_session(request, response, session)
    return response


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/analyze", status_code=303)


# --- analyze -------------------------------------------------------------------------------------------


def analyze_view(
    request: Request, user: User, zoo: Zoo, chosen: str, status: int = 200, **context: Any
) -> HTMLResponse:
    """The analyze page: the form (with ``form`` values and an ``error``) or a ``case`` result."""
    context = {"form": {}, "error": None, "case": None} | context
    return render(request, "analyze.html", status=status, user=user, groups=model_groups(zoo), chosen=chosen, **context)


@router.get("/analyze", response_class=HTMLResponse)
def analyze_page(request: Request, user: WebUser, zoo: ZooDep, model: str = "") -> HTMLResponse:
    return analyze_view(request, user, zoo, model)


@router.post("/analyze", response_class=HTMLResponse)
async def analyze(
    request: Request,
    user: WebUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    zoo: ZooDep,
    model_id: Annotated[str, Form()] = "",
    files: Annotated[list[UploadFile] | None, Form()] = None,
    patient_ref: Annotated[str, Form()] = "",
    patient_name: Annotated[str, Form()] = "",
    patient_age: Annotated[str, Form()] = "",
    patient_sex: Annotated[str, Form()] = "",
    clinical_notes: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_csrf(request, csrf_token)
    form = {
        "patient_ref": patient_ref,
        "patient_name": patient_name,
        "patient_age": patient_age,
        "patient_sex": patient_sex,
        "clinical_notes": clinical_notes,
    }

    def again(message: str, status: int) -> HTMLResponse:
        return analyze_view(request, user, zoo, model_id, status, form=form, error=message)

    if not can_write(user):
        return again("Your account (viewer) can read cases but not analyse new ones.", 403)
    uploads = [f for f in files or [] if f.filename]
    try:
        if not model_id:
            raise BadRequest("Choose a model.")
        model = zoo.get(model_id)
        if not uploads:
            raise BadRequest("Choose one or more images to analyse.")
        if len(uploads) > settings.max_images_per_request:
            raise BadRequest(f"At most {settings.max_images_per_request} images per case.", 413)
        if not patient_ref.strip() and not patient_name.strip():
            raise BadRequest("Give a patient reference or a patient name.")
        age = None
        if patient_age.strip():
            if not patient_age.strip().isdigit() or int(patient_age) > 130:
                raise BadRequest(f"Age {patient_age!r} is not a whole number of years between 0 and 130.")
            age = int(patient_age)
        if patient_sex not in SEXES:
            raise BadRequest(f"Sex {patient_sex!r} is not one of female, male, other, unknown.")
        raw = [RawImage(await f.read(settings.max_image_bytes + 1), f.filename) for f in uploads]
        patient = PatientFields(
            patient_ref=patient_ref.strip()[:128],
            patient_name=patient_name.strip()[:255],
            patient_age=age,
            patient_sex=patient_sex,
            clinical_notes=clinical_notes[:10_000],
        )
        case = await analyse_and_store(request, user, session, store, model, raw, patient)
    except ModelNotFound:
        return again(f"There is no model {model_id!r}.", 404)
    except (BadRequest, ImageDecodeError) as exc:
        return again(str(exc), exc.status)
    return analyze_view(request, user, zoo, model_id, case=case_view(session, zoo, case))


def case_view(session: Session, zoo: Zoo, case: Case) -> dict[str, Any]:
    """What the case and analyze pages show: the stored case, its model's classes, chart rows."""
    public = CasePublic.of(case, images_of(session, case), DISCLAIMER)
    model = installed_model(zoo, case.model_id)
    classes = {c["id"]: c for c in (model.card["classes"] if model else [])}

    def bars(probabilities: dict[str, float]) -> list[dict[str, Any]]:
        rows = []
        for class_id, p in sorted(probabilities.items(), key=lambda kv: -kv[1]):
            info = classes.get(class_id, {})
            rows.append(
                {
                    "id": class_id,
                    "name": info.get("name", class_id),
                    "description": info.get("description", ""),
                    "malignant": bool(info.get("malignant")),
                    "p": p,
                    "pct": round(p * 100, 1),
                }
            )
        return rows

    return {
        "case": public,
        "bars": bars(public.result.probabilities),
        "image_bars": [bars(image.result.probabilities) for image in public.images],
        "model_title": model.card.get("title", case.model_id) if model else case.model_id,
        "heatmaps": model is not None and model.version == case.model_version,
    }


# --- cases ---------------------------------------------------------------------------------------------


def _date(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        raise BadRequest(f"{value!r} is not a date (YYYY-MM-DD)") from None


@router.get("/cases", response_class=HTMLResponse)
def cases_page(
    request: Request,
    user: WebUser,
    session: SessionDep,
    zoo: ZooDep,
    model_id: str = "",
    risk_level: str = "",
    status: str = "",
    patient_ref: str = "",
    date_from: str = "",
    date_to: str = "",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    filters = {
        "model_id": model_id,
        "risk_level": risk_level,
        "status": status,
        "patient_ref": patient_ref,
        "date_from": date_from,
        "date_to": date_to,
    }
    error = None
    try:
        start, end = _date(date_from), _date(date_to)
    except BadRequest as exc:
        start = end = None
        error = str(exc)
    if end is not None:
        end += timedelta(days=1)
    query = filtered_cases(
        user, model_id or None, risk_level or None, status or None, patient_ref.strip() or None, start, end
    )
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(page, pages)
    rows = session.exec(
        query.order_by(col(Case.created_at).desc(), col(Case.id)).offset((page - 1) * PAGE_SIZE).limit(PAGE_SIZE)
    ).all()
    base = {k: v for k, v in filters.items() if v}
    return render(
        request,
        "cases.html",
        user=user,
        cases=rows,
        total=total,
        page=page,
        pages=pages,
        filters=filters,
        models=zoo.ids(),
        risk_levels=RISK_LEVELS,
        statuses=STATUSES,
        error=error,
        page_url=lambda n: "/cases?" + urlencode(base | {"page": n}),
    )


@router.get("/cases/{case_id}", response_class=HTMLResponse)
def case_page(
    request: Request,
    case_id: str,
    user: WebUser,
    session: SessionDep,
    zoo: ZooDep,
    saved: Annotated[int, Query(ge=0, le=1)] = 0,
) -> HTMLResponse:
    case = load_case(session, case_id, user)
    audit(session, user, "view", case.id, detail="web", client=client_of(request))
    session.commit()
    return case_page_view(request, user, session, zoo, case, saved=bool(saved))


def case_page_view(
    request: Request,
    user: User,
    session: Session,
    zoo: Zoo,
    case: Case,
    status: int = 200,
    saved: bool = False,
    error: str | None = None,
) -> HTMLResponse:
    reviewer = session.get(User, case.reviewed_by) if case.reviewed_by else None
    return render(
        request,
        "case.html",
        status=status,
        user=user,
        view=case_view(session, zoo, case),
        statuses=STATUSES,
        can_review=can_write(user),
        saved=saved,
        reviewer=reviewer,
        error=error,
    )


@router.post("/cases/{case_id}/review", response_model=None)
def review(
    request: Request,
    case_id: str,
    user: WebUser,
    session: SessionDep,
    zoo: ZooDep,
    status: Annotated[str, Form()] = "",
    confirmed_diagnosis: Annotated[str, Form()] = "",
    review_notes: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    case = load_case(session, case_id, user)

    def refuse(message: str, code: int) -> HTMLResponse:
        return case_page_view(request, user, session, zoo, case, code, error=message)

    if not can_write(user):
        return refuse("Your account (viewer) cannot review cases.", 403)
    try:
        update = CaseUpdate(status=status, confirmed_diagnosis=confirmed_diagnosis.strip(), review_notes=review_notes)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return refuse(f"The review was not saved: {problems}.", 400)
    record_review(session, case, user, update.model_dump(), client_of(request), channel="web")
    return RedirectResponse(f"/cases/{quote(case.id)}?saved=1", status_code=303)


@router.get("/cases/{case_id}/images/{image_id}")
def case_image(
    request: Request, case_id: str, image_id: str, user: WebUser, session: SessionDep, store: StoreDep
) -> Response:
    case = load_case(session, case_id, user)
    image = case_image_of(session, case, image_id)
    if image.media_type in BROWSER_IMAGE_TYPES:
        return image_file(store, image)
    # DICOM and TIFF: browsers cannot show them, so the page gets the decoded image as PNG.
    path = store.path(image.stored_name)
    if not path.is_file():
        raise BadRequest(f"the file of image {image.id} is missing from storage", status=410)
    settings: Settings = request.app.state.settings
    shown = display_image(decode_image(path.read_bytes(), settings.max_image_bytes, settings.max_image_pixels).image)
    return Response(
        png_bytes(np.asarray(shown)), media_type="image/png", headers={"Cache-Control": "private, no-store"}
    )


@router.get("/cases/{case_id}/images/{image_id}/heatmap.png")
async def case_heatmap(
    request: Request,
    case_id: str,
    image_id: str,
    user: WebUser,
    session: SessionDep,
    store: StoreDep,
    zoo: ZooDep,
    settings: SettingsDep,
) -> Response:
    case = load_case(session, case_id, user)
    image = case_image_of(session, case, image_id)
    model = installed_model(zoo, case.model_id)
    found = await anyio.to_thread.run_sync(stored_explanation, store, model, case, image, settings)
    if found is None or found[1] is None:
        raise BadRequest("no heat-map: the image file or this version of the model is not available", 404)
    return Response(found[1].heatmap_png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/cases/{case_id}/report.pdf")
async def case_report(
    request: Request,
    case_id: str,
    user: WebUser,
    session: SessionDep,
    store: StoreDep,
    zoo: ZooDep,
    settings: SettingsDep,
) -> Response:
    return await report_download(request, session, store, zoo, settings, user, case_id, detail="web")


# --- models --------------------------------------------------------------------------------------------


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, user: WebUser, zoo: ZooDep) -> HTMLResponse:
    return render(request, "models.html", user=user, groups=model_groups(zoo))


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(request: Request, model_id: str, user: WebUser, zoo: ZooDep) -> HTMLResponse:
    card = zoo.get(model_id).card
    return render(
        request,
        "model.html",
        user=user,
        card=card,
        recipe=json.dumps(card.get("training", {}).get("recipe", {}), indent=2),
    )


# --- admin ---------------------------------------------------------------------------------------------


@router.get("/admin", response_class=HTMLResponse)
def admin_page(
    request: Request, user: WebUser, session: SessionDep, days: Annotated[int, Query(ge=1, le=365)] = 30
) -> HTMLResponse:
    if user.role != Role.admin.value:
        return render(request, "error.html", status=403, user=user, message="The dashboard is for administrators.")
    cases = session.exec(select(Case.model_id, Case.risk_level, Case.status, Case.created_at)).all()
    since = (utcnow() - timedelta(days=days - 1)).date()
    by_day: dict[str, Counter[str]] = {}
    for row in cases:
        day = row[3].date()
        if day >= since:
            by_day.setdefault(day.isoformat(), Counter())[row[1]] += 1
    timeline = [(since + timedelta(days=i)).isoformat() for i in range(days)]
    peak = max((sum(c.values()) for c in by_day.values()), default=0)
    return render(
        request,
        "admin.html",
        user=user,
        total=len(cases),
        by_model=sorted(Counter(r[0] for r in cases).items()),
        by_risk=[(level, sum(1 for r in cases if r[1] == level)) for level in RISK_LEVELS],
        by_status=[(s, sum(1 for r in cases if r[2] == s)) for s in STATUSES],
        timeline=[(day, [(lv, by_day.get(day, Counter())[lv]) for lv in RISK_LEVELS]) for day in timeline],
        peak=peak,
        days=days,
        users=session.exec(select(User).order_by(col(User.created_at))).all(),
        events=session.exec(select(AuditEvent).order_by(col(AuditEvent.at).desc()).limit(25)).all(),
    )


def install_web(app: FastAPI) -> None:
    """Mount the pages, the static files and the web error handling onto ``app``."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.html_error = lambda request, status, detail: render(
        request, "error.html", status=status, user=None, message=detail
    )
    app.include_router(router)

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, _: NotLoggedIn) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)

    @app.exception_handler(CsrfFailed)
    async def csrf_failed(request: Request, exc: CsrfFailed) -> HTMLResponse:
        return render(request, "error.html", status=403, user=None, message=str(exc))
