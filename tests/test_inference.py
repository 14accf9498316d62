from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oncolens.decision import aggregate, calibrate, case_result, p_malignant
from oncolens.vision.cam import cam_on_image, class_activation_map, explanation
from oncolens.zoo import ModelPackage
from oncolens.zoo.card import RiskPolicy
from oncolens.zoo.preprocess import InputSpec, preprocess

POLICY = {
    "levels": [
        {"level": "low", "min": 0.0, "recommendation": "a"},
        {"level": "borderline", "min": 0.25, "recommendation": "b"},
        {"level": "moderate", "min": 0.5, "recommendation": "c"},
        {"level": "high", "min": 0.75, "recommendation": "d"},
    ]
}


def test_calibrate_softens_with_temperature_and_sums_to_one() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [100.0, 0.0, 0.0]])
    sharp, soft = calibrate(logits, 1.0), calibrate(logits, 3.0)
    assert np.allclose(sharp.sum(axis=1), 1.0) and np.allclose(soft.sum(axis=1), 1.0)
    assert soft[0, 0] < sharp[0, 0]
    assert sharp[0, 0] == pytest.approx(np.exp(2) / (np.exp(2) + 1 + np.exp(-1)))
    assert np.isfinite(sharp).all()  # no overflow on large logits
    with pytest.raises(ValueError, match="temperature must be positive"):
        calibrate(logits, 0.0)


def test_p_malignant_sums_the_flagged_classes() -> None:
    probs = np.array([[0.1, 0.6, 0.3]])
    assert p_malignant(probs, [True, False, True])[0] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("p", "level"), [(0.0, "low"), (0.2499, "low"), (0.25, "borderline"), (0.5, "moderate"), (0.8, "high")]
)
def test_risk_level_follows_the_policy_thresholds(p: float, level: str) -> None:
    assert RiskPolicy.model_validate(POLICY).level_for(p).level == level


def test_aggregation_rules() -> None:
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    assert aggregate(probs, [False, True], "mean").tolist() == pytest.approx([0.6, 0.4])
    assert aggregate(probs, [False, True], "max_malignant").tolist() == pytest.approx([0.3, 0.7])
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate(probs, [False, True], "median")


def test_cam_is_exact_decomposition_of_the_logit() -> None:
    rng = np.random.default_rng(0)
    features = rng.random((5, 3, 3))
    weight = rng.normal(size=(2, 5))
    raw = np.tensordot(weight[1], features, axes=1)
    assert raw.mean() == pytest.approx(features.mean(axis=(1, 2)) @ weight[1])
    cam = class_activation_map(features, weight, 1)
    assert cam.max() == pytest.approx(1.0) or cam.max() == 0.0
    assert cam.min() >= 0.0


def test_cam_maps_back_through_each_resize_rule() -> None:
    cam = np.zeros((4, 4))
    cam[0, 0] = 1.0
    for rule in ("squash", "center_crop", "pad"):
        heat = cam_on_image(cam, InputSpec(64, (0, 0, 0), (1, 1, 1), rule), 200, 100)  # type: ignore[arg-type]
        assert heat.shape == (100, 200)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        assert x < 100 and y < 50  # the hot corner stays top-left


def blob_image(x: int, y: int) -> Image.Image:
    pixels = np.zeros((96, 128, 3), np.uint8)
    pixels[y - 8 : y + 8, x - 8 : x + 8, 0] = 255
    return Image.fromarray(pixels)


def test_heatmap_has_the_input_size_and_follows_the_blob(blob_package: Path) -> None:
    package = ModelPackage.load(blob_package)
    peaks = []
    for x, y in ((24, 20), (100, 72)):
        image = blob_image(x, y)
        _, features = package.run(preprocess([image], package.input_spec), with_features=True)
        assert features is not None
        ex = explanation(package, image, features[0], "blob")
        heat = Image.open(__import__("io").BytesIO(ex.heatmap_png))
        assert heat.size == image.size
        peaks.append(ex.peak_xy)
        assert abs(ex.peak_xy[0] - x) <= 12 and abs(ex.peak_xy[1] - y) <= 12
    assert peaks[0] != peaks[1]


def test_case_result_aggregates_and_keeps_each_image(blob_package: Path) -> None:
    package = ModelPackage.load(blob_package)
    logits = np.array([[3.0, 0.0], [0.0, 1.0]])
    result = case_result(package, logits, [(10, 10), (20, 20)], ["a.png", "b.png"])
    assert [i.assessment.top_class for i in result.images] == ["blob", "plain"]
    expected = (1 / (1 + np.exp(-3.0)) + 1 / (1 + np.exp(1.0))) / 2
    assert result.aggregate.probabilities["blob"] == pytest.approx(expected)
    assert result.aggregate.risk_level == "moderate"
    assert result.aggregate.is_malignant is True
    assert "not a diagnosis" in result.disclaimer


def test_upsample_cam_honours_the_feature_offset() -> None:
    from oncolens.vision.cam import upsample_cam

    cam = np.zeros((6, 6))
    cam[2, 3] = 1.0
    plain = upsample_cam(cam, 192)
    shifted = upsample_cam(cam, 192, (-15.5, 0.0))
    assert np.unravel_index(np.argmax(plain), plain.shape) in {(79, 111), (80, 112), (79, 112), (80, 111)}
    y, x = np.unravel_index(np.argmax(shifted), shifted.shape)
    assert abs(y - 64) <= 1 and abs(x - 111.5) <= 1
    assert plain.max() == pytest.approx(1.0, abs=0.05)
