"""The administrator's model pages: each model's versions (install happens on the command line or the
API; shadow, promote and roll back here, each with a reason) and its monitoring, with the flags the
model list shows when drift or performance falls past the thresholds set in the settings."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlmodel import Session

from oncolens.config import Settings
from oncolens.errors import DomainError
from oncolens.http.deps import SessionDep, SettingsDep, ZooDep, client_of
from oncolens.http.errors import status_of
from oncolens.services.audit import Actor
from oncolens.services.monitoring import WINDOW_DAYS, monitoring, recent
from oncolens.services.versions import VersionService
from oncolens.store.db.models import Role, User
from oncolens.web.render import render, sentence
from oncolens.web.session import check_csrf, enrolled_web_user
from oncolens.zoo import Zoo

router = APIRouter(include_in_schema=False)


def _admin(request: Request, session: SessionDep) -> User:
    return enrolled_web_user(request, session)


AdminPageUser = Annotated[User, Depends(_admin)]


def _refused(request: Request, user: User) -> HTMLResponse | None:
    if user.role != Role.admin.value:
        return render(request, "error.html", status=403, user=user, message="Model versions are for administrators.")
    return None


@router.get("/admin/models", response_class=HTMLResponse)
def models_admin(
    request: Request, user: AdminPageUser, session: SessionDep, zoo: ZooDep, settings: SettingsDep
) -> HTMLResponse:
    """Every model: the version that serves, the shadow, and the last 30 days' drift and performance flags."""
    if (refused := _refused(request, user)) is not None:
        return refused
    rows: list[dict[str, Any]] = []
    service = VersionService(session, zoo)
    for model_id in zoo.ids():
        try:
            card = zoo.get(model_id).card
            versions = service.versions(model_id)
        except Exception:  # a broken package is listed as such, not fatal to the page
            rows.append({"id": model_id, "broken": True})
            continue
        figures = recent(session, card, settings)
        rows.append(
            {
                "id": model_id,
                "title": card.title,
                "serving": next(v.version for v in versions if v.live),
                "shadow": next((v.version for v in versions if v.shadow), None),
                "installed": sum(v.source == "installed" for v in versions),
                "figures": figures,
                "drift": figures["drift"]["flag"],
                "performance": figures["performance"]["flag"],
            }
        )
    return render(request, "admin_models.html", user=user, rows=rows, days=WINDOW_DAYS)


@router.get("/admin/models/{model_id}", response_class=HTMLResponse)
def model_admin(
    request: Request,
    model_id: str,
    user: AdminPageUser,
    session: SessionDep,
    zoo: ZooDep,
    settings: SettingsDep,
    period: Literal["week", "month"] = "month",
    done: Literal["", "shadow", "unshadow", "promote", "rollback"] = "",
) -> HTMLResponse:
    """A model's versions (shadow, promote, roll back) and its monitoring per week or month."""
    if (refused := _refused(request, user)) is not None:
        return refused
    return _model_page(request, model_id, user, session, zoo, settings, period, done=done)


def _model_page(
    request: Request,
    model_id: str,
    user: User,
    session: Session,
    zoo: Zoo,
    settings: Settings,
    period: Literal["week", "month"] = "month",
    error: str = "",
    status: int = 200,
    done: str = "",
) -> HTMLResponse:
    card = zoo.get(model_id).card
    service = VersionService(session, zoo)
    report = monitoring(session, card, settings, period)
    return render(
        request,
        "admin_model.html",
        status=status,
        user=user,
        card=card,
        versions=service.versions(model_id),
        history=list(reversed(service.history(model_id))),
        report=report,
        report_rows=[*report["periods"], report["overall"] | {"start": "all"}],
        period=period,
        error=error,
        done=done,
        poll_s=settings.model_poll_s,
    )


@router.post("/admin/models/{model_id}/{action}", response_model=None)
def model_step(
    request: Request,
    model_id: str,
    action: Literal["shadow", "unshadow", "promote", "rollback"],
    user: AdminPageUser,
    session: SessionDep,
    zoo: ZooDep,
    settings: SettingsDep,
    version: Annotated[str, Form()] = "",
    why: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    actor = Actor(user, client_of(request), channel="web")
    service = VersionService(session, zoo)
    try:
        if action == "shadow":
            service.shadow(actor, model_id, version, why)
        elif action == "unshadow":
            service.unshadow(actor, model_id, why)
        elif action == "promote":
            service.promote(actor, model_id, version, why)
        else:
            service.rollback(actor, model_id, why)
    except DomainError as exc:
        session.rollback()
        message = f"Not done: {sentence(str(exc))}"
        return _model_page(request, model_id, user, session, zoo, settings, error=message, status=status_of(exc))
    return RedirectResponse(f"/admin/models/{quote(model_id)}?done={quote(action)}", status_code=303)
