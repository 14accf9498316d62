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
from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import col, select

from oncolens.accounts.auth import AuthError, create_access_token
from oncolens.config import Settings
from oncolens.errors import DomainError, InvalidInput, PermissionDenied
from oncolens.http.deps import (
    AccountsDep,
    CasesDep,
    SessionDep,
    SettingsDep,
    ZooDep,
    batcher_for,
    client_of,
    public_base,
    recorder,
)
from oncolens.http.errors import BadRequest, status_of
from oncolens.http.responses import file_response, pdf_response
from oncolens.http.uploads import read_form
from oncolens.services.audit import Actor, audit_events
from oncolens.services.cases import CaseFilters, CaseService, can_write, next_case_cursor
from oncolens.services.inputs import Sex
from oncolens.services.paging import CURSOR_MAX, decode_event_cursor, encode_cursor
from oncolens.store.db.models import Case, CaseStatus, ReferenceStandard, Role, User, utcnow
from oncolens.store.stats import dashboard as dashboard_counts
from oncolens.vision.decode import ImageDecodeError
from oncolens.web.account_pages import code_page
from oncolens.web.account_pages import router as account_router
from oncolens.web.model_pages import router as model_router
from oncolens.web.render import render, sentence
from oncolens.web.session import (
    CsrfFailed,
    MustEnrol,
    NotLoggedIn,
    check_csrf,
    end_session,
    enrolled_web_user,
    start_second_factor,
    start_session,
)
from oncolens.zoo import ModelNotFound, Zoo
from oncolens.zoo.card import RiskLevel

HERE = Path(__file__).parent
router = APIRouter(include_in_schema=False)

RISK_LEVELS = [level.value for level in RiskLevel]
STATUSES = [s.value for s in CaseStatus]
STANDARDS = [s.value for s in ReferenceStandard]
SEXES = [sex.value for sex in Sex]
PAGE_SIZE = 20


def user_dep(request: Request, session: SessionDep) -> User:
    return enrolled_web_user(request, session)


WebUser = Annotated[User, Depends(user_dep)]


def web_actor(request: Request, user: WebUser) -> Actor:
    """The logged-in user of a page; the audit trail records the channel ``web``."""
    return Actor(user, client_of(request), channel="web")


WebActor = Annotated[Actor, Depends(web_actor)]


def model_groups(zoo: Zoo) -> list[tuple[str, list[dict[str, Any]]]]:
    """Installed models grouped by organ, each with what a clinician needs to pick it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for model_id in zoo.ids():
        try:
            card = zoo.get(model_id).card
        except Exception:  # a broken package is left out of the picker, not fatal to the page
            continue
        groups.setdefault(card.organ, []).append(
            {
                "id": model_id,
                "title": card.title,
                "modality": card.modality,
                "use_for": card.use_for,
                "version": card.version,
                "test_n": card.metrics.get("n"),
                "balanced_accuracy": card.metrics.get("balanced_accuracy"),
                "macro_auc": card.metrics.get("macro_auc"),
                "licence_flag": card.dataset.licence_flag,
                "classes": [c.name for c in card.classes],
            }
        )
    return sorted(groups.items())


# --- login / logout ------------------------------------------------------------------------------------


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this site only (never //other-host or a full URL)."""
    return target if target.startswith("/") and not target.startswith("//") else "/analyze"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep, next: str = "/analyze") -> HTMLResponse:
    return render(request, "login.html", next=safe_next(next), error=None, self_signup=settings.self_signup)


@router.post("/login", response_model=None)
def login(
    request: Request,
    accounts: AccountsDep,
    settings: SettingsDep,
    email: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/analyze",
) -> Response:
    check_csrf(request, csrf_token)
    target = safe_next(next)
    try:
        user = accounts.password_step(email, password, client_of(request), channel="web")
    except AuthError as exc:
        message = str(exc)
        return render(
            request,
            "login.html",
            status=exc.status,
            next=target,
            error=message[:1].upper() + message[1:] + ".",
            email=email,
            self_signup=settings.self_signup,
        )
    if user.two_factor:
        page = code_page(request)
        start_second_factor(request, page, user, target)
        return page
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
    return render(
        request,
        "analyze.html",
        status=status,
        user=user,
        groups=model_groups(zoo),
        chosen=chosen,
        sexes=SEXES,
        **context,
    )


