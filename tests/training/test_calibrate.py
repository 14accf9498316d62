import numpy as np
import pytest

from oncolens.inference import calibrate
from oncolens.training.calibrate import (
    fit_temperature,
    risk_policy,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from oncolens.zoo.card import RiskPolicy


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
    # specificity 0.95 is reached below 0.5 here, so "high" starts at 0.5 with "moderate": moderate is left out
    assert [lv["level"] for lv in policy["levels"]] == ["low", "borderline", "high"]
    borderline = policy["levels"][1]["min"]
    assert np.mean(p[is_mal] >= borderline) >= 0.95
    typed = RiskPolicy.model_validate(policy)  # the card's contract: strictly rising thresholds
    assert typed.level_for(0.0).level == "low"
    assert typed.level_for(1.0).level == "high"
    levels = policy["levels"]
    for level, upper in zip(levels, [*levels[1:], {"min": 1.01}], strict=True):
        assert level["min"] < upper["min"]  # no band is empty
        assert typed.level_for(level["min"]).level == level["level"]
        assert typed.level_for(upper["min"] - 1e-9).level == level["level"]
    assert "val" in policy["reasoning"]


def test_a_risk_level_that_no_probability_reaches_is_left_out() -> None:
    # Every malignant case scores 0.9, so the sensitivity threshold (borderline) reaches the 0.5 of
    # moderate: borderline would be empty and is left out instead of kept unreachable.
    is_mal = np.array([True] * 20 + [False] * 20)
    p = np.where(is_mal, 0.9, 0.1)
    policy = risk_policy(p, is_mal, {"sensitivity_target": 0.95, "specificity_target": 0.95, "moderate_at": 0.05})
    names = [lv["level"] for lv in policy["levels"]]
    assert "borderline" not in names and names[0] == "low"
    assert "Left out as unreachable" in policy["reasoning"] and "borderline" in policy["reasoning"]
    RiskPolicy.model_validate(policy)
