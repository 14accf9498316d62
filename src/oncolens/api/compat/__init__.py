"""Drop-in compatibility with the five apps OncoLens replaces (see ../shared/seeds and the README).

Each app has a module with an ``APIRouter`` whose routes sit at that app's own paths and answer in
its documented shape, translated to and from the one OncoLens predict path. Every app is served
under ``/compat/<app>/...``; at the root, a route is served when no other app (nor OncoLens itself)
claims the same method and path, and a contested one (``/predict``, ``/health``, ``/api/v1/health``)
only for the app named by ``ONCOLENS_COMPAT_ROOT``.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from oncolens.api.compat import cervical, oral, skin7, skin9, thyroid
from oncolens.config import Settings

APPS: dict[str, APIRouter] = {
    "skin9": skin9.router,
    "skin7": skin7.router,
    "cervical": cervical.router,
    "thyroid": thyroid.router,
    "oral": oral.router,
}


def _keys(route: APIRoute) -> set[tuple[str, str]]:
    return {(method, route.path) for method in route.methods or ()}


def include_compat(app: FastAPI, settings: Settings, own_routes: set[tuple[str, str]]) -> None:
    """Mount every app under /compat/<app> and the uncontested (or chosen) routes at the root.

    Call it before OncoLens's own routers so that, where the chosen app shares a path with
    OncoLens (the thyroid app's ``GET /api/v1/health``), the app's answer is served.
    """
    claims: dict[tuple[str, str], set[str]] = {}
    for name, router in APPS.items():
        for route in router.routes:
            if isinstance(route, APIRoute):
                for key in _keys(route):
                    claims.setdefault(key, set()).add(name)
    for name, router in APPS.items():
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            keys = _keys(route)
            contested = any(len(claims[k]) > 1 or k in own_routes for k in keys)
            if not contested or settings.compat_root == name:
                app.router.routes.append(route)
    for name, router in APPS.items():
        app.include_router(router, prefix=f"/compat/{name}", include_in_schema=True)