@router.get("/analyze", response_class=HTMLResponse)
def analyze_page(request: Request, user: WebUser, zoo: ZooDep, model: str = "") -> HTMLResponse:
    return analyze_view(request, user, zoo, model)


PATIENT_LABELS = {
    "patient_ref": "Patient reference",
    "patient_name": "Name",
    "patient_age": "Age",
    "patient_sex": "Sex",
    "clinical_notes": "Clinical notes",
}


def form_message(exc: Exception) -> str:
    """An error as the form shows it: the patient fields by their labels on the page."""
    message = str(exc)
    for field, label in PATIENT_LABELS.items():
        message = message.replace(field, label)
    return message[:1].upper() + message[1:]


@router.post("/analyze", response_class=HTMLResponse)
async def analyze(
    request: Request, actor: WebActor, cases: CasesDep, settings: SettingsDep, zoo: ZooDep
) -> HTMLResponse:
    form: dict[str, str] = {}
    model_id = ""

    def again(message: str, status: int) -> HTMLResponse:
        return analyze_view(request, actor.user, zoo, model_id, status, form=form, error=message)

    try:
        raw, form = await read_form(request, settings, ("files",), required=False)
    except BadRequest as exc:
        return again(form_message(exc), exc.status)
    check_csrf(request, form.get("csrf_token", ""))
    model_id = form.get("model_id", "")
    if not can_write(actor.user):
        return again("Your account (viewer) can read cases but not analyse new ones.", 403)
    try:
        if not model_id:
            raise BadRequest("Choose a model.")
        model = zoo.get(model_id)
        if not raw:
            raise BadRequest("Choose one or more images to analyse.")
        patient = {name: form.get(name, "") for name in PATIENT_LABELS}
        batcher = batcher_for(request, model)
        case = await cases.create(actor, model, raw, patient, batcher, recorder(batcher))
    except ModelNotFound:
        return again(f"There is no model {model_id!r}.", 404)
    except (BadRequest, ImageDecodeError) as exc:
        return again(form_message(exc), exc.status)
    except DomainError as exc:
        return again(form_message(exc), status_of(exc))
    return analyze_view(request, actor.user, zoo, model_id, case=case_view(cases, case))


