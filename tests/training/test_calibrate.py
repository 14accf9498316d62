import numpy as np
import pytest

from oncolens.inference import calibrate, risk_level
from oncolens.training.calibrate import (
    fit_temperature,
    risk_policy,
    threshold_for_sensitivity,
    threshold_for_specificity,
)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, (4000, 4))
    probs = calibrate(true_logits, 1.0)
    y = np.array([rng.choice(4, p=p) for p in probs])
    # The model is over-confident by a factor 2.5: the fitted T should undo it.
    fitted = fit_temperature(true_logits * 2.5, y)
    assert fitted == pytest.approx(2.5, rel=0.1)


def test_sensitivity_and_specificity_thresholds() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05])
    is_mal = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    # 3 of 4 malignant (75%) are >= 0.7; all 4 are >= 0.2
    assert threshold_for_sensitivity(p, is_mal, 0.75) == 0.7
    assert threshold_for_sensitivity(p, is_mal, 0.95) == 0.2
    # 3 of 4 benign are < 0.3 + epsilon; all 4 below 0.6 + epsilon
    t = threshold_for_specificity(p, is_mal, 1.0)
    assert 0.6 < t < 0.6001
    assert np.mean(p[~is_mal] < t) == 1.0


def test_risk_policy_levels_are_ordered_and_applied() -> None:
    rng = np.random.default_rng(0)
    is_mal = rng.random(500) < 0.3
    p = np.clip(np.where(is_mal, rng.normal(0.7, 0.2, 500), rng.normal(0.2, 0.15, 500)), 0, 1)
    policy = risk_policy(p, is_mal, {"sensitivity_target": 0.95, "specificity_target": 0.95})
    mins = [lv["min"] for lv in policy["levels"]]
    assert mins == sorted(mins)
    assert [lv["level"] for lv in policy["levels"]] == ["low", "borderline", "moderate", "high"]
    borderline = policy["levels"][1]["min"]
    assert np.mean(p[is_mal] >= borderline) >= 0.95
    assert risk_level(0.0, policy)["level"] == "low"
    assert risk_level(1.0, policy)["level"] == "high"
    levels = policy["levels"]
    for level, upper in zip(levels, [*levels[1:], {"min": 1.01}], strict=True):
        if level["min"] < upper["min"]:  # a band can be empty when two thresholds coincide
            assert risk_level(level["min"], policy)["level"] == level["level"]
            assert risk_level(upper["min"] - 1e-9, policy)["level"] == level["level"]
    assert "val" in policy["reasoning"]
