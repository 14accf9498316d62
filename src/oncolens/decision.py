"""The one place a result is decided: model logits -> calibrated probabilities -> P(malignant) -> the
named class -> risk level -> one statement, which every edge (API, web, PDF, FHIR, CLI, batch, compat) repeats verbatim.

* The named class is always the class with the highest calibrated probability, the one shown beside it.
* The risk level is the card's level for P(malignant) (the summed probability of the malignant
  classes), and its recommendation is that level's; the malignant call is a level border.
* A card that keeps a rebalanced class rule (logit adjustment, chosen on val for balanced accuracy)
  shows that rule's class, where it differs, as what it is: "also consider ... (rare classes weighted
  up)", never as the most likely class.
* An image out of the model's domain gets no class and no level (``indeterminate``) and advice that
  says which test fired: an image of another kind (choose the model for it) or an unusual image of
  the right kind (retake it, or judge it clinically).

A predict passes here once: ``case_result`` calibrates the logits of a case's images (``probabilities``),
decides each image once and the combined result once (``decide``); nothing downstream computes a
probability, picks a class or a level again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from oncolens.vision.domain import OTHER_KIND, DomainCheck, QualityIssue
from oncolens.zoo.card import ModelCard, RiskLevel

if TYPE_CHECKING:
    from oncolens.zoo.package import ModelPackage

RARE_CLASSES = "rare classes weighted up"
DISCLAIMER = (
    "Decision support only, not a diagnosis. A qualified clinician must interpret this result "
    "together with the patient's history and examination."
)

# How to retake an image, by the card's modality (what the model's own training images look like).
RETAKE = {
    "clinical photo": "the lesion centred, in focus and evenly lit",
    "dermoscopy": "centred, in focus, without the dermoscope's black vignette",
    "ultrasound": "the nodule or mass centred, without calipers, text or colour Doppler drawn on it",
    "cytology": "one cell centred and in focus",
}


def calibrate(logits: np.ndarray, temperature: float) -> np.ndarray:
    """[N, C] logits -> [N, C] probabilities, softmax(logits / T)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probs


def p_malignant(probs: np.ndarray, malignant: Sequence[bool]) -> np.ndarray:
    """[N, C] probabilities -> [N] summed probability of the malignant classes."""
    summed: np.ndarray = np.asarray(probs)[:, np.asarray(malignant, dtype=bool)].sum(axis=1)
    return summed


def aggregate(probs: np.ndarray, malignant: Sequence[bool], rule: str = "mean") -> np.ndarray:
    """[N, C] per-image probabilities of one case -> [C] case probabilities.

    ``mean`` averages the images; ``max_malignant`` takes the image with the highest P(malignant),
    so one suspicious view is never averaged away.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError("a case needs at least one image's probabilities, shaped [N, C]")
    if rule == "mean":
        result: np.ndarray = probs.mean(axis=0)
        return result
    if rule == "max_malignant":
        chosen: np.ndarray = probs[int(np.argmax(p_malignant(probs, malignant)))]
        return chosen
    raise ValueError(f"unknown aggregation rule {rule!r}; expected 'mean' or 'max_malignant'")


def probabilities(card: ModelCard, logits: np.ndarray) -> np.ndarray:
    """[N, C] raw model logits -> calibrated probabilities, softmax((logits + bias) / T) with the card's
    calibration (the bias undoes the class prior of balanced sampling; absent, it is zero)."""
    z = np.asarray(logits, dtype=np.float64)
    bias = card.calibration.logit_bias
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    return calibrate(z, card.calibration.temperature)


def retake_advice(card: ModelCard) -> str:
    return RETAKE.get(card.modality, "centred, in focus and evenly lit")


def out_of_domain_advice(card: ModelCard, reason: str) -> str:
    """What an indeterminate image's reader should do, by which out-of-domain test fired."""
    if reason == OTHER_KIND:
        return (
            f"Indeterminate: this does not look like {card.modality} images of the {card.organ}, the kind this "
            "model reads, so it gives no class and no risk level. Choose the model for this kind of image."
        )
    return (
        f"Indeterminate: this {card.modality} image is unlike the ones this model learnt from, so it gives no "
        f"class and no risk level. Retake it ({retake_advice(card)}), or judge the lesion clinically."
    )


def all_out_advice(card: ModelCard, reasons: list[str]) -> str:
    """The advice for a case none of whose images is in domain (one image: that image's own advice)."""
    if len(reasons) == 1:
        return out_of_domain_advice(card, reasons[0])
    if reasons and all(r == OTHER_KIND for r in reasons):
        return (
            f"Indeterminate: no image of this case looks like {card.modality} images of the {card.organ}, the kind "
            "this model reads, so it gives no class and no risk level. Choose the model for this kind of image."
        )
    return (
        "Indeterminate: no image of this case is like the ones this model learnt from, so it gives no class "
        f"and no risk level. Retake the images ({retake_advice(card)}), or judge the lesion clinically."
    )


@dataclass(frozen=True)
class Assessment:
    """Calibrated class probabilities and what the card's policy makes of them, stated once."""

    probabilities: dict[str, float]
    top_class: str
    top_class_name: str
    confidence: float
    p_malignant: float
    is_malignant: bool
    risk_level: RiskLevel
    recommendation: str
    domain: dict[str, Any] | None = None
    quality: list[dict[str, str]] = field(default_factory=list)
    note: str = ""
    also_consider: dict[str, Any] | None = None
    statement: str = ""

    @property
    def indeterminate(self) -> bool:
        return self.risk_level == RiskLevel.indeterminate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def statement_of(a: Assessment, score_label: str = "P(malignant)") -> str:
    """The one sentence a result is read as. Indeterminate: the advice alone, no class is named."""
    if a.risk_level == RiskLevel.indeterminate:
        return a.recommendation
    text = (
        f"Risk level {a.risk_level.value}: {a.recommendation} Most likely class: {a.top_class_name} "
        f"({a.confidence:.1%}); {score_label} {a.p_malignant:.2f}."
    )
    if a.also_consider:
        text += f" Also consider: {a.also_consider['name']} ({a.also_consider['reason']})."
    return text