def case_view(cases: CaseService, case: Case) -> dict[str, Any]:
    """What the case and analyze pages show: the stored case, its model's classes, chart rows."""
    public = cases.view(case)
    model = cases.installed_model(case.model_id)

    def bars(probabilities: dict[str, float]) -> list[dict[str, Any]]:
        rows = []
        for class_id, p in sorted(probabilities.items(), key=lambda kv: -kv[1]):
            info = model.card.class_info(class_id) if model else None
            rows.append(
                {
                    "id": class_id,
                    "name": info.name if info else class_id,
                    "description": info.description if info else "",
                    "malignant": bool(info and info.malignant),
                    "p": p,
                    "pct": round(p * 100, 1),
                }
            )
        return rows

    return {
        "case": public,
        "bars": bars(public.result.probabilities),
        "image_bars": [bars(image.result.probabilities) for image in public.images],
        "model_title": model.card.title if model else case.model_id,
        "score_label": model.card.score_label if model else "P(malignant)",
        "positive_label": model.card.positive_label if model else "malignant",
        "heatmaps": model is not None and model.version == case.model_version,
        "classes": [(c.id, c.name) for c in model.card.classes] if model else [],
        "reference_name": (
            (info.name if (info := model.card.class_info(public.reference_class)) else public.reference_class)
            if model and public.reference_class
            else public.reference_class
        ),
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
    cases: CasesDep,
    zoo: ZooDep,
    model_id: str = "",
    risk_level: str = "",
    status: str = "",
    patient_ref: str = "",
    date_from: str = "",
    date_to: str = "",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    cursor: Annotated[str, Query(max_length=CURSOR_MAX)] = "",
    deleted: Annotated[int, Query(ge=0, le=1)] = 0,
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
    chosen = CaseFilters(model_id or None, risk_level or None, status or None, patient_ref.strip() or None, start, end)
    # "Older" follows the cursor of the page's last case (keyset: as fast on page 20,000 as on page 1);
    # a page number alone (a typed URL, "Newer") is reached by offset.
    following: str | None = None
    try:
        if cursor or page == 1:
            rows, total, following = cases.page_after(user, chosen, PAGE_SIZE, cursor or None)
        else:
            rows, total = cases.page(user, chosen, PAGE_SIZE, (page - 1) * PAGE_SIZE)
            if not rows and total:  # past the last page: the last page
                page = math.ceil(total / PAGE_SIZE)
                rows, total = cases.page(user, chosen, PAGE_SIZE, (page - 1) * PAGE_SIZE)
            more = (page - 1) * PAGE_SIZE + len(rows) < total
            following = next_case_cursor(rows[-1]) if rows and more else None
    except InvalidInput:
        error, page = "That page link is not valid any more; this is the first page.", 1
        rows, total, following = cases.page_after(user, chosen, PAGE_SIZE, None)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(page, pages)
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
        older_url="/cases?" + urlencode(base | {"page": page + 1, "cursor": following}) if following else None,
        class_names=class_names(zoo),
        score_labels={i: zoo.get(i).card.score_label for i in zoo.ids()},
        deleted=deleted,
    )


def class_names(zoo: Zoo) -> dict[str, dict[str, str]]:
    """Each installed model's class ids and the names the clinician reads."""
    return {i: {c.id: c.name for c in zoo.get(i).card.classes} for i in zoo.ids()}


@router.get("/cases/{case_id}/fhir.json")
def case_fhir(request: Request, case_id: str, actor: WebActor, cases: CasesDep) -> Response:
    """The case as a FHIR R4 Bundle, downloaded from the case page (the same as the API's)."""
    bundle = cases.fhir_bundle(actor, case_id, public_base(request))
    headers = {"Content-Disposition": f'attachment; filename="case-{case_id[:8]}-fhir.json"'}
    return Response(json.dumps(bundle, indent=2), media_type="application/fhir+json", headers=headers)


@router.get("/cases/{case_id}/sr.dcm")
def case_dicom_sr(case_id: str, actor: WebActor, cases: CasesDep) -> Response:
    """The case as a DICOM Structured Report, downloaded from the case page (the same as the API's)."""
    headers = {"Content-Disposition": f'attachment; filename="case-{case_id[:8]}-sr.dcm"'}
    return Response(cases.dicom_sr(actor, case_id), media_type="application/dicom", headers=headers)


