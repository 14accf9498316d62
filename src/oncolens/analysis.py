"""The one predict path: model outputs for a case's images -> per-image and aggregated results.

API, CLI, web pages and reports all build their answers from these dataclasses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from oncolens import explain
from oncolens.config import Settings
from oncolens.decision import Assessment, decide, indeterminate_case
from oncolens.domain import quality_stats
from oncolens.imaging import (
    DecodedImage,
    ImageDecodeError,
    ImageTooLarge,
    WrongModality,
    coloured_fraction,
    decode_image,
    image_pixels,
)
from oncolens.inference import aggregate, class_activation_map
from oncolens.zoo.package import ModelPackage
from oncolens.zoo.preprocess import model_pixels, normalize

DISCLAIMER = (
    "Decision support only, not a diagnosis. A qualified clinician must interpret this result "
    "together with the patient's history and examination."
)


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
    probs = package.probabilities(logits)
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


@dataclass(frozen=True)
class Explanation:
    class_id: str
    heatmap_png: bytes
    overlay_png: bytes
    peak_xy: tuple[int, int]


def explanation(
    package: ModelPackage,
    image: Image.Image,
    features: np.ndarray,
    class_id: str | None = None,
    original_size: tuple[int, int] | None = None,
) -> Explanation:
    """Heat-map and overlay PNGs of ``class_id`` for one image's features. Every edge passes the class
    the result names (``decision.decide``); without one, the head's arg-max on these features is drawn.

    The maps are drawn at display size (``explain.DISPLAY_MAX_SIDE``); ``peak_xy`` is in the pixels
    of the original image, whose (width, height) is ``original_size`` (default: ``image``'s own).
    """
    image = explain.display_image(image)
    ids = package.class_ids
    if class_id is None:
        logits = features.mean(axis=(1, 2)) @ package.head_weight.T
        index = int(np.argmax(logits))
    elif class_id in ids:
        index = ids.index(class_id)
    else:
        raise KeyError(f"unknown class {class_id!r}; this model's classes are {ids}")
    cam = class_activation_map(features, package.head_weight, index)
    heat = explain.cam_on_image(cam, package.input_spec, image.width, image.height, package.feature_offset)
    peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    width, height = original_size or (image.width, image.height)
    peak = (
        min(width - 1, int((int(peak_x) + 0.5) * width / image.width)),
        min(height - 1, int((int(peak_y) + 0.5) * height / image.height)),
    )
    return Explanation(
        class_id=ids[index],
        heatmap_png=explain.png_bytes(explain.colorize(heat)),
        overlay_png=explain.png_bytes(explain.overlay(image, heat)),
        peak_xy=peak,
    )


@dataclass(frozen=True)
class RawImage:
    """Image bytes as received, with the client's file name (a label only, never a path)."""

    data: bytes
    filename: str | None


def name_image(index: int, filename: str | None, total: int) -> str:
    """ "image 2 (b.png): " to prefix an error about one of several images ("" for a single one)."""
    if total == 1:
        return ""
    return f"image {index + 1}" + (f" ({filename})" if filename else "") + ": "


@dataclass(frozen=True)
class PreparedImages:
    """Decoded images and the model input made from them, plus how long that took."""

    decoded: list[DecodedImage]
    filenames: list[str | None]
    inputs: np.ndarray
    decode_ms: float
    stats: list[dict[str, float]] = field(default_factory=list)  # quality_stats of each model input


GREY_MODEL_MAX_COLOUR = 0.25
COLOUR_MODEL_MIN_COLOUR = 0.0005


def with_article(noun: str) -> str:
    """``a cytology`` / ``an ultrasound``: the indefinite article by the first letter's sound (vowel)."""
    return ("an " if noun[:1].lower() in "aeiou" and noun else "a ") + noun


def check_modality(image: Image.Image, model: ModelPackage) -> None:
    """Refuse an image that is plainly not the model's kind: a colour photo sent to an ultrasound
    (greyscale-input) model, or a colourless greyscale image sent to a colour-photo model."""
    modality = model.card.modality or "its"
    share = coloured_fraction(image)
    if model.input_spec.grayscale and share > GREY_MODEL_MAX_COLOUR:
        raise WrongModality(
            f"this looks like a colour photograph ({share:.0%} of its pixels are clearly coloured), not "
            f"{with_article(modality)} image; {model.id} reads greyscale {modality} frames - choose the model for "
            "this kind of image"
        )
    if not model.input_spec.grayscale and share < COLOUR_MODEL_MIN_COLOUR:
        raise WrongModality(
            f"this is a greyscale image with no colour at all; {model.id} expects a colour {modality} image "
            "(for an ultrasound frame choose an ultrasound model)"
        )


def check_request_size(raw: list[RawImage], settings: Settings) -> None:
    """Refuse (413) a request whose images together hold more bytes or pixels than its limits.

    Pixels are read from the headers before any pixel is decoded, so the refusal costs almost nothing.
    """
    size = sum(len(image.data) for image in raw)
    if size > settings.max_request_bytes:
        raise ImageTooLarge(
            f"the {len(raw)} images are {size / 2**20:.1f} MB together, over the limit of "
            f"{settings.max_request_bytes / 2**20:.0f} MB per request; send fewer or smaller images"
        )
    total = sum(image_pixels(image.data) for image in raw)
    if total > settings.max_request_pixels:
        raise ImageTooLarge(
            f"the {len(raw)} images hold {total / 1e6:.1f} MP together, over the limit of "
            f"{settings.max_request_pixels / 1e6:.0f} MP per request; send fewer or smaller images"
        )


def prepare(raw: list[RawImage], model: ModelPackage, settings: Settings) -> PreparedImages:
    """Decode every image (naming the one that fails), check it suits the model, make the model input.

    One image at a time: its model input and a display-size copy (for heat-maps) are kept and the
    full-resolution pixels are dropped before the next image is decoded, so memory does not grow
    with the resolution or the number of the uploads.
    """
    start = time.perf_counter()
    check_request_size(raw, settings)
    decoded, pixels = [], []
    for index, image in enumerate(raw):
        try:
            one = decode_image(image.data, settings.max_image_bytes, settings.max_image_pixels)
            check_modality(one.image, model)
        except ImageDecodeError as exc:
            raise type(exc)(name_image(index, image.filename, len(raw)) + str(exc)) from exc
        pixels.append(model_pixels(one.image, model.input_spec))
        decoded.append(replace(one, image=explain.display_image(one.image)))
        del one
    block = np.stack(pixels)
    measured = quality_stats(block)
    stats = [{key: float(values[i]) for key, values in measured.items()} for i in range(len(block))]
    decode_ms = (time.perf_counter() - start) * 1000
    return PreparedImages(decoded, [r.filename for r in raw], normalize(block, model.input_spec), decode_ms, stats)