def also_consider(card: ModelCard, probs: np.ndarray, top: int) -> dict[str, Any] | None:
    """The card's rebalanced class where it is not the most probable one (more than two classes only:
    with two, the rebalanced rule is the malignant call, which the risk level already states)."""
    if len(card.classes) <= 2 or card.decision.rule == "argmax":
        return None
    other = int(card.decision.top(probs[None, :])[0])
    if other == top:
        return None
    info = card.classes[other]
    return {"class_id": info.id, "name": info.name, "probability": float(probs[other]), "reason": RARE_CLASSES}


def decide(
    card: ModelCard,
    probs: np.ndarray,
    domain: DomainCheck | None = None,
    quality: list[QualityIssue] | None = None,
) -> Assessment:
    """[C] calibrated probabilities (with the image's domain check and quality issues) -> Assessment."""
    probs = np.asarray(probs, dtype=np.float64)
    classes = card.classes
    top = int(np.argmax(probs))
    p_mal = float(p_malignant(probs[None, :], [c.malignant for c in classes])[0])
    policy = card.risk_policy
    rule = policy.level_for(p_mal)
    in_domain = domain is None or domain.in_domain
    assessment = Assessment(
        probabilities={c.id: float(p) for c, p in zip(classes, probs, strict=True)},
        top_class=classes[top].id,
        top_class_name=classes[top].name,
        confidence=float(probs[top]),
        p_malignant=p_mal,
        is_malignant=in_domain and p_mal >= policy.malignant_threshold,
        risk_level=rule.level if in_domain else RiskLevel.indeterminate,
        recommendation=rule.recommendation if in_domain else out_of_domain_advice(card, domain_reason(domain)),
        domain=domain.to_dict() if domain is not None else None,
        quality=[issue.to_dict() for issue in quality or []],
        also_consider=also_consider(card, probs, top) if in_domain else None,
    )
    return replace(assessment, statement=statement_of(assessment, card.score_label))


def domain_reason(domain: DomainCheck | None) -> str:
    return domain.reason if domain is not None and not domain.in_domain else ""


def indeterminate_case(card: ModelCard, combined: Assessment, reasons: list[str], note: str) -> Assessment:
    """A case result none of whose images is in domain: no level, no call, advice by the images' reasons."""
    advice = all_out_advice(card, reasons)
    return replace(
        combined,
        risk_level=RiskLevel.indeterminate,
        recommendation=advice,
        is_malignant=False,
        also_consider=None,
        note=note,
        statement=advice,
    )


SUMMARY_COLUMNS = ("p_malignant",)


def probability_columns(class_ids: list[str]) -> dict[str, str]:
    """Class id -> its CSV column: ``p_<class>``, or ``p_class_<class>`` where that would repeat a summary
    column (breast-us has a class named ``malignant`` beside P(malignant), the ``p_malignant`` column)."""
    return {c: f"p_class_{c}" if f"p_{c}" in SUMMARY_COLUMNS else f"p_{c}" for c in class_ids}


@dataclass(frozen=True)
class ImageResult:
    index: int
    filename: str | None
    width: int
    height: int
    assessment: Assessment


@dataclass(frozen=True)
class CaseResult:
    model_id: str
    model_version: str
    images: list[ImageResult]
    aggregate: Assessment
    aggregation_rule: str
    disclaimer: str = DISCLAIMER
    timing_ms: dict[str, float] = field(default_factory=dict)


def case_result(
    package: ModelPackage,
    logits: np.ndarray,
    sizes: list[tuple[int, int]],
    filenames: list[str | None] | None = None,
    timing_ms: dict[str, float] | None = None,
    features: np.ndarray | None = None,
    stats: list[dict[str, float]] | None = None,
) -> CaseResult:
    """[N, C] logits of one case's images (with their (width, height)) -> CaseResult.

    With ``features`` [N, K, h, w], each image gets its out-of-domain check, and images out of domain
    are left out of the combined result (all out: the case is indeterminate). With ``stats`` (from
    ``domain.quality_stats``), each image gets its quality warnings.
    """
    probs = probabilities(package.card, logits)
    names = filenames or [None] * len(sizes)
    card = package.card
    rule = card.aggregation.rule
    checks = package.domain_checks(features) if features is not None else [None] * len(sizes)
    limits = package.quality_limits
    images = []
    for i, (w, h) in enumerate(sizes):
        issues = limits.check(stats[i], w, h) if limits is not None and stats is not None else []
        images.append(ImageResult(i, names[i], w, h, decide(card, probs[i], checks[i], issues)))
    kept = [i for i, check in enumerate(checks) if check is None or check.in_domain]
    combined = decide(card, aggregate(probs[kept] if kept else probs, package.malignant, rule))
    if not kept:
        reasons = [check.reason for check in checks if check is not None]
        note = f"all {len(sizes)} image(s) are out of the model's domain"
        combined = indeterminate_case(card, combined, reasons, note)
    elif len(kept) < len(sizes):
        left_out = ", ".join(str(i + 1) for i in range(len(sizes)) if i not in kept)
        combined = replace(
            combined, note=f"image(s) {left_out} out of the model's domain: left out of the combined result"
        )
    return CaseResult(
        model_id=package.id,
        model_version=package.version,
        images=images,
        aggregate=combined,
        aggregation_rule=rule,
        timing_ms=timing_ms or {},
    )
