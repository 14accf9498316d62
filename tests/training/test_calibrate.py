import numpy as np
import pytest

from oncolens.decision import calibrate
from oncolens.evaluation.calibrate import (
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


def test_levels_too_narrow_to_tell_apart_are_left_out_and_the_card_says_why() -> None:
    # Every malignant case scores 0.9: the high-sensitivity cut and the call are the same 0.9, so no
    # "borderline" fits below the call, and nothing is left above it for "moderate": the call starts "high".
    is_mal = np.array([True] * 20 + [False] * 20)
    p = np.where(is_mal, 0.9, 0.1)
    policy = risk_policy(p, is_mal, {"sensitivity_target": 0.95, "specificity_target": 0.95})
    assert [(lv["level"], lv["min"]) for lv in policy["levels"]] == [("low", 0.0), ("high", 0.9)]
    assert "no 'borderline'" in policy["reasoning"] and "no 'moderate'" in policy["reasoning"]
    RiskPolicy.model_validate(policy)


def test_the_malignant_call_is_a_level_border_and_no_level_is_narrower_than_005() -> None:
    rng = np.random.default_rng(0)
    is_mal = rng.random(400) < 0.3
    p = np.clip(np.where(is_mal, rng.beta(4, 2, 400), rng.beta(2, 5, 400)), 0, 1)
    test = (p[::-1].copy(), is_mal[::-1].copy())
    policy = risk_policy(p, is_mal, {"call_sensitivity": 0.90}, test)
    starts = [lv["min"] for lv in policy["levels"]]
    assert policy["malignant_threshold"] in starts
    assert [lv["level"] for lv in policy["levels"]] == ["low", "borderline", "moderate", "high"]
    assert min(b - a for a, b in zip(starts, [*starts[1:], 1.0], strict=True)) >= 0.05
    # What each level meant on the test split: the shares at it or above, counted by hand.
    p_test, mal_test = test
    for level in policy["levels"]:
        share = float((p_test[mal_test] >= level["min"]).mean())
        assert level["test"]["malignant_at_or_above"] == pytest.approx(share)
        assert level["basis"]
    assert policy["test_counts"] == {"malignant": int(mal_test.sum()), "benign": int((~mal_test).sum())}


def test_the_call_threshold_is_the_most_specific_one_at_the_target_sensitivity() -> None:
    from oncolens.evaluation.calibrate import call_threshold

    p = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.52, 0.51, 0.4, 0.3, 0.2])
    mal = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    threshold, why = call_threshold(p, mal, {"call_sensitivity": 0.9})
    assert threshold == 0.51  # 9 of 10 malignant at or above it
    assert "val sensitivity 0.900" in why
    assert call_threshold(p, np.ones(12), {})[0] == 0.5


def test_decision_rule_adjusts_for_rare_classes_and_writes_two_class_thresholds_as_offsets() -> None:
    from oncolens.evaluation.calibrate import decision_rule
    from oncolens.zoo.card import Decision

    rng = np.random.default_rng(0)
    prior = np.array([0.8, 0.15, 0.05])
    y = rng.choice(3, 400, p=prior)
    logits = rng.normal(0, 1, (400, 3)) + np.log(prior) + 1.2 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rule = decision_rule(y, probs, prior, [False, False, True], 0.5)
    assert rule["rule"] == "offsets" and rule["tau"] > 0
    adjusted = Decision.model_validate(rule).top(probs)
    from oncolens.evaluation import metrics

    assert metrics.balanced_accuracy(y, adjusted, 3) > metrics.balanced_accuracy(y, probs.argmax(axis=1), 3)

    two = Decision.model_validate(
        decision_rule(y % 2, probs[:, :2] / probs[:, :2].sum(1, keepdims=True), prior[:2], [False, True], 0.3)
    )
    p_mal = np.array([0.29, 0.31, 0.7])
    chosen = two.top(np.stack([1 - p_mal, p_mal], axis=1))
    assert chosen.tolist() == [0, 1, 1], "the top class agrees with P(malignant) >= 0.3"
