"""The cervical app (Flask): ``POST /predict`` with the image in multipart field ``file``.

Its document says only that the answer is "the classification result in JSON format", so the
shape here is OncoLens's own, kept flat for such clients: ``prediction`` (class name), ``class_id``,
``confidence``, ``probabilities`` (name -> probability) and ``is_abnormal`` (P(abnormal) at the
model's threshold: the four dysplasia / carcinoma-in-situ classes). Served by ``cervical-herlev``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from oncolens.api.compat.common import APP_ERRORS, analyse_one_file, app_error, display_names
from oncolens.http.deps import PredictAccess

APP = "cervical"
router = APIRouter(tags=["compat: cervical app"])


@router.post("/predict", summary="Cervical app: classify one Pap-smear cell image", dependencies=[PredictAccess])
async def predict(request: Request) -> JSONResponse:
    try:
        analysis = await analyse_one_file(request, APP)
    except APP_ERRORS as exc:
        status, message = app_error(exc)
        return JSONResponse({"error": message, "detail": message}, status_code=status)
    names = display_names(analysis.model, {})
    agg = analysis.result.aggregate
    body: dict[str, Any] = {
        "prediction": names[agg.top_class],
        "class_id": agg.top_class,
        "confidence": round(agg.confidence, 4),
        "probabilities": {names[c]: round(p, 4) for c, p in sorted(agg.probabilities.items(), key=lambda kv: -kv[1])},
        "is_abnormal": agg.is_malignant,
        "oncolens": analysis.oncolens(),
    }
    return JSONResponse(body)
