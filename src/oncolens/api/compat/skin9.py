"""The 9-class skin app (Flask): ``POST /predict`` (multipart ``file``) and ``GET /health``.

Served by ``skin-isic9``. The app's "Unknown" class has no OncoLens twin and is never produced;
"Seborrheic keratosis" is not a class of that model either (see its card). "Benign keratosis" is
the model's pigmented benign keratosis, "Melanocytic nevi" its nevus. ``is_cancerous`` keeps the
app's meaning (top class melanoma, basal or squamous cell carcinoma; actinic keratosis is
pre-cancerous); the OncoLens risk level, which counts actinic keratosis in, is in ``oncolens``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from oncolens.api.compat.common import APP_ERRORS, analyse_one_file, app_error, display_names, is_loaded
from oncolens.http.deps import PredictAccess
from oncolens.zoo.card import RiskLevel

APP = "skin9"
router = APIRouter(tags=["compat: skin 9-class app"])

NAMES = {
    "actinic_keratosis": "Actinic keratosis",
    "basal_cell_carcinoma": "Basal cell carcinoma",
    "pigmented_benign_keratosis": "Benign keratosis",
    "dermatofibroma": "Dermatofibroma",
    "melanoma": "Melanoma",
    "nevus": "Melanocytic nevi",
    "squamous_cell_carcinoma": "Squamous cell carcinoma",
    "vascular_lesion": "Vascular lesion",
}


@router.post("/predict", summary="Skin 9-class app: classify one lesion image", dependencies=[PredictAccess])
async def predict(request: Request) -> JSONResponse:
    try:
        analysis = await analyse_one_file(request, APP)
    except APP_ERRORS as exc:
        status, message = app_error(exc)
        return JSONResponse({"success": False, "error": message, "detail": message}, status_code=status)
    names = display_names(analysis.model, NAMES)
    agg = analysis.result.aggregate
    # "is_cancerous" is the model's malignant call (P(malignant) at or above the card's threshold, a risk
    # level border), so it never disagrees with the risk level beside it.
    cancerous = agg.is_malignant
    unknown = agg.risk_level == RiskLevel.indeterminate
    body: dict[str, Any] = {
        "success": True,
        "prediction": {
            # The app's own "Unknown" class: the image is out of the model's domain (no risk level).
            "class_name": "Unknown" if unknown else names[agg.top_class],
            "is_cancerous": False if unknown else cancerous,
            "confidence": round(agg.confidence, 4),
            "all_predictions": {
                names[c]: round(p, 4) for c, p in sorted(agg.probabilities.items(), key=lambda kv: -kv[1])
            },
        },
        "oncolens": analysis.oncolens(),
    }
    return JSONResponse(body)


@router.get("/health", summary="Skin 9-class app: health")
def health(request: Request) -> dict[str, Any]:
    return {"status": "healthy", "model_loaded": is_loaded(request, APP)}
