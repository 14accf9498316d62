"""Post-hoc calibration fitted on labelled model outputs: temperature scaling, class offsets and the risk policy.

NumPy only (a core module): training fits it on val, and `oncolens adapt` re-fits it on a site's confirmed cases.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from oncolens.decision import calibrate
from oncolens.evaluation import metrics


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


MIN_LEVEL_WIDTH = 0.05  # no level narrower than this in P(malignant): val cannot tell such levels apart


def level_borders(
    sens_cut: float, call: float, spec_cut: float, min_width: float = MIN_LEVEL_WIDTH
) -> tuple[list[tuple[str, float]], list[str]]:
    """The levels' (name, min) from three cuts on val, and why any cut was not used.

    The malignant call is always a border: below it ``low`` (and ``borderline`` from the
    high-sensitivity cut, where that cut lies at least ``min_width`` below the call), from it
    ``moderate`` up to the high-specificity cut and ``high`` above it; where the high-specificity cut
    is not at least ``min_width`` above the call (or leaves ``high`` narrower than ``min_width``), the
    call itself starts ``high``.
    """
    why = []
    levels: list[tuple[str, float]] = [("low", 0.0)]
    if sens_cut >= min_width and sens_cut <= call - min_width:
        levels.append(("borderline", sens_cut))
    else:
        why.append(
            f"no 'borderline': the high-sensitivity cut {sens_cut:.3f} is not at least {min_width} above 0 and "
            f"below the call {call:.3f}"
        )
    if spec_cut >= call + min_width and spec_cut <= 1.0 - min_width:
        levels += [("moderate", call), ("high", spec_cut)]
    else:
        levels.append(("high", call))
        why.append(
            f"no 'moderate': the high-specificity cut {spec_cut:.3f} is not at least {min_width} above the call "
            f"{call:.3f} and below 1, so the call starts 'high'"
        )
    if call < min_width or call > 1.0 - min_width:
        why.append(
            f"the call {call:.3f} leaves a level narrower than {min_width}: kept, because the call must be a "
            "border and val chose it"
        )
    return levels, why


def share_at_or_above(p: np.ndarray, mask: np.ndarray, threshold: float) -> float | None:
    chosen = p[mask]
    return float((chosen >= threshold).mean()) if len(chosen) else None


def level_test_figures(
    levels: list[tuple[str, float]], p_test: np.ndarray, mal_test: np.ndarray
) -> list[dict[str, Any]]:
    """For each level: the share of the test split's malignant and benign images at it or above, and in it."""
    mal = mal_test.astype(bool)
    out = []
    for index, (_, start) in enumerate(levels):
        end = levels[index + 1][1] if index + 1 < len(levels) else 2.0
        inside = (p_test >= start) & (p_test < end)
        out.append(
            {
                "malignant_at_or_above": share_at_or_above(p_test, mal, start),
                "benign_at_or_above": share_at_or_above(p_test, ~mal, start),
                "malignant_here": float(inside[mal].mean()) if mal.any() else None,
                "benign_here": float(inside[~mal].mean()) if (~mal).any() else None,
            }
        )
    return out


