"""Fuzzing the one decoder: whatever bytes arrive, only a typed 4xx ImageDecodeError may escape.

Hypothesis mutates valid files of every accepted format (bit flips, truncation, insertion, header
splices) and also sends arbitrary bytes behind each format's magic number. Bounded in examples and
time so that it fits in CI; ``ONCOLENS_FUZZ_EXAMPLES`` raises the count for a longer local run.
"""

import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from oncolens.vision.decode import ImageDecodeError, decode_base64, decode_image
from tests.test_dicom import dicom, ramp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF we feed it
EXAMPLES = int(os.environ.get("ONCOLENS_FUZZ_EXAMPLES", "150"))
LIMITS = {"max_bytes": 2_000_000, "max_pixels": 4_000_000}


def _encoded(kind: str, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


SEEDS = {
    "jpeg": _encoded("JPEG"),
    "png": _encoded("PNG"),
    "png-rgba": _encoded("PNG", "RGBA"),
    "png-palette": _encoded("PNG", "P"),
    "bmp": _encoded("BMP"),
    "tiff": _encoded("TIFF"),
    "webp": _encoded("WEBP"),
    "dicom-grey": dicom(ramp(16, 16), "MONOCHROME2", bits=12, WindowCenter=2048, WindowWidth=4096),
    "dicom-rgb": dicom(np.zeros((8, 8, 3), np.uint8), "RGB"),
    "dicom-rle": dicom(ramp(16, 16), "MONOCHROME2", bits=12, syntax="rle"),
}


def _mutate(data: bytes, operations: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flips a byte, 1 truncates, 2 inserts, 3 deletes a run."""
    buffer = bytearray(data)
    for kind, position, value in operations:
        if not buffer:
            break
        at = position % len(buffer)
        if kind == 0:
            buffer[at] ^= value or 1
        elif kind == 1:
            del buffer[max(at, 1) :]
        elif kind == 2:
            buffer[at:at] = bytes([value]) * (1 + value % 64)
        else:
            del buffer[at : at + 1 + value % 32]
    return bytes(buffer)


def _decode_or_typed_error(data: bytes) -> None:
    try:
        decoded = decode_image(data, **LIMITS)
    except ImageDecodeError as exc:
        assert 400 <= exc.status < 500, f"{type(exc).__name__} carries status {exc.status}"
        assert str(exc), "every refusal says what is wrong"
        return
    assert decoded.image.mode == "RGB" and decoded.image.width * decoded.image.height > 0


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_every_seed_decodes(seed: str) -> None:
    decoded = decode_image(SEEDS[seed], **LIMITS)
    assert decoded.image.mode == "RGB"


operations = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=6)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(seed=st.sampled_from(sorted(SEEDS)), edits=operations)
def test_mutated_files_only_raise_typed_4xx_errors(seed: str, edits: list[tuple[int, int, int]]) -> None:
    _decode_or_typed_error(_mutate(SEEDS[seed], edits))


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(seed=st.sampled_from(sorted(SEEDS)), tail=st.binary(max_size=512))
def test_a_real_header_with_random_content_only_raises_typed_4xx_errors(seed: str, tail: bytes) -> None:
    header = SEEDS[seed][: 140 if seed.startswith("dicom") else 16]
    _decode_or_typed_error(header + tail)


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(text=st.text(max_size=200))
def test_base64_text_only_raises_typed_4xx_errors(text: str) -> None:
    try:
        data = decode_base64(text, LIMITS["max_bytes"])
    except ImageDecodeError as exc:
        assert 400 <= exc.status < 500
        return
    _decode_or_typed_error(data)
