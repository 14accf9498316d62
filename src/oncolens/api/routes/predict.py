"""Predict, explain and analyze: the routes only translate HTTP <-> the one analysis path."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query

from oncolens.api.openapi import inline_defs
from oncolens.api.schemas import (
    AnalysisPublic,
    ClassPublic,
    ExplanationPublic,
    HeatmapPublic,
    PredictionPublic,
)
from oncolens.http.batching import InferenceBatcher
from oncolens.http.deps import BatcherDep, ModelDep, PredictAccess, recorder
from oncolens.http.errors import BadRequest
from oncolens.http.uploads import ImagesDep, PredictJSON
from oncolens.services.analysis import Analysed, run_prepared
from oncolens.vision.cam import explanation
from oncolens.vision.prepare import PreparedImages
from oncolens.zoo import ModelPackage

router = APIRouter(prefix="/models/{model_id}", tags=["predict"], dependencies=[PredictAccess])

BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "One image."},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Several images of one case.",
                        },
                    },
                }
            },
            "application/json": {"schema": inline_defs(PredictJSON.model_json_schema())},
        },
    }
}


def _check_class(model: ModelPackage, class_id: str | None) -> None:
    if class_id is not None and class_id not in model.class_ids:
        raise BadRequest(f"unknown class {class_id!r}; this model's classes are {model.class_ids}")


async def _heatmaps(
    model: ModelPackage, images: PreparedImages, analysed: Analysed, class_id: str | None
) -> list[HeatmapPublic]:
    """Each image's heat-map of ``class_id``, or of the class its result names."""
    _check_class(model, class_id)
    named = [class_id or image.assessment.top_class for image in analysed.result.images]

    def build() -> list[HeatmapPublic]:
        out = []
        for decoded, feats, shown in zip(images.decoded, analysed.features, named, strict=True):
            ex = explanation(model, decoded.image, feats, shown, (decoded.width, decoded.height))
            out.append(
                HeatmapPublic(
                    class_id=ex.class_id,
                    heatmap_png_base64=base64.b64encode(ex.heatmap_png).decode("ascii"),
                    overlay_png_base64=base64.b64encode(ex.overlay_png).decode("ascii"),
                    peak_xy=ex.peak_xy,
                )
            )
        return out

    return await anyio.to_thread.run_sync(build)


async def _run(model: ModelPackage, batcher: InferenceBatcher, images: PreparedImages) -> Analysed:
    return await run_prepared(model, batcher, images, recorder(batcher))


def _total(timing: dict[str, float], start: float) -> dict[str, float]:
    return timing | {"total": round((time.perf_counter() - start) * 1000, 2)}


@router.post("/predict", response_model=PredictionPublic, openapi_extra=BODY_DOC)
async def predict(model: ModelDep, batcher: BatcherDep, images: ImagesDep) -> PredictionPublic:
    """Calibrated class probabilities, P(malignant), risk level and recommendation.

    Several images are one case: the top-level fields aggregate them by the model card's rule and
    ``images`` holds each image's own result.
    """
    start = time.perf_counter()
    result = (await _run(model, batcher, images)).result
    response = PredictionPublic.from_result(result)
    response.timing_ms = _total(response.timing_ms, start - images.decode_ms / 1000)
    return response


@router.post("/explain", response_model=ExplanationPublic, openapi_extra=BODY_DOC)
async def explain(
    model: ModelDep,
    batcher: BatcherDep,
    images: ImagesDep,
    class_id: Annotated[
        str | None, Query(alias="class", description="Class to explain (default: the class each image's result names).")
    ] = None,
) -> ExplanationPublic:
    """Class-activation heat-map and overlay (PNG, base64) of each image, the size of the input."""
    _check_class(model, class_id)
    start = time.perf_counter()
    analysed = await _run(model, batcher, images)
    result = analysed.result
    heatmaps = await _heatmaps(model, images, analysed, class_id)
    return ExplanationPublic(
        model_id=model.id,
        model_version=model.version,
        heatmaps=heatmaps,
        disclaimer=result.disclaimer,
        timing_ms=_total(result.timing_ms, start - images.decode_ms / 1000),
    )


@router.post("/analyze", response_model=AnalysisPublic, openapi_extra=BODY_DOC)
async def analyze(
    model: ModelDep,
    batcher: BatcherDep,
    images: ImagesDep,
    heatmap: Annotated[bool, Query(description="Add each image's heat-map of its top class.")] = True,
) -> AnalysisPublic:
    """Prediction, risk and recommendation, class descriptions, intended use and heat-maps."""
    start = time.perf_counter()
    analysed = await _run(model, batcher, images)
    result = analysed.result
    heatmaps = await _heatmaps(model, images, analysed, None) if heatmap else None
    base = PredictionPublic.from_result(result, heatmaps)
    card = model.card
    return AnalysisPublic(
        **base.model_dump(exclude={"timing_ms"}),
        timing_ms=_total(result.timing_ms, start - images.decode_ms / 1000),
        classes=[ClassPublic(**c.model_dump()) for c in card.classes],
        intended_use=card.intended_use,
        limitations=list(card.limitations),
    )
