"""One decoder for every entry point: bytes (or base64) -> a checked RGB PIL image.

The format is sniffed from the bytes, never from a filename or content type. Size limits are
checked before any pixel is decoded, so a decompression bomb costs only its header.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "DICOM")
ACCEPTED = "JPEG, PNG, BMP, TIFF, WebP or DICOM"
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.-]+)*?;base64,", re.IGNORECASE)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. ``status`` is the HTTP status the API answers with."""

    status = 400


class EmptyImage(ImageDecodeError):
    status = 400


class InvalidBase64(ImageDecodeError):
    status = 400


class TruncatedImage(ImageDecodeError):
    status = 400


class NotAnImage(ImageDecodeError):
    status = 415


class UnsupportedFormat(ImageDecodeError):
    status = 415


class ImageTooLarge(ImageDecodeError):
    status = 413


class WrongModality(ImageDecodeError):
    """The image is readable but plainly not the kind the chosen model reads (colour vs greyscale)."""

    status = 422


def coloured_fraction(image: Image.Image) -> float:
    """Share of pixels with clearly visible colour (HSV saturation > 0.2, not near black).

    Measured on a thumbnail. B-mode ultrasound frames score 0 (up to ~0.02 with a Doppler box);
    dermoscopy, cytology and clinical photos almost always well above 0.001.
    """
    scale = min(1.0, 256 / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # resize() reads the full image once and makes only the small copy (thumbnail() would need a copy).
    thumb = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0) if scale < 1 else image
    rgb = np.asarray(thumb.convert("RGB") if thumb.mode != "RGB" else thumb)
    # In integers, channel by channel (16 times faster than float reductions over the colour axis):
    # saturation (high - low) / high > 0.2  <=>  5 (high - low) > high;  high / 255 > 0.05  <=>  high >= 13.
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(red, green), blue).astype(np.int16)
    low = np.minimum(np.minimum(red, green), blue).astype(np.int16)
    return float(((high >= 13) & (5 * (high - low) > high)).mean())


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image plus what the decoder saw: the sniffed format and the original mode/size."""

    image: Image.Image
    format: str
    original_mode: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """The container format from the leading bytes (magic numbers), or None if unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"BM") and len(data) > 14:
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "DICOM"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    if data.startswith(b"%PDF"):
        return "PDF"
    return None


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Base64 text, with or without a ``data:image/...;base64,`` prefix -> bytes."""
    text = text.strip()
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end() :]
    elif text.startswith("data:"):
        raise InvalidBase64("a data URI must be base64 encoded (data:image/png;base64,...)")
    text = re.sub(r"\s+", "", text)
    if not text:
        raise EmptyImage("the image is empty: no base64 data was sent")
    if len(text) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"the image is larger than the {_mb(max_bytes)} limit")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"the image is not valid base64: {exc}") from exc


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n} bytes"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; 16-bit and float data are scaled to their range first."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = values / 257.0
        else:
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent areas become black, the background of most medical images.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_bytes: int = 20 * 1024 * 1024, max_pixels: int = 40_000_000) -> DecodedImage:
    """Raw bytes -> RGB image with EXIF orientation applied; raises an ImageDecodeError subclass."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {_mb(len(data))}, over the {_mb(max_bytes)} limit")
    kind = sniff_format(data)
    if kind is None:
        raise NotAnImage(f"the file is not an image OncoLens can read (expected {ACCEPTED})")
    if kind not in SUPPORTED_FORMATS:
        raise UnsupportedFormat(f"{kind} images are not supported; send {ACCEPTED}")
    if kind == "DICOM":
        return decode_dicom(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} = {width * height / 1e6:.1f} MP, "
                    f"over the {max_pixels / 1e6:.0f} MP limit"
                )
            if width == 0 or height == 0:
                raise NotAnImage("the image has no pixels (0 width or height)")
            original_mode = image.mode
            image.load()
            # In place: a transposed copy of a 40 MP image would cost another 120 MB.
            ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image is over the {max_pixels / 1e6:.0f} MP limit ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage(f"the file looks like {kind} but cannot be read as one") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated", ...), and a
        # malformed header as whatever its parser trips on (struct.error, IndexError, ...): all the
        # client's bytes, so all a 400.
        raise TruncatedImage(f"the {kind} image is truncated or corrupt: {exc}") from exc
    return DecodedImage(rgb, kind, original_mode, rgb.width, rgb.height)


