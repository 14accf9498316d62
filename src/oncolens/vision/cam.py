"""Heat-maps: a class-activation map mapped back onto the original image, as PNG images.

Maps are drawn at display size (at most ``DISPLAY_MAX_SIDE`` pixels on the long side, the aspect
ratio of the original kept) in float32, so their cost does not grow with the upload's resolution.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from oncolens.zoo.preprocess import InputSpec

if TYPE_CHECKING:
    from oncolens.zoo.package import ModelPackage

# Anchor colours of a perceptually ordered blue -> cyan -> yellow -> red map (like "turbo"/"jet").
_ANCHORS = np.array(
    [
        [48, 18, 59],
        [40, 120, 230],
        [30, 200, 200],
        [120, 240, 90],
        [250, 200, 40],
        [230, 80, 20],
        [122, 4, 3],
    ],
    dtype=np.float32,
)

DISPLAY_MAX_SIDE = 1024


def display_size(width: int, height: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(width, height) scaled down so that the long side is at most ``max_side`` (never up)."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def display_image(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> Image.Image:
    """The image at display size (the same object when it is already small enough)."""
    size = display_size(image.width, image.height, max_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _resize_float(values: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _interpolation_matrix(cells: int, size: int, offset: float) -> np.ndarray:
    """[size, cells] linear weights: output pixel u samples the map where cell j sits at
    ``(j + 0.5) * size / cells + offset`` (clamped at the edges)."""
    stride = size / cells
    position = (np.arange(size) + 0.5 - offset) / stride - 0.5
    position = np.clip(position, 0.0, cells - 1.0)
    low = np.floor(position).astype(int).clip(0, max(cells - 2, 0))
    frac = position - low
    weights = np.zeros((size, cells), dtype=np.float32)
    rows = np.arange(size)
    weights[rows, low] += 1.0 - frac
    if cells > 1:
        weights[rows, low + 1] += frac
    return weights


def upsample_cam(cam: np.ndarray, size: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """[h, w] CAM -> [size, size] in model-input pixels, bilinear.

    ``offset`` (dy, dx) is where the network's feature cells really sit relative to the evenly
    spaced grid, in input pixels (the card's ``input.feature_offset_px``): symmetric padding in
    stride-2 layers moves every cell up-left by (stride/2 - 0.5) px, mirrored for flipped views.
    """
    rows = _interpolation_matrix(cam.shape[0], size, offset[0])
    cols = _interpolation_matrix(cam.shape[1], size, offset[1])
    upsampled: np.ndarray = rows @ cam.astype(np.float32) @ cols.T
    return upsampled


def cam_on_image(
    cam: np.ndarray, spec: InputSpec, width: int, height: int, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """[h, w] CAM in model-input space -> [height, width] map aligned with the original image.

    Inverts the card's resize rule: a stretch for ``squash``; for ``center_crop`` the map covers
    only the cropped centre (zero outside); for ``pad`` the letterbox bars are cut away.
    """
    size = spec.size
    square = upsample_cam(cam, size, offset)
    if spec.resize == "squash":
        out = _resize_float(square, width, height)
    elif spec.resize == "center_crop":
        scale = size / min(width, height)
        crop_w, crop_h = round(size / scale), round(size / scale)
        out = np.zeros((height, width), dtype=np.float32)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        out[top : top + crop_h, left : left + crop_w] = _resize_float(square, crop_w, crop_h)
    else:
        side = max(width, height)
        full = _resize_float(square, side, side)
        left, top = (side - width) // 2, (side - height) // 2
        out = full[top : top + height, left : left + width]
    clipped: np.ndarray = np.clip(out, 0.0, 1.0)
    return clipped


def _colour_table() -> np.ndarray:
    """[256, 3] uint8: the anchor colours interpolated at 256 evenly spaced heat values."""
    position = np.linspace(0.0, len(_ANCHORS) - 1, 256, dtype=np.float32)
    low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (position - low)[:, None]
    table: np.ndarray = (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).round().astype(np.uint8)
    return table


_COLOURS = _colour_table()


def colorize(heat: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> [H, W, 3] uint8 colours (cold blue to hot red), by a 256-entry table."""
    levels = (np.clip(heat, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
    rgb: np.ndarray = _COLOURS[levels]
    return rgb


def overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend the coloured heat-map over the RGB image, more opaque where the map is hotter."""
    base = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.float32)
    alpha = (np.float32(opacity) * (np.float32(0.35) + np.float32(0.65) * heat.astype(np.float32)))[..., None]
    blended: np.ndarray = (base * (1 - alpha) + colorize(heat) * alpha).round().astype(np.uint8)
    return blended


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def class_activation_map(features: np.ndarray, weight: np.ndarray, class_index: int) -> np.ndarray:
    """[K, h, w] features and [C, K] head weights -> [h, w] CAM of one class, scaled to [0, 1].

    Exact for a global-average-pool + linear head: the class logit is the mean of this map plus
    the bias. Negative evidence is clipped to 0.
    """
    cam = np.tensordot(weight[class_index].astype(np.float64), features.astype(np.float64), axes=1)
    cam = np.maximum(cam, 0.0)
    peak = cam.max()
    scaled: np.ndarray = cam / peak if peak > 0 else cam
    return scaled


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

    The maps are drawn at display size (``DISPLAY_MAX_SIDE``); ``peak_xy`` is in the pixels
    of the original image, whose (width, height) is ``original_size`` (default: ``image``'s own).
    """
    image = display_image(image)
    ids = package.class_ids
    if class_id is None:
        logits = features.mean(axis=(1, 2)) @ package.head_weight.T
        index = int(np.argmax(logits))
    elif class_id in ids:
        index = ids.index(class_id)
    else:
        raise KeyError(f"unknown class {class_id!r}; this model's classes are {ids}")
    cam = class_activation_map(features, package.head_weight, index)
    heat = cam_on_image(cam, package.input_spec, image.width, image.height, package.feature_offset)
    peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    width, height = original_size or (image.width, image.height)
    peak = (
        min(width - 1, int((int(peak_x) + 0.5) * width / image.width)),
        min(height - 1, int((int(peak_y) + 0.5) * height / image.height)),
    )
    return Explanation(
        class_id=ids[index],
        heatmap_png=png_bytes(colorize(heat)),
        overlay_png=png_bytes(overlay(image, heat)),
        peak_xy=peak,
    )
