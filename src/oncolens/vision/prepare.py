"""Image bytes -> model input: decode each image (naming the one that fails), refuse what is plainly
another modality or too large, and make the normalised block the model runs on, with its quality
measures and a display-size copy of each image for heat-maps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from oncolens.config import Settings
from oncolens.vision.cam import display_image
from oncolens.vision.decode import (
    DecodedImage,
    ImageDecodeError,
    ImageTooLarge,
    WrongModality,
    coloured_fraction,
    decode_image,
    image_pixels,
)
from oncolens.vision.domain import quality_stats
from oncolens.zoo.package import ModelPackage
from oncolens.zoo.preprocess import model_pixels, normalize


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
        decoded.append(replace(one, image=display_image(one.image)))
        del one
    block = np.stack(pixels)
    measured = quality_stats(block)
    stats = [{key: float(values[i]) for key, values in measured.items()} for i in range(len(block))]
    decode_ms = (time.perf_counter() - start) * 1000
    return PreparedImages(decoded, [r.filename for r in raw], normalize(block, model.input_spec), decode_ms, stats)
