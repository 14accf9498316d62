"""Post-hoc calibration on the validation split: temperature scaling and the risk policy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from oncolens import metrics
from oncolens.inference import calibrate
from oncolens.zoo.card import prune_levels


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of labels ``y`` [N] under softmax(logits [N, C] / T)."""
    probs = calibrate(logits, temperature)
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T that minimises validation NLL (golden-section search on log T; NLL is unimodal in T)."""
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, y, math.exp(c)), nll(logits, y, math.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, y, math.exp(d))
    return float(math.exp((a + b) / 2))


def threshold_for_sensitivity(p_malignant: np.ndarray, is_malignant: np.ndarray, target: float) -> float:
    """Largest threshold t such that P(malignant) >= t still catches ``target`` of malignant cases."""
    positives = np.sort(p_malignant[is_malignant.astype(bool)])[::-1]
    if len(positives) == 0:
        raise ValueError("no malignant cases in the validation split: cannot set a sensitivity threshold")
    k = max(1, math.ceil(target * len(positives)))
    return float(positives[k - 1])


def threshold_for_specificity(p_malignant: np.ndarray, is_malignant: np.ndarray, target: float) -> float:
    """Smallest threshold t such that P(malignant) < t holds for ``target`` of benign cases."""
    negatives = np.sort(p_malignant[~is_malignant.astype(bool)])
    if len(negatives) == 0:
        raise ValueError("no benign cases in the validation split: cannot set a specificity threshold")
    k = min(len(negatives), max(1, math.ceil(target * len(negatives))))
    return float(np.nextafter(negatives[k - 1], np.float64(np.inf)))


def call_threshold(p_malignant: np.ndarray, is_malignant: np.ndarray, config: dict[str, Any]) -> tuple[float, str]:
    """The P(malignant) at which a case is called malignant (``is_malignant``), chosen on val.

    The largest threshold that still catches ``call_sensitivity`` (default 0.90) of val's malignant
    cases: the most specific call at the sensitivity a screening tool needs. Where val has no
    malignant or no benign case, 0.5. Returns the threshold and the reasoning.
    """
    target = float(config.get("call_sensitivity", 0.90))
    mal = is_malignant.astype(bool)
    if not mal.any() or mal.all():
        return 0.5, "called malignant at P(malignant) >= 0.5 (val lacks a malignant or a benign case)"
    t = threshold_for_sensitivity(p_malignant, is_malignant, target)
    sens = float((p_malignant[mal] >= t).mean())
    spec = float((p_malignant[~mal] < t).mean())
    at_half = float((p_malignant[mal] >= 0.5).mean()), float((p_malignant[~mal] < 0.5).mean())
    return t, (
        f"called malignant at P(malignant) >= {t:.3f}, the largest threshold with val sensitivity >= "
        f"{target:.2f} (val sensitivity {sens:.3f}, specificity {spec:.3f}; at 0.5 they were "
        f"{at_half[0]:.3f} and {at_half[1]:.3f})"
    )


ADJUSTMENTS = tuple(np.round(np.arange(0.0, 2.01, 0.25), 2))


def decision_rule(
    y_val: np.ndarray, val_probs: np.ndarray, train_prior: np.ndarray, malignant: list[bool], threshold: float
) -> dict[str, Any]:
    """How the top class is chosen (the card's ``decision``), on val.

    Two classes: the malignant threshold written as class offsets, so the top class and ``is_malignant``
    agree. More classes: logit adjustment, argmax of log p - tau * log(train prior), with the tau in
    ADJUSTMENTS that gives the best val balanced accuracy (the smallest on a tie; tau 0 is the argmax):
    rare classes (often the malignant ones) are not drowned by the common ones.
    """
    k = len(malignant)
    if k == 2:
        if threshold == 0.5:
            return {
                "rule": "argmax",
                "objective": "accuracy",
                "chosen_on": "val",
                "reasoning": "the more probable class",
            }
        m = malignant.index(True)
        half = 0.5 * math.log((1 - threshold) / threshold)
        offsets = [half if i == m else -half for i in range(2)]
        return {
            "rule": "offsets",
            "class_offsets": offsets,
            "objective": "sensitivity",
            "chosen_on": "val",
            "reasoning": f"the malignant class is chosen when P(malignant) >= {threshold:.3f} (the call threshold)",
        }
    log_prior = np.log(np.clip(train_prior, 1e-12, None))
    scores = {}
    for tau in ADJUSTMENTS:
        offsets = -tau * (log_prior - log_prior.mean())
        pred = (np.log(np.clip(val_probs, 1e-12, None)) + offsets).argmax(axis=1)
        scores[float(tau)] = metrics.balanced_accuracy(y_val, pred, k)
    best = max(scores.values())
    tau = min(t for t, v in scores.items() if v >= best)
    offsets = (-tau * (log_prior - log_prior.mean())).tolist()
    reasoning = (
        f"logit adjustment: argmax of log p - tau * log(train prior), tau = {tau} chosen on val for balanced "
        f"accuracy ({', '.join(f'{t}: {v:.3f}' for t, v in scores.items())})"
    )
    if tau == 0.0:
        return {"rule": "argmax", "objective": "balanced_accuracy", "chosen_on": "val", "reasoning": reasoning}
    return {
        "rule": "offsets",
        "class_offsets": [round(float(o), 6) for o in offsets],
        "tau": tau,
        "objective": "balanced_accuracy",
        "chosen_on": "val",
        "reasoning": reasoning,
    }


def risk_policy(p_malignant: np.ndarray, is_malignant: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
    """Risk thresholds on P(malignant), chosen on val, with the reasoning recorded for the card.

    ``borderline`` starts where val sensitivity reaches ``sensitivity_target`` (below it: ``low``),
    ``moderate`` at ``moderate_at`` (default 0.5), ``high`` where val specificity reaches
    ``specificity_target``. Thresholds are kept in increasing order; a level that no P(malignant)
    could reach (it starts where the next one does) is left out.
    """
    sens_target = float(config.get("sensitivity_target", 0.95))
    spec_target = float(config.get("specificity_target", 0.95))
    moderate = float(config.get("moderate_at", 0.5))
    borderline = min(threshold_for_sensitivity(p_malignant, is_malignant, sens_target), moderate)
    high = max(threshold_for_specificity(p_malignant, is_malignant, spec_target), moderate)
    called = {name: p_malignant >= t for name, t in (("borderline", borderline), ("high", high))}
    mal = is_malignant.astype(bool)
    recommendations = {
        "low": "Low estimated risk. Routine care; re-assess if the lesion changes.",
        "borderline": "Borderline. Consider follow-up imaging or a specialist review.",
        "moderate": "Moderate risk. Specialist review is recommended.",
        "high": "High risk. Prompt specialist referral is recommended.",
    } | dict(config.get("recommendations", {}))
    levels = [
        {"level": "low", "min": 0.0, "recommendation": recommendations["low"]},
        {"level": "borderline", "min": borderline, "recommendation": recommendations["borderline"]},
        {"level": "moderate", "min": moderate, "recommendation": recommendations["moderate"]},
        {"level": "high", "min": high, "recommendation": recommendations["high"]},
    ]
    kept, dropped = prune_levels(levels)
    reasoning = (
        f"'borderline' starts at the P(malignant) where sensitivity on val reaches {sens_target:.2f} "
        f"(val sensitivity {called['borderline'][mal].mean():.3f}, so 'low' holds few malignant cases); "
        f"'moderate' starts at {moderate:.2f}; 'high' starts where specificity on val reaches "
        f"{spec_target:.2f} (val specificity {(~called['high'][~mal]).mean():.3f}, "
        f"sensitivity {called['high'][mal].mean():.3f})."
    )
    if dropped:
        reasoning += f" Left out as unreachable (its threshold equals the next level's): {', '.join(dropped)}."
    threshold, why = call_threshold(p_malignant, is_malignant, config)
    return {
        "score": "p_malignant",
        "levels": kept,
        "malignant_threshold": threshold,
        "chosen_on": "val",
        "reasoning": f"{reasoning} Is-malignant: {why}.",
    }
