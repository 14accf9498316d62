"""The thyroid app (FastAPI): health, model-info, and predict / gradcam / analyze with base64 JSON.

Served by ``thyroid-us``. That model learned radiologists' **TI-RADS risk scores, not pathology**,
so the labels say so: class 0 is "TI-RADS 2-3 (not suspicious)" and class 1 "TI-RADS 4-5
(suspicious)" where the old app said "Benign (Non-Cancerous)" / "Malignant (Cancerous)".
``confidence_score`` is the calibrated probability of class 1, as the app's sigmoid score was;
``risk_assessment`` comes from the model's risk policy, whose thresholds were chosen on validation
data (the card says how), not from the app's fixed 0.25 / 0.5 / 0.75.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from oncolens import __version__
from oncolens.api.compat.common import Analysis, analyse, is_loaded, model_for, timestamp
from oncolens.config import Settings
from oncolens.errors import Unavailable
from oncolens.http.deps import PredictAccess
from oncolens.http.errors import BadRequest
from oncolens.vision.decode import decode_base64
from oncolens.vision.prepare import RawImage
from oncolens.zoo import ModelPackage
from oncolens.zoo.card import RiskLevel

APP = "thyroid"
router = APIRouter(prefix="/api/v1", tags=["compat: thyroid app"])

RISK_NAMES = {
    RiskLevel.low: "Low Risk",
    RiskLevel.borderline: "Borderline",
    RiskLevel.moderate: "Moderate",
    RiskLevel.high: "High Risk",
    RiskLevel.indeterminate: "Indeterminate (not a thyroid ultrasound frame this model can read)",
}
CAM_LAYER = "features"


class ImageRequest(BaseModel):
    image: str = Field(description="Base64 image bytes (a data: URI prefix is accepted).")
    filename: str | None = Field(None, examples=["thyroid_scan.jpg"])


class GradCAMRequest(ImageRequest):
    layer_name: str | None = Field(None, description=f"Only null or {CAM_LAYER!r}: the layer OncoLens explains.")


class AnalyzeRequest(ImageRequest):
    include_gradcam: bool = True


def _labels(model: ModelPackage) -> dict[int, str]:
    """{0: not-suspicious name, 1: suspicious name} of a two-class model with one malignant class."""
    classes = model.card.classes
    positive = [c for c in classes if c.malignant]
    negative = [c for c in classes if not c.malignant]
    if len(classes) != 2 or len(positive) != 1:
        raise Unavailable(f"the thyroid routes need a two-class model with one malignant class; {model.id} is not")
    return {0: negative[0].name, 1: positive[0].name}


async def _run(request: Request, body: ImageRequest) -> Analysis:
    model = model_for(request, APP)
    settings: Settings = request.app.state.settings
    raw = RawImage(decode_base64(body.image, settings.max_image_bytes), body.filename)
    return await analyse(request, model, [raw])


def _prediction(analysis: Analysis, with_percentage: bool = True) -> dict[str, Any]:
    labels = _labels(analysis.model)
    agg = analysis.result.aggregate
    score = agg.p_malignant
    cls = 1 if agg.is_malignant else 0
    out: dict[str, Any] = {"class": cls, "label": labels[cls], "confidence_score": round(score, 4)}
    if with_percentage:
        out["confidence_percentage"] = round((score if cls else 1.0 - score) * 100, 2)
    return out


def _gradcam(analysis: Analysis) -> dict[str, Any]:
    positive = next(c.id for c in analysis.model.card.classes if c.malignant)
    negative = next(c.id for c in analysis.model.card.classes if not c.malignant)
    explained = positive if analysis.result.aggregate.is_malignant else negative
    return {"layer_used": CAM_LAYER, "images": analysis.heatmap_images(0, explained)}


@router.get("/health", summary="Thyroid app: health")
def health(request: Request) -> dict[str, Any]:
    return {
        "status": "healthy",
        "model_loaded": is_loaded(request, APP),
        "timestamp": timestamp(),
        "version": __version__,
    }


@router.get("/model-info", summary="Thyroid app: model information")
def model_info(request: Request) -> dict[str, Any]:
    model = model_for(request, APP)
    size = model.input_spec.size
    labels = _labels(model)
    return {
        "model_name": model.card.title,
        "input_shape": [None, size, size, 3],
        "output_shape": [None, 1],
        "total_parameters": model.card.parameters,
        "classes": {str(k): v for k, v in labels.items()},
        "conv_layers": [CAM_LAYER],
        "oncolens": {"model_id": model.id, "model_version": model.version, "labels_are": "TI-RADS risk scores"},
    }


def _assessment(body: ImageRequest, analysis: Analysis) -> dict[str, Any]:
    """The fields /predict answers with (and /analyze before its heat-map)."""
    agg = analysis.result.aggregate
    return {
        "success": True,
        "timestamp": timestamp(),
        "filename": body.filename,
        "prediction": _prediction(analysis),
        "risk_assessment": RISK_NAMES.get(agg.risk_level, agg.risk_level),
        "recommendation": agg.recommendation,
    }


@router.post("/predict", summary="Thyroid app: predict from a base64 image", dependencies=[PredictAccess])
async def predict(request: Request, body: ImageRequest) -> dict[str, Any]:
    analysis = await _run(request, body)
    return _assessment(body, analysis) | {"oncolens": analysis.oncolens()}


@router.post("/gradcam", summary="Thyroid app: heat-map of a base64 image", dependencies=[PredictAccess])
async def gradcam(request: Request, body: GradCAMRequest) -> dict[str, Any]:
    if body.layer_name not in (None, CAM_LAYER):
        raise BadRequest(
            f"layer {body.layer_name!r} does not exist in this model: OncoLens explains with the class-activation "
            f"map of its final feature map; send layer_name null or {CAM_LAYER!r}"
        )
    analysis = await _run(request, body)
    return {
        "success": True,
        "timestamp": timestamp(),
        "filename": body.filename,
        **_gradcam(analysis),
        "prediction": _prediction(analysis, with_percentage=False),
        "oncolens": analysis.oncolens(),
    }


@router.post(
    "/analyze", summary="Thyroid app: prediction, risk and heat-map of a base64 image", dependencies=[PredictAccess]
)
async def analyze(request: Request, body: AnalyzeRequest) -> dict[str, Any]:
    analysis = await _run(request, body)
    gradcam = _gradcam(analysis) if body.include_gradcam else None
    return _assessment(body, analysis) | {"gradcam": gradcam, "oncolens": analysis.oncolens()}
