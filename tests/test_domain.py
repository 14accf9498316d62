"""The out-of-domain score and the image-quality checks on generated data (NumPy only)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from oncolens.vision.domain import (
    DomainModel,
    LinearDetector,
    QualityLimits,
    quality_stats,
    root_features,
    threshold_for,
)


def cluster(rng: np.random.Generator, n: int, k: int = 40, shift: float = 0.0) -> np.ndarray:
    """[N, K, 1, 1] non-negative 'feature maps' around a common profile (shifted for another domain)."""
    base = np.linspace(0.5, 2.0, k)
    values = np.abs(base + shift + rng.normal(0, 0.3, size=(n, k)))
    return values[:, :, None, None]


def pooled_of(maps: np.ndarray) -> np.ndarray:
    return maps.mean(axis=(2, 3))


def test_in_domain_distances_are_near_one_and_another_domain_far_above() -> None:
    rng = np.random.default_rng(0)
    model = DomainModel.fit(pooled_of(cluster(rng, 300)), dims=8)
    own = model.distance(pooled_of(cluster(rng, 200)))
    other_features = pooled_of(cluster(rng, 200, shift=1.5))
    assert 0.7 < float(np.median(own)) < 1.5
    threshold = threshold_for(own, 0.95)
    assert (own <= threshold).mean() >= 0.95
    # the score is the distance over its threshold: out of domain above 1
    scored = replace(model, distance_threshold=threshold)
    assert (scored.score(other_features) > 1).mean() == 1.0


def test_the_other_domain_detector_catches_a_domain_close_in_distance() -> None:
    rng = np.random.default_rng(3)
    own_train, near_train = pooled_of(cluster(rng, 300)), pooled_of(cluster(rng, 300, shift=0.25))
    model = DomainModel.fit(own_train, dims=8)
    x = root_features(np.concatenate([own_train, near_train]))
    detector = LinearDetector.fit(x, np.r_[np.zeros(300), np.ones(300)])
    own, near = pooled_of(cluster(rng, 200)), pooled_of(cluster(rng, 200, shift=0.25))
    assert float(np.median(model.distance(near))) < 2 * float(np.median(model.distance(own)))  # hard by distance
    assert (detector.probability(root_features(near)) > 0.5).mean() > 0.95
    assert (detector.probability(root_features(own)) < 0.5).mean() > 0.95


def test_threshold_for_passes_exactly_the_asked_share() -> None:
    scores = np.arange(1, 101, dtype=float)
    assert threshold_for(scores, 0.95) == 95.0
    assert threshold_for(scores, 1.0) == 100.0
    assert (scores <= threshold_for(scores, 0.9)).mean() == 0.9


def test_the_domain_model_round_trips_through_its_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train, other = pooled_of(cluster(rng, 50)), pooled_of(cluster(rng, 50, shift=1.0))
    detector = LinearDetector.fit(root_features(np.r_[train, other]), np.r_[np.zeros(50), np.ones(50)])
    model = replace(DomainModel.fit(train, dims=4), distance_threshold=1.7, other=detector, other_threshold=0.2)
    model.save(tmp_path / "domain.npz")
    loaded = DomainModel.load(tmp_path / "domain.npz")
    probe = pooled_of(cluster(rng, 10, shift=0.5))
    assert loaded.score(probe) == pytest.approx(model.score(probe), rel=1e-4)
    assert loaded.distance_threshold == 1.7 and loaded.other_threshold == 0.2


def test_too_few_images_cannot_fit_a_domain_model() -> None:
    from oncolens.vision.domain import DomainFitError

    with pytest.raises(DomainFitError, match="too few"):
        DomainModel.fit(np.ones((5, 8)))


def texture(seed: int, size: int = 96) -> np.ndarray:
    """A sharp, mid-grey textured RGB image as uint8 [size, size, 3]."""
    rng = np.random.default_rng(seed)
    grey = np.clip(rng.normal(128, 40, (size, size)), 0, 255)
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def limits() -> QualityLimits:
    training = np.stack([texture(seed) for seed in range(40)])
    return QualityLimits.fit(quality_stats(training), min_side=96)


def check(limits: QualityLimits, pixels: np.ndarray, width: int = 400, height: int = 300) -> list[str]:
    stats = {k: float(v[0]) for k, v in quality_stats(pixels[None]).items()}
    return [issue.code for issue in limits.check(stats, width, height)]


def test_a_training_like_image_has_no_quality_warning(limits: QualityLimits) -> None:
    assert check(limits, texture(99)) == []


def test_a_blurred_image_is_flagged_blurred(limits: QualityLimits) -> None:
    blurred = np.asarray(Image.fromarray(texture(7)).filter(ImageFilter.GaussianBlur(3)))
    assert "blurred" in check(limits, blurred)


def test_a_dark_image_is_flagged_underexposed_and_clipped(limits: QualityLimits) -> None:
    dark = (texture(8) * 0.02).astype(np.uint8)
    codes = check(limits, dark)
    assert "underexposed" in codes and "clipped_dark" in codes


def test_a_burnt_out_image_is_flagged_overexposed(limits: QualityLimits) -> None:
    bright = np.clip(texture(9).astype(int) + 150, 0, 255).astype(np.uint8)
    codes = check(limits, bright)
    assert "overexposed" in codes and "clipped_bright" in codes


def test_a_thumbnail_is_flagged_too_small_with_its_size(limits: QualityLimits) -> None:
    stats = {k: float(v[0]) for k, v in quality_stats(texture(10)[None]).items()}
    issues = limits.check(stats, 64, 48)
    assert [i.code for i in issues] == ["too_small"]
    assert "64x48 px, smaller than the 96 px" in issues[0].message
