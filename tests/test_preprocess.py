import numpy as np
import pytest
from PIL import Image

from oncolens.zoo.preprocess import InputSpec, normalize, preprocess, resize_rgb


def test_resize_rules_give_square_outputs_and_keep_content_where_expected() -> None:
    # A 200x100 image: left half red, right half blue.
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100, 0] = 255
    pixels[:, 100:, 2] = 255
    image = Image.fromarray(pixels)
    squash = resize_rgb(image, 64, "squash")
    crop = resize_rgb(image, 64, "center_crop")
    pad = resize_rgb(image, 64, "pad")
    assert squash.shape == crop.shape == pad.shape == (64, 64, 3)
    assert squash[32, 2, 0] == 255 and squash[32, 61, 2] == 255
    # the centre crop of a 128x64 resize keeps the middle: red on the left, blue on the right
    assert crop[32, 2, 0] == 255 and crop[32, 61, 2] == 255
    # letterboxing leaves black bars above and below
    assert pad[2, 32].tolist() == [0, 0, 0] and pad[32, 2, 0] == 255


def test_normalize_applies_mean_and_std_in_nchw() -> None:
    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    pixels = np.full((1, 32, 32, 3), 255, np.uint8)
    x = normalize(pixels, spec)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([2.0, 1.0, 0.5])


def test_preprocess_converts_grayscale_to_rgb() -> None:
    spec = InputSpec(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x = preprocess([Image.new("L", (40, 20), 128)], spec)
    assert x.shape == (1, 3, 32, 32)
    assert np.allclose(x, 128 / 255, atol=1e-6)


def test_unknown_resize_rule_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown resize rule"):
        InputSpec(64, (0.5,) * 3, (0.5,) * 3, "stretch")  # type: ignore[arg-type]


def test_grayscale_spec_feeds_the_same_luma_to_every_channel_and_round_trips() -> None:
    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad", grayscale=True)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert InputSpec.from_dict({"size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}).grayscale is False
    image = Image.new("RGB", (40, 20), (200, 30, 90))
    x = preprocess([image], spec)
    assert x.shape == (1, 3, 32, 32)
    assert np.array_equal(x[0, 0], x[0, 1]) and np.array_equal(x[0, 1], x[0, 2])
    luma = round(200 * 0.299 + 30 * 0.587 + 90 * 0.114)
    assert x[0, 0, 16, 16] == pytest.approx((luma / 255 - 0.5) / 0.5, abs=1e-6)
    # letterbox bars stay black
    assert x[0, 0, 0, 16] == pytest.approx(-1.0)
