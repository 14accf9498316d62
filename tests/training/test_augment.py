"""Colour augmentation: the per-channel cast moves the channels apart, and is off by default."""

import pytest

torch = pytest.importorskip("torch")

from oncolens.training.augment import augment, to_input  # noqa: E402
from oncolens.training.recipe import AugmentConfig  # noqa: E402
from oncolens.zoo.preprocess import InputSpec  # noqa: E402

SPEC = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash", False)
STILL = {"hflip": False, "vflip": False, "rotate_deg": 0.0, "scale_min": 1.0, "scale_max": 1.0, "translate": 0.0}
GREY = torch.full((64, 32, 32, 3), 128, dtype=torch.uint8)  # mid-grey: any channel difference is the cast's


def test_without_a_cast_a_grey_image_stays_grey_and_the_random_stream_is_unchanged() -> None:
    cfg = AugmentConfig(**STILL, brightness=0.2, contrast=0.2, saturation=0.2)
    out = augment(GREY, cfg, SPEC, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    again = augment(GREY, AugmentConfig(**STILL, colour_cast=0.0), SPEC, torch.Generator().manual_seed(0))
    plain = augment(GREY, AugmentConfig(**STILL), SPEC, torch.Generator().manual_seed(0))
    assert torch.equal(again, plain)


def test_a_colour_cast_scales_each_channel_by_its_own_gain_within_the_range() -> None:
    cfg = AugmentConfig(**STILL, brightness=0.0, contrast=0.0, saturation=0.0, colour_cast=0.1)
    out = augment(GREY, cfg, SPEC, torch.Generator().manual_seed(0))
    pixels = out * 0.5 + 0.5  # back to [0, 1]
    gains = pixels.mean(dim=(2, 3)) / (128 / 255)  # [N, 3], one gain per image and channel
    assert gains.min() >= 0.9 - 1e-5 and gains.max() <= 1.1 + 1e-5
    assert (gains.max(dim=1).values - gains.min(dim=1).values).mean() > 0.03  # channels moved apart
    assert torch.allclose(pixels, pixels[:, :, :1, :1].expand_as(pixels), atol=1e-6)  # uniform per channel
    assert not torch.equal(out, to_input(GREY, SPEC))
