import numpy as np
import pytest

from oncolens.evaluation import metrics


def test_confusion_matrix_counts_rows_true_columns_predicted() -> None:
    cm = metrics.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_balanced_accuracy_is_mean_recall_over_present_classes() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0])
    # recall class 0 = 3/4, class 1 = 1/2; class 2 absent from y is ignored.
    assert metrics.balanced_accuracy(y, pred, 3) == pytest.approx((0.75 + 0.5) / 2)
    assert metrics.accuracy(y, pred) == pytest.approx(4 / 6)


def test_macro_f1_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    # class 0: p=1, r=.5 -> f1=2/3; class 1: p=2/3, r=1 -> f1=.8
    assert metrics.macro_f1(y, pred, 2) == pytest.approx((2 / 3 + 0.8) / 2)


def test_binary_auc_counts_ties_as_half() -> None:
    positive = np.array([1, 1, 0, 0])
    assert metrics.binary_auc(positive, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert metrics.binary_auc(positive, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert metrics.binary_auc(positive, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    # pairs: (0.9 vs 0.3, 0.9 vs 0.6, 0.4 vs 0.3, 0.4 vs 0.6) -> 3 of 4 ordered correctly
    assert metrics.binary_auc(positive, np.array([0.9, 0.4, 0.3, 0.6])) == 0.75
    assert np.isnan(metrics.binary_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_ece_matches_hand_computation_with_15_bins() -> None:
    # Two predictions at confidence 0.9 (one right, one wrong) and two at 0.6 (both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert metrics.expected_calibration_error(y, probs, 15) == pytest.approx(expected)


def test_ece_is_zero_for_perfectly_calibrated_bins() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    y = np.array([0, 0, 0, 1])
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(0.0)


def test_bootstrap_interval_brackets_the_statistic_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(5.0, 1.0, 400)
    low, high = metrics.bootstrap_interval(lambda i: float(values[i].mean()), len(values), 500, seed=3)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.25)
    assert (low, high) == metrics.bootstrap_interval(lambda i: float(values[i].mean()), len(values), 500, seed=3)


def test_classification_report_shape_and_malignant_block() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]]
    )
    report = metrics.classification_report(y, probs, ["a", "b", "c"], [False, False, True], n_boot=50)
    assert report["n"] == 6
    assert report["accuracy"] == pytest.approx(5 / 6)
    assert set(report["per_class"]) == {"a", "b", "c"}
    assert report["per_class"]["c"]["support"] == 2
    assert report["per_class"]["c"]["precision"] == pytest.approx(2 / 3)
    # P(malignant) = p(c): malignant cases 0.8 and 0.4, benign 0.1 0.2 0.2 0.7; called at >= 0.5.
    assert report["malignant"]["sensitivity"] == pytest.approx(0.5)
    assert report["malignant"]["specificity"] == pytest.approx(0.75)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        low, high = report["intervals"][name]
        assert low <= high


# --- cross-checked against scikit-learn on random data -------------------------------------------------

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.fixture(params=range(5))
def random_case(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(request.param)
    k = int(rng.integers(2, 8))
    n = int(rng.integers(30, 400))
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])  # every class present
    probs = rng.dirichlet(np.ones(k), size=n)
    probs[np.arange(n), y] += rng.random(n)  # some signal, so the metrics are not all near chance
    return y, probs / probs.sum(axis=1, keepdims=True), k


def test_label_metrics_match_scikit_learn(random_case: tuple[np.ndarray, np.ndarray, int]) -> None:
    y, probs, k = random_case
    pred = probs.argmax(axis=1)
    labels = list(range(k))
    assert (
        metrics.confusion_matrix(y, pred, k).tolist()
        == sklearn_metrics.confusion_matrix(y, pred, labels=labels).tolist()
    )
    assert metrics.accuracy(y, pred) == pytest.approx(sklearn_metrics.accuracy_score(y, pred))
    assert metrics.balanced_accuracy(y, pred, k) == pytest.approx(sklearn_metrics.balanced_accuracy_score(y, pred))
    expected_f1 = sklearn_metrics.f1_score(y, pred, labels=labels, average="macro", zero_division=0)
    assert metrics.macro_f1(y, pred, k) == pytest.approx(expected_f1)


def test_auc_metrics_match_scikit_learn(random_case: tuple[np.ndarray, np.ndarray, int]) -> None:
    y, probs, k = random_case
    one_vs_rest = [sklearn_metrics.roc_auc_score(y == c, probs[:, c]) for c in range(k)]
    assert metrics.macro_auc(y, probs) == pytest.approx(np.mean(one_vs_rest))
    scores = np.round(probs[:, 0], 2)  # ties: both count a tie as half
    assert metrics.binary_auc(y == 0, scores) == pytest.approx(sklearn_metrics.roc_auc_score(y == 0, scores))


def test_adaptive_ece_uses_bins_of_equal_count() -> None:
    # four images, two bins of two: confidences (0.6, 0.7) with one right, (0.8, 0.9) both right
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    y = np.array([0, 1, 0, 0])
    expected = 0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.85)
    assert metrics.adaptive_calibration_error(y, probs, n_bins=2) == pytest.approx(expected)


def test_classwise_ece_brier_and_nll_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    y = np.array([0, 0])
    # class 0: bins hold 0.9 (hit) and 0.2 (hit): |1 - 0.9| + |1 - 0.2| over 2 images; class 1 mirrors it
    assert metrics.classwise_calibration_error(y, probs) == pytest.approx((0.1 + 0.8) / 2)
    assert metrics.brier_score(y, probs) == pytest.approx(((0.1**2 + 0.1**2) + (0.8**2 + 0.8**2)) / 2)
    assert metrics.log_loss(y, probs) == pytest.approx(-(np.log(0.9) + np.log(0.2)) / 2)


def test_consistency_resampling_tells_calibrated_from_overconfident() -> None:
    rng = np.random.default_rng(1)
    n = 300
    p = rng.uniform(0.05, 0.95, n)
    probs = np.stack([1 - p, p], axis=1)
    calibrated = (rng.random(n) < p).astype(int)  # labels drawn from the model's own probabilities
    assert metrics.consistency_p_value(calibrated, probs, metrics.expected_calibration_error, 300) > 0.05
    sharp = np.stack([1 - np.round(p), np.round(p)], axis=1) * 0.98 + 0.01  # says 0.99 where the truth is p
    p_value = metrics.consistency_p_value(calibrated, sharp, metrics.expected_calibration_error, 300)
    assert p_value == pytest.approx(1 / 301), "not one resample reaches the observed error"


def test_calibration_report_has_every_figure_with_an_interval() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), 50)
    y = rng.integers(0, 3, 50)
    report = metrics.calibration_report(y, probs, n_boot=50, n_resamples=50)
    for name in ("ece", "adaptive_ece", "classwise_ece", "brier", "nll"):
        low, high = report["intervals"][name]
        assert low <= report[name] <= high or name == "ece", name
    assert set(report["consistency_p"]) == {"ece", "adaptive_ece"}