def _window(values: np.ndarray, center: float | None, width: float | None) -> np.ndarray:
    """Grey values -> [0, 1]: the DICOM linear VOI window when given, else the image's own range."""
    if center is not None and width is not None and width >= 1:
        return np.clip((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _first(value: Any) -> float | None:
    """A DICOM number, or the first of a multi-valued one (WindowCenter can hold several)."""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _can_decode(syntax: Any) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    """A DICOM file (Part 10, with preamble) -> RGB of its first frame; see ``_decode_dicom``.

    pydicom parses lazily and raises many kinds of exception on malformed input (NotImplementedError
    for an unknown VR, BytesLengthException, ...): every one of them is the file's fault, so a 400.
    """
    try:
        return _decode_dicom(data, max_pixels)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:
        raise TruncatedImage(f"the DICOM file cannot be read: {type(exc).__name__}: {exc}") from exc


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    """A DICOM file (Part 10, with preamble) -> RGB of its first frame.

    Uncompressed and RLE pixel data, and the JPEG syntaxes Pillow decodes, are read with pydicom's
    own handlers. Grey images get the modality rescale, then the file's VOI window (centre/width)
    where it has one or else their own range; MONOCHROME1 is inverted so that bright means dense
    as in MONOCHROME2. Colour (RGB, YBR, palette) comes out as 8-bit RGB.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels.utils import pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise TruncatedImage(f"the DICOM file cannot be read: {exc}") from exc
    if "PixelData" not in ds:
        raise NotAnImage("the DICOM file holds no image (it has no Pixel Data), e.g. a structured report")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise TruncatedImage("the DICOM file lacks Rows/Columns") from exc
    if rows * cols > max_pixels:
        raise ImageTooLarge(
            f"the image is {cols}x{rows} = {rows * cols / 1e6:.1f} MP, over the {max_pixels / 1e6:.0f} MP limit"
        )
    if rows == 0 or cols == 0:
        raise NotAnImage("the image has no pixels (0 width or height)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if syntax is not None and getattr(syntax, "is_compressed", False) and not _can_decode(syntax):
        raise UnsupportedFormat(
            f"DICOM pixel data in transfer syntax {syntax.name} cannot be decoded here; "
            "send it uncompressed (Explicit VR Little Endian), RLE or baseline JPEG"
        )
    try:
        pixels = pixel_array(ds, index=0 if frames > 1 else None)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise TruncatedImage(f"the DICOM pixel data is truncated or corrupt: {exc}") from exc
    try:
        rgb = _dicom_rgb(ds, np.asarray(pixels), photometric)
    except ImageDecodeError:
        raise
    except (ValueError, KeyError, AttributeError, TypeError, IndexError) as exc:
        # e.g. PALETTE COLOR without its lookup tables, or a rescale/window tag that is not a number
        raise TruncatedImage(f"the DICOM image cannot be rendered ({photometric}): {exc}") from exc
    image = Image.fromarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8), "RGB")
    return DecodedImage(image, "DICOM", photometric, image.width, image.height)


def _dicom_rgb(ds: Any, values: np.ndarray, photometric: str) -> np.ndarray:
    """A DICOM frame's pixel values -> [H, W, 3] floats in [0, 1] by its photometric interpretation."""
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

    if photometric == "PALETTE COLOR":
        return _window(np.asarray(apply_color_lut(values, ds), dtype=np.float64), None, None)
    if values.ndim == 3 and values.shape[-1] == 3:
        bits = int(ds.get("BitsStored", 8) or 8)
        return values.astype(np.float64) / float(2**bits - 1) if bits > 8 else values.astype(np.float64) / 255.0
    if values.ndim == 2:
        grey = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
        grey = _window(grey, _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth")))
        if photometric == "MONOCHROME1":
            grey = 1.0 - grey
        return np.stack([grey] * 3, axis=-1)
    raise UnsupportedFormat(f"DICOM pixel data of shape {values.shape} ({photometric}) is not a 2-D image")


def image_pixels(data: bytes) -> int:
    """Width x height from the header alone (no pixel is decoded); 0 when the header cannot be read.

    Used to refuse a request whose images together are too large before any of them is decoded;
    an unreadable image is left for ``decode_image`` to report.
    """
    kind = sniff_format(data)
    try:
        if kind == "DICOM":
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(ds.Rows) * int(ds.Columns)
        if kind in SUPPORTED_FORMATS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                width, height = Image.open(io.BytesIO(data), formats=[kind]).size
            return int(width) * int(height)
    except Exception:  # any unreadable header: decode_image gives the precise error
        return 0
    return 0