def risk_policy(
    p_malignant: np.ndarray,
    is_malignant: np.ndarray,
    config: dict[str, Any],
    test: tuple[np.ndarray, np.ndarray] | None = None,
    call: float | None = None,
) -> dict[str, Any]:
    """Risk levels on P(malignant), each an interval chosen on val at a stated operating point.

    Three cuts on val: where sensitivity reaches ``sensitivity_target`` (0.95), the malignant call
    (``call``, or the largest threshold with sensitivity >= ``call_sensitivity``, 0.90) and where
    specificity reaches ``specificity_target`` (0.95). ``level_borders`` turns them into levels whose
    borders include the call and none of which is narrower than 0.05. With ``test`` (P(malignant),
    is-malignant of the test split), each level records what it meant there, in shares.
    """
    sens_target = float(config.get("sensitivity_target", 0.95))
    spec_target = float(config.get("specificity_target", 0.95))
    mal = is_malignant.astype(bool)
    why_call = ""
    if call is None:
        call, why_call = call_threshold(p_malignant, is_malignant, config)
    if not mal.any() or mal.all():
        sens_cut, spec_cut = 0.0, 1.0
    else:
        sens_cut = threshold_for_sensitivity(p_malignant, is_malignant, sens_target)
        spec_cut = threshold_for_specificity(p_malignant, is_malignant, spec_target)
    borders, why = level_borders(sens_cut, call, spec_cut)
    recommendations = {
        "low": "Low estimated risk. Routine care; re-assess if the lesion changes.",
        "borderline": "Borderline. Consider follow-up imaging or a specialist review.",
        "moderate": "Moderate risk. Specialist review is recommended.",
        "high": "High risk. Prompt specialist referral is recommended.",
    } | dict(config.get("recommendations", {}))

    def on_val(threshold: float) -> str:
        if not mal.any() or mal.all():
            return "val lacks a malignant or a benign case"
        sens = float((p_malignant[mal] >= threshold).mean())
        spec = float((p_malignant[~mal] < threshold).mean())
        return f"val sensitivity {sens:.3f}, specificity {spec:.3f} from here up"

    basis = {
        "low": "below every other level",
        "borderline": f"starts where val sensitivity reaches {sens_target:.2f} ({on_val(sens_cut)})",
        "moderate": f"starts at the malignant call ({on_val(call)})",
        "high": (
            f"starts where val specificity reaches {spec_target:.2f} ({on_val(spec_cut)})"
            if any(name == "moderate" for name, _ in borders)
            else f"starts at the malignant call ({on_val(call)})"
        ),
    }
    levels = [
        {"level": name, "min": start, "recommendation": recommendations[name], "basis": basis[name]}
        for name, start in borders
    ]
    policy: dict[str, Any] = {
        "score": "p_malignant",
        "levels": levels,
        "malignant_threshold": call,
        "chosen_on": "val",
        "min_level_width": MIN_LEVEL_WIDTH,
        "positives": str(config.get("positives", "malignant cases")),
        "negatives": str(config.get("negatives", "benign cases")),
        "reasoning": (
            f"Levels are intervals of P(malignant) with borders at val operating points: the cut that keeps "
            f"val sensitivity >= {sens_target:.2f} ({sens_cut:.3f}), the malignant call ({call:.3f}) and the cut "
            f"with val specificity >= {spec_target:.2f} ({spec_cut:.3f}); no level is narrower than "
            f"{MIN_LEVEL_WIDTH}."
            + (" " + "; ".join(why) + "." if why else "")
            + (f" Is-malignant: {why_call}." if why_call else "")
        ),
    }
    if test is not None:
        p_test, mal_test = test
        figures = level_test_figures(borders, np.asarray(p_test), np.asarray(mal_test).astype(bool))
        for level, figure in zip(levels, figures, strict=True):
            level["test"] = figure
        policy["test_counts"] = {"malignant": int(np.sum(mal_test)), "benign": int(np.sum(~np.asarray(mal_test)))}
    return policy


def fit_scaling(
    logits: np.ndarray,
    y: np.ndarray,
    temperature: float,
    bias: np.ndarray,
    min_class: int = 5,
    ridge: float = 1.0,
    iterations: int = 100,
) -> tuple[float, np.ndarray]:
    """Temperature and class offsets re-fitted to labelled logits: softmax((logits + bias') / T').

    Starts from (and is pulled towards) the given calibration: it minimises the NLL of ``y`` under
    softmax(a·z + c), which is convex in (a = 1/T, c = bias/T), plus ``ridge`` pseudo-observations'
    worth of squared distance of c from its start. A class with fewer than ``min_class`` rows keeps its
    offset (nothing here can tell it). Newton steps with backtracking (a stays positive). Returns (T', bias').
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n, classes = z.shape
    start_c = np.asarray(bias, dtype=np.float64) / temperature
    free = np.flatnonzero(np.bincount(y, minlength=classes) >= min_class)
    onehot = np.eye(classes)[y]
    weight = ridge / max(n, 1)

    def unpack(theta: np.ndarray) -> tuple[float, np.ndarray]:
        c = start_c.copy()
        c[free] = theta[1:]
        return float(theta[0]), c

    def loss(theta: np.ndarray) -> float:
        a, c = unpack(theta)
        s = a * z + c
        s -= s.max(axis=1, keepdims=True)
        log_p = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        return float(-(log_p[np.arange(n), y]).mean() + weight * ((c - start_c) ** 2).sum())

    theta = np.concatenate([[1.0 / temperature], start_c[free]])
    current = loss(theta)
    for _ in range(iterations):
        a, c = unpack(theta)
        s = a * z + c
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        r = p - onehot
        jac = np.concatenate([z[:, :, None], np.eye(classes)[None, :, free].repeat(n, axis=0)], axis=2)  # [N, C, P]
        grad = np.einsum("nc,ncp->p", r, jac) / n
        grad[1:] += 2 * weight * (c[free] - start_c[free])
        cov = p[:, :, None] * np.eye(classes)[None] - p[:, :, None] * p[:, None, :]  # [N, C, C]
        hess = np.einsum("ncp,ncd,ndq->pq", jac, cov, jac) / n
        hess[1:, 1:] += 2 * weight * np.eye(len(free))
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(theta)), grad)
        scale = 1.0
        while scale > 1e-6:
            trial = theta - scale * step
            if trial[0] > 0 and (value := loss(trial)) <= current:
                break
            scale /= 2
        else:
            break
        done = current - value < 1e-10
        theta, current = trial, value
        if done:
            break
    a, c = unpack(theta)
    return 1.0 / a, c / a
