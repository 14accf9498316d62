"""The monitoring and re-calibration statistics: PSI, the two-sample KS test, Wilson intervals and the
temperature-and-offsets fit of `oncolens adapt`."""

from __future__ import annotations

import numpy as np
import pytest

from oncolens.decision import calibrate
from oncolens.evaluation.calibrate import fit_scaling, fit_temperature
from oncolens.evaluation.drift import ks_2samp, psi, reference_distribution, wilson_interval


def test_psi_is_near_zero_for_the_same_population_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.beta(2, 5, 5000)
    assert psi(reference, rng.beta(2, 5, 2000)) < 0.02
    shifted = psi(reference, rng.beta(3, 4, 2000))
    assert shifted > 0.25
    assert psi(reference, np.array([])) != psi(reference, np.array([]))  # NaN when nothing to compare


@pytest.mark.parametrize(("n", "m", "shift"), [(40, 50, 0.0), (300, 120, 0.1), (1000, 800, 0.05), (60, 60, 0.5)])
def test_ks_matches_scipy(n: int, m: int, shift: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n + m)
    a, b = rng.normal(0, 1, n), rng.normal(shift, 1, m)
    d, p = ks_2samp(a, b)
    expected = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(expected.statistic, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, abs=0.02)  # SciPy's asymptotic p has no small-sample correction


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # NaNs
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_reference_distribution_is_sorted_and_rounded() -> None:
    block = reference_distribution(np.array([0.3, 0.123456789, 0.9]), "test", "here")
    assert block == {"p_malignant_test": [0.12346, 0.3, 0.9], "split": "test", "n": 3, "source": "here"}


def test_fit_scaling_recovers_a_temperature_and_class_offsets() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4000, 3))
    truth_t, truth_bias = 2.0, np.array([0.5, -0.3, 0.0])
    probs = calibrate(logits + truth_bias, truth_t)
    y = (rng.random((len(probs), 1)) > np.cumsum(probs, axis=1)).sum(axis=1)
    t, bias = fit_scaling(logits, y, 1.0, np.zeros(3), ridge=0.0)
    assert t == pytest.approx(truth_t, rel=0.08)
    offsets = bias - bias.mean()
    assert offsets == pytest.approx(truth_bias - truth_bias.mean(), abs=0.15)
    # With no offsets to find, it agrees with the plain temperature fit.
    y2 = (rng.random((len(probs), 1)) > np.cumsum(calibrate(logits, 1.5), axis=1)).sum(axis=1)
    t_only = fit_temperature(logits, y2)
    t2, _ = fit_scaling(logits, y2, 1.0, np.zeros(3), ridge=1e6)
    assert t2 == pytest.approx(t_only, rel=0.02)


def test_fit_scaling_keeps_the_offset_of_a_class_it_cannot_see() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, (200, 3))
    y = rng.integers(0, 2, 200)  # class 2 never appears
    _, bias = fit_scaling(logits, y, 1.5, np.array([0.1, 0.2, 0.7]), min_class=5)
    t, _ = fit_scaling(logits, y, 1.5, np.array([0.1, 0.2, 0.7]), min_class=5)
    assert bias[2] / t == pytest.approx(0.7 / 1.5, rel=1e-9)


def test_a_histogram_gives_what_its_values_repeated_give() -> None:
    rng = np.random.default_rng(3)
    reference = np.round(rng.beta(2, 5, 300), 2)
    centres = (np.arange(100) + 0.5) / 100
    counts = rng.integers(0, 40, 100)
    repeated = np.repeat(centres, counts)
    assert psi(reference, centres, weights=counts) == pytest.approx(psi(reference, repeated), abs=1e-12)
    d, p = ks_2samp(reference, centres, counts)
    assert (d, p) == pytest.approx(ks_2samp(reference, repeated), abs=1e-12)
    assert np.isnan(ks_2samp(reference, centres, np.zeros(100))[0])
