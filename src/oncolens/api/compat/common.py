"""What the compatibility routers share: the model behind each app, one analysis call, extras."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import numpy as np
from fastapi import Request

from oncolens.config import Settings
from oncolens.decision import CaseResult
from oncolens.errors import DomainError, Unavailable
from oncolens.http.deps import batcher_for, recorder
from oncolens.http.errors import BadRequest, status_of
from oncolens.http.uploads import read_form
from oncolens.services.analysis import analyse as services_analyse
from oncolens.vision.cam import display_image, explanation, png_bytes
from oncolens.vision.decode import ImageDecodeError
from oncolens.vision.prepare import PreparedImages, RawImage
from oncolens.zoo import ModelNotFound, ModelPackage, Zoo

DEFAULT_MODELS = {
    "skin9": "skin-isic9",
    "skin7": "skin-ham10000",
    "cervical": "cervical-herlev",
    "thyroid": "thyroid-us",
    "oral": "oral-photo",
}


def model_for(request: Request, app_name: str) -> ModelPackage:
    """The OncoLens model that answers for ``app_name`` (``ONCOLENS_COMPAT_MODELS`` overrides)."""
    settings: Settings = request.app.state.settings
    zoo: Zoo = request.app.state.zoo
    model_id = settings.compat_models.get(app_name, DEFAULT_MODELS[app_name])
    try:
        return zoo.get(model_id)
    except ModelNotFound as exc:
        raise Unavailable(
            f"the {app_name} compatibility routes are served by model {model_id!r}, which is not installed "
            f"(installed: {zoo.ids()}); set ONCOLENS_COMPAT_MODELS to choose another"
        ) from exc


class Analysis:
    """One case through the OncoLens predict path, with what the compat answers need from it."""

    def __init__(self, model: ModelPackage, result: CaseResult, prepared: PreparedImages, features: np.ndarray):
        self.model, self.result, self.prepared, self.features = model, result, prepared, features

    def probability(self, class_id: str, image: int | None = None) -> float:
        assessment = self.result.aggregate if image is None else self.result.images[image].assessment
        return assessment.probabilities[class_id]

    def heatmap_images(self, image: int = 0, class_id: str | None = None) -> dict[str, str]:
        """Base64 PNGs of the image as analysed, its heat-map and the overlay."""
        decoded = self.prepared.decoded[image]
        named = class_id or self.result.images[image].assessment.top_class
        ex = explanation(self.model, decoded.image, self.features[image], named, (decoded.width, decoded.height))
        return {
            "original": b64(png_bytes(np.asarray(display_image(decoded.image)))),
            "heatmap": b64(ex.heatmap_png),
            "overlay": b64(ex.overlay_png),
        }

    def oncolens(self) -> dict[str, Any]:
        """The OncoLens result beside the app's own fields: model, risk, P(malignant), disclaimer."""
        agg = self.result.aggregate
        return {
            "model_id": self.result.model_id,
            "model_version": self.result.model_version,
            "top_class": agg.top_class,
            "probabilities": agg.probabilities,
            "p_malignant": round(agg.p_malignant, 6),
            "risk_level": agg.risk_level,
            "recommendation": agg.recommendation,
            "statement": agg.statement,
            "also_consider": agg.also_consider,
            "note": agg.note,
            "images": [
                {"domain": image.assessment.domain, "quality": image.assessment.quality} for image in self.result.images
            ],
            "disclaimer": self.result.disclaimer,
        }


async def analyse(request: Request, model: ModelPackage, raw: list[RawImage]) -> Analysis:
    """The one predict path (services.analysis) through the server's batcher for ``model``."""
    batcher = batcher_for(request, model)
    analysed = await services_analyse(model, raw, request.app.state.settings, batcher, recorder(batcher))
    return Analysis(model, analysed.result, analysed.prepared, analysed.features)


async def uploaded_files(request: Request, fields: tuple[str, ...]) -> tuple[list[RawImage], dict[str, str]]:
    """Multipart files under ``fields`` and the text fields beside them (a clear 4xx otherwise)."""
    return await read_form(request, request.app.state.settings, fields)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def timestamp() -> str:
    """Local server time as the apps wrote it: ``2026-02-13 10:30:45``."""
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


# What the Flask apps answer in their own error shape: a bad request, an unreadable image, a
# domain error (no image, no model installed).
APP_ERRORS = (BadRequest, ImageDecodeError, DomainError)


def app_error(exc: Exception) -> tuple[int, str]:
    """Status and message of an error the compat routes answer in their app's own error shape."""
    if isinstance(exc, DomainError):
        return status_of(exc), str(exc)
    return int(getattr(exc, "status", 400)), str(exc)


def is_loaded(request: Request, app_name: str) -> bool:
    """Whether the app's model is installed and loaded (without loading it)."""
    settings: Settings = request.app.state.settings
    zoo: Zoo = request.app.state.zoo
    return settings.compat_models.get(app_name, DEFAULT_MODELS[app_name]) in zoo.loaded_ids()


def display_names(model: ModelPackage, names: dict[str, str]) -> dict[str, str]:
    """Class id -> the app's name for it; a class the app did not have keeps the OncoLens name."""
    return {c.id: names.get(c.id, c.name) for c in model.card.classes}


async def analyse_one_file(request: Request, app_name: str) -> Analysis:
    """The app's model on the one image in multipart field ``file`` (the Flask apps' request)."""
    model = model_for(request, app_name)
    raw, _ = await uploaded_files(request, ("file",))
    if len(raw) > 1:
        raise BadRequest("send one image in form field 'file'")
    return await analyse(request, model, raw)