@router.post("/cases/{case_id}/delete", response_model=None)
def delete_case(
    request: Request,
    case_id: str,
    actor: WebActor,
    session: SessionDep,
    cases: CasesDep,
    confirm: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    case = cases.find(actor.user, case_id)
    if confirm != "yes":
        return case_page_view(
            request, actor.user, session, cases, case, 400, error="Tick the box to confirm the deletion."
        )
    try:
        cases.delete(actor, case_id)
    except PermissionDenied:
        return case_page_view(
            request, actor.user, session, cases, case, 403, error="Your account (viewer) cannot delete cases."
        )
    return RedirectResponse("/cases?deleted=1", status_code=303)


@router.get("/cases/{case_id}", response_class=HTMLResponse)
def case_page(
    request: Request,
    case_id: str,
    actor: WebActor,
    session: SessionDep,
    cases: CasesDep,
    saved: Annotated[int, Query(ge=0, le=1)] = 0,
) -> HTMLResponse:
    case = cases.get(actor, case_id)
    return case_page_view(request, actor.user, session, cases, case, saved=bool(saved))


def case_page_view(
    request: Request,
    user: User,
    session: SessionDep,
    cases: CaseService,
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
        view=case_view(cases, case),
        statuses=STATUSES,
        standards=STANDARDS,
        can_review=can_write(user),
        saved=saved,
        reviewer=reviewer,
        error=error,
        viewer_url=viewer_link(cases.settings, case.dicom_study_uid),
    )


def viewer_link(settings: Settings, study_uid: str | None) -> str | None:
    """The PACS viewer's page of a case's study (``ONCOLENS_DICOM_VIEWER_URL`` with ``{study_uid}``)."""
    if not study_uid or not settings.dicom_viewer_url:
        return None
    return settings.dicom_viewer_url.replace("{study_uid}", quote(study_uid))


@router.post("/cases/{case_id}/review", response_model=None)
def review(
    request: Request,
    case_id: str,
    actor: WebActor,
    session: SessionDep,
    cases: CasesDep,
    status: Annotated[str, Form()] = "",
    confirmed_diagnosis: Annotated[str, Form()] = "",
    review_notes: Annotated[str, Form()] = "",
    reference_class: Annotated[str, Form()] = "",
    reference_standard: Annotated[str, Form()] = "",
    reference_date: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    changes: dict[str, Any] = {
        "status": status,
        "confirmed_diagnosis": confirmed_diagnosis.strip(),
        "review_notes": review_notes,
    }
    # The form always sends the reference fields: an empty class clears the reference; an empty date is
    # the review's date.
    if reference_class.strip():
        changes |= {"reference_class": reference_class.strip(), "reference_standard": reference_standard or None}
        changes |= {"reference_date": reference_date} if reference_date.strip() else {}
    elif cases.find(actor.user, case_id).reference_class is not None:
        changes["reference_class"] = None
    try:
        case = cases.review(actor, case_id, changes)
    except PermissionDenied:
        case = cases.find(actor.user, case_id)
        return case_page_view(
            request, actor.user, session, cases, case, 403, error="Your account (viewer) cannot review cases."
        )
    except InvalidInput as exc:
        case = cases.find(actor.user, case_id)
        return case_page_view(request, actor.user, session, cases, case, 400, error=f"The review was not saved: {exc}.")
    return RedirectResponse(f"/cases/{quote(case.id)}?saved=1", status_code=303)


@router.get("/cases/{case_id}/images/{image_id}")
def case_image(case_id: str, image_id: str, actor: WebActor, cases: CasesDep) -> Response:
    """The image for the page: browsers cannot show DICOM and TIFF, so those come as PNG."""
    return file_response(cases.open_image(actor, case_id, image_id, for_browser=True))


@router.get("/cases/{case_id}/images/{image_id}/heatmap.png")
async def case_heatmap(case_id: str, image_id: str, actor: WebActor, cases: CasesDep) -> Response:
    png = await anyio.to_thread.run_sync(cases.heatmap, actor, case_id, image_id)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/cases/{case_id}/report.pdf")
async def case_report(case_id: str, actor: WebActor, cases: CasesDep) -> Response:
    return pdf_response(await anyio.to_thread.run_sync(cases.report_pdf, actor, case_id), case_id)


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
        recipe=json.dumps(card.training.get("recipe", {}), indent=2),
    )


# --- admin ---------------------------------------------------------------------------------------------


@router.get("/admin", response_class=HTMLResponse)
def admin_page(
    request: Request, user: WebUser, session: SessionDep, days: Annotated[int, Query(ge=1, le=365)] = 30
) -> HTMLResponse:
    if user.role != Role.admin.value:
        return render(request, "error.html", status=403, user=user, message="The dashboard is for administrators.")
    # The case counts kept with every case write (store.stats), summed by the database.
    since = (utcnow() - timedelta(days=days - 1)).date()
    overall, daily = dashboard_counts(session, since)
    by_day: dict[str, Counter[str]] = {}
    by_model: Counter[str] = Counter()
    by_risk: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    for model_id, risk_level, status, n in overall:
        by_model[model_id] += n
        by_risk[risk_level] += n
        by_status[status] += n
    for day, risk_level, n in daily:
        by_day.setdefault(day.isoformat(), Counter())[risk_level] += n
    timeline = [(since + timedelta(days=i)).isoformat() for i in range(days)]
    peak = max((sum(c.values()) for c in by_day.values()), default=0)
    scale = peak + peak % 2  # an even top, so the middle tick is a whole number of cases
    return render(
        request,
        "admin.html",
        user=user,
        total=sum(by_model.values()),
        by_model=sorted((model, n) for model, n in by_model.items() if n),
        by_risk=[(level, by_risk[level]) for level in RISK_LEVELS],
        by_status=[(s, by_status[s]) for s in STATUSES],
        timeline=[(day, [(lv, by_day.get(day, Counter())[lv]) for lv in RISK_LEVELS]) for day in timeline],
        peak=peak,
        scale=scale,
        days=days,
        users=session.exec(select(User).order_by(col(User.created_at))).all(),
        events=audit_events(session, limit=25, hide_views=True, count=False)[0],
    )


AUDIT_PAGE = 50


@router.get("/admin/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    user: WebUser,
    session: SessionDep,
    action: Annotated[str, Query(max_length=32)] = "",
    views: bool = False,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    cursor: Annotated[str, Query(max_length=CURSOR_MAX)] = "",
) -> HTMLResponse:
    """The whole audit trail, newest first, 50 a page; image and heat-map views only when asked for.
    "Older" follows the cursor of the page's last event (as fast deep down as on top); a page number
    alone ("Newer", a typed URL) is reached by offset."""
    if user.role != Role.admin.value:
        return render(request, "error.html", status=403, user=user, message="The audit trail is for administrators.")
    error = None
    try:
        before = decode_event_cursor(cursor) if cursor else None
    except InvalidInput:
        error, page, before = "That page link is not valid any more; this is the first page.", 1, None
    offset = 0 if before is not None else (page - 1) * AUDIT_PAGE
    rows, total = audit_events(
        session, action or None, limit=AUDIT_PAGE + 1, offset=offset, hide_views=not views, before_id=before
    )
    following = encode_cursor("audit", rows[AUDIT_PAGE - 1].id) if len(rows) > AUDIT_PAGE else None
    pages = max(1, -(-total // AUDIT_PAGE))
    base = {"action": action, "views": "true" if views else "false"}
    return render(
        request,
        "audit.html",
        user=user,
        events=rows[:AUDIT_PAGE],
        total=total,
        page=min(page, pages),
        pages=pages,
        action=action,
        views=views,
        error=error,
        newer_url="/admin/audit?" + urlencode(base | {"page": page - 1}) if page > 1 else None,
        older_url="/admin/audit?" + urlencode(base | {"page": page + 1, "cursor": following}) if following else None,
    )


def install_web(app: FastAPI) -> None:
    """Mount the pages, the static files and the web error handling onto ``app``."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.html_error = lambda request, status, detail: render(
        request, "error.html", status=status, user=None, message=sentence(detail)
    )
    app.include_router(router)
    app.include_router(account_router)
    app.include_router(model_router)

    @app.exception_handler(MustEnrol)
    async def to_account(request: Request, _: MustEnrol) -> RedirectResponse:
        return RedirectResponse("/account", status_code=303)

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, _: NotLoggedIn) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)

    @app.exception_handler(CsrfFailed)
    async def csrf_failed(request: Request, exc: CsrfFailed) -> HTMLResponse:
        return render(request, "error.html", status=403, user=None, message=str(exc))
