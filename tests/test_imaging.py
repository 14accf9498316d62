import base64
import io

import numpy as np
import pytest
from PIL import Image

from oncolens.vision.decode import (
    EmptyImage,
    ImageTooLarge,
    InvalidBase64,
    NotAnImage,
    TruncatedImage,
    UnsupportedFormat,
    decode_base64,
    decode_image,
    sniff_format,
)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF", "WEBP"])
def test_every_supported_format_decodes_to_rgb(fmt: str) -> None:
    data = encode(Image.new("RGB", (40, 30), (200, 40, 10)), fmt)
    decoded = decode_image(data)
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
    r, g, b = decoded.image.getpixel((20, 15))  # type: ignore[misc]
    assert abs(r - 200) < 8 and abs(g - 40) < 8 and abs(b - 10) < 8


def test_format_is_sniffed_from_bytes_not_the_name() -> None:
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    assert sniff_format(png) == "PNG"
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"just some text") is None


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes())).image
    assert decoded.size == (20, 60)
    # after a 90 degree clockwise turn the left strip is at the top
    assert decoded.getpixel((10, 2))[0] > 200  # type: ignore[index]
    assert decoded.getpixel((10, 57))[0] < 50  # type: ignore[index]


@pytest.mark.parametrize(
    ("mode", "colour"),
    [("L", 128), ("LA", (128, 255)), ("RGBA", (10, 20, 30, 255)), ("CMYK", (0, 255, 255, 0)), ("P", 3), ("1", 1)],
)
def test_other_modes_are_converted_to_rgb(mode: str, colour: object) -> None:
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "1" else "PNG")
    decoded = decode_image(encode(Image.new(mode, (16, 16), colour), fmt))  # type: ignore[arg-type]
    assert decoded.image.mode == "RGB" and decoded.original_mode == mode


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.full((10, 10), 40000, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"))
    assert decoded.image.getpixel((5, 5)) == (156, 156, 156)  # 40000 / 257


def test_transparent_pixels_become_black() -> None:
    image = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    assert decode_image(encode(image, "PNG")).image.getpixel((5, 5)) == (0, 0, 0)


def test_empty_bytes_are_rejected_with_400() -> None:
    with pytest.raises(EmptyImage, match="empty") as info:
        decode_image(b"")
    assert info.value.status == 400


def test_text_is_not_an_image_415() -> None:
    with pytest.raises(NotAnImage, match="not an image") as info:
        decode_image(b"name,age\nalice,40\n")
    assert info.value.status == 415


def test_truncated_jpeg_is_rejected_with_400() -> None:
    data = encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    with pytest.raises(TruncatedImage, match="truncated") as info:
        decode_image(data[: len(data) // 2])
    assert info.value.status == 400


def test_gif_is_an_unsupported_format_415() -> None:
    with pytest.raises(UnsupportedFormat, match="GIF images are not supported") as info:
        decode_image(encode(Image.new("P", (8, 8)), "GIF"))
    assert info.value.status == 415


def test_too_many_bytes_is_413() -> None:
    data = encode(Image.new("RGB", (64, 64)), "BMP")
    with pytest.raises(ImageTooLarge, match="over the") as info:
        decode_image(data, max_bytes=1000)
    assert info.value.status == 413


def test_decompression_bomb_is_rejected_from_the_header() -> None:
    # One colour compresses to a small PNG that would be 50 MP (or 400 MP) once decoded.
    data = encode(Image.new("1", (10000, 5000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match=r"10000x5000 = 50\.0 MP, over the 40 MP limit") as info:
        decode_image(data)
    assert info.value.status == 413
    with pytest.raises(ImageTooLarge, match="over the 40 MP limit"):
        decode_image(encode(Image.new("1", (20000, 20000)), "PNG"))


def test_base64_with_and_without_data_uri() -> None:
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    text = base64.b64encode(png).decode()
    assert decode_base64(text, 10**6) == png
    assert decode_base64("data:image/png;base64," + text, 10**6) == png
    assert decode_base64(text.rstrip("="), 10**6) == png  # missing padding is tolerated
    with pytest.raises(InvalidBase64, match="not valid base64"):
        decode_base64("@@@@", 10**6)
    with pytest.raises(EmptyImage):
        decode_base64("data:image/png;base64,", 10**6)
    with pytest.raises(ImageTooLarge):
        decode_base64("A" * 4000, 100)
