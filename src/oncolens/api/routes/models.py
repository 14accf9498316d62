from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from oncolens.api.schemas import ClassPublic, ModelSummary
from oncolens.errors import NotFound
from oncolens.http.deps import ModelDep, ZooDep
from oncolens.zoo import ModelPackage

router = APIRouter(prefix="/models", tags=["models"])

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")
FIGURES = ("confusion_matrix", "roc", "reliability")


def summary(model: ModelPackage) -> ModelSummary:
    card = model.card
    metrics = card.metrics
    intervals = metrics.get("intervals", {})
    headline: dict[str, Any] = {
        name: {"value": metrics.get(name), "ci95": intervals.get(name)} for name in HEADLINE if name in metrics
    }
    if "malignant" in metrics:
        headline["malignant"] = {k: metrics["malignant"].get(k) for k in ("sensitivity", "specificity", "auc")}
    return ModelSummary(
        id=model.id,
        version=model.version,
        title=card.title,
        modality=card.modality,
        organ=card.organ,
        use_for=card.use_for,
        classes=[ClassPublic(**c.model_dump()) for c in card.classes],
        input_size=model.input_spec.size,
        serving_precision="int8" if model.precision == "int8" else "fp32",
        build=card.build,
        test_metrics=headline | {"n": metrics.get("n")},
    )


@router.get("", response_model=list[ModelSummary])
def list_models(zoo: ZooDep) -> list[ModelSummary]:
    """Every model in the zoo, with its classes and headline test metrics."""
    return [summary(zoo.get(model_id)) for model_id in zoo.ids()]


@router.get("/{model_id}")
def get_model_card(model: ModelDep) -> dict[str, Any]:
    """The model card: intended use, limitations, classes, calibration, risk policy, metrics, data."""
    card = model.card.model_dump(mode="json", exclude={"head"})
    card["figures"] = {name: f"/api/v1/models/{model.id}/figures/{name}.png" for name in FIGURES}
    return card


@router.get("/{model_id}/figures/{name}.png", response_class=FileResponse)
def get_figure(model: ModelDep, name: str) -> FileResponse:
    """A report figure of the model card: confusion_matrix, roc or reliability."""
    if name not in FIGURES:
        raise NotFound(f"no figure {name!r}; available: {', '.join(FIGURES)}")
    path = model.directory / "report" / f"{name}.png"
    if not path.is_file():
        raise NotFound(f"model {model.id} has no {name} figure")
    return FileResponse(path, media_type="image/png")
