"""What the API returns (pydantic models; the OpenAPI docs are generated from these; what it accepts is in
``oncolens.http.uploads``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from oncolens.decision import CaseResult
from oncolens.store.views import AssessmentPublic


class HeatmapPublic(BaseModel):
    class_id: str = Field(description="The class the map explains.")
    heatmap_png_base64: str = Field(
        description="Colour heat-map, the input image's aspect ratio, at most 1024 px on the long side; PNG, base64."
    )
    overlay_png_base64: str = Field(
        description="The heat-map blended over the input image (at the heat-map's size), PNG, base64."
    )
    peak_xy: tuple[int, int] = Field(description="Pixel (x, y) of the hottest point, in the input image's own pixels.")


class ImageResultPublic(AssessmentPublic):
    index: int
    filename: str | None
    width: int
    height: int
    heatmap: HeatmapPublic | None = None


class PredictionPublic(AssessmentPublic):
    """The case result (one image, or several aggregated by the model card's rule) and each image's."""

    model_id: str = Field(examples=["skin-ham10000"])
    model_version: str = Field(examples=["1.0.0"])
    aggregation_rule: str = Field(examples=["mean"])
    images: list[ImageResultPublic]
    disclaimer: str
    timing_ms: dict[str, float] = Field(examples=[{"decode": 3.1, "inference": 9.8, "total": 14.2}])

    @classmethod
    def from_result(cls, result: CaseResult, heatmaps: list[HeatmapPublic] | None = None) -> PredictionPublic:
        images = [
            ImageResultPublic(
                index=image.index,
                filename=image.filename,
                width=image.width,
                height=image.height,
                heatmap=heatmaps[image.index] if heatmaps else None,
                **image.assessment.to_dict(),
            )
            for image in result.images
        ]
        return cls(
            model_id=result.model_id,
            model_version=result.model_version,
            aggregation_rule=result.aggregation_rule,
            images=images,
            disclaimer=result.disclaimer,
            timing_ms=result.timing_ms,
            **result.aggregate.to_dict(),
        )


class ClassPublic(BaseModel):
    id: str
    name: str
    description: str
    malignant: bool


class AnalysisPublic(PredictionPublic):
    """A prediction plus the model's class descriptions, intended use and (on request) heat-maps."""

    classes: list[ClassPublic]
    intended_use: str
    limitations: list[str]


class ExplanationPublic(BaseModel):
    model_id: str
    model_version: str
    heatmaps: list[HeatmapPublic]
    disclaimer: str
    timing_ms: dict[str, float]


class ModelSummary(BaseModel):
    id: str = Field(examples=["skin-ham10000"])
    version: str
    title: str
    modality: str
    organ: str
    use_for: str
    classes: list[ClassPublic]
    input_size: int
    serving_precision: Literal["fp32", "int8"] = Field(
        description="The file that answers: int8 only where the card says its copy passed the accuracy gate "
        "and the server's precision setting allows it."
    )
    build: str = Field(
        examples=["ensemble of 5", "one network"],
        description="What answers: one network, or an ensemble of k networks sharing one front, run as one graph "
        "(its card gives both builds' figures and costs).",
    )
    test_metrics: dict[str, Any] = Field(description="Headline test metrics with 95% intervals.")


class HealthPublic(BaseModel):
    status: str = Field(examples=["ok"], description="ok, or degraded when a dependency is not right")
    version: str = Field(examples=["0.1.0"])
    models_loaded: int
    models: list[str]
    dependencies: dict[str, str] = Field(
        default_factory=dict,
        description="database, image_store and disk: 'ok', or what is wrong with it",
        examples=[{"database": "ok", "image_store": "not answering for 12 s", "disk": "ok"}],
    )
