"""The committed skin-ham10000 package: integrity, shapes, and golden outputs on the samples."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from oncolens.datasets import open_rgb
from oncolens.zoo import BUILTIN_DIR, ModelPackage, Zoo
from oncolens.zoo.package import sha256_of

PACKAGE = BUILTIN_DIR / "skin-ham10000"
SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(PACKAGE)


def test_package_is_discovered_and_its_sha256_matches_the_card(package: ModelPackage) -> None:
    assert "skin-ham10000" in Zoo().ids()
    assert sha256_of(PACKAGE / "model.onnx") == package.card["sha256"]
    assert (PACKAGE / "model.onnx").stat().st_size <= 20 * 1024 * 1024


def test_outputs_have_the_card_shapes(package: ModelPackage) -> None:
    size = package.input_spec.size
    logits, features = package.run(np.zeros((3, 3, size, size), np.float32), with_features=True)
    assert logits.shape == (3, 7)
    assert features is not None and list(features.shape[1:]) == package.card["outputs"]["features"]
    assert package.class_ids == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert [c["id"] for c in package.card["classes"] if c["malignant"]] == ["akiec", "bcc", "mel"]


def test_card_records_how_it_was_made(package: ModelPackage) -> None:
    card = package.card
    training = card["training"]
    assert training["command"].startswith("oncolens train")
    assert training["seed"] == 0 and training["wall_time_s"] > 0 and training["machine"]
    assert card["export"]["max_abs_logit_diff_vs_pytorch"] < 1e-3
    calibration = card["calibration"]
    assert calibration["val"]["ece_after"] <= calibration["val"]["ece_before"] + 1e-9
    metrics = card["metrics"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        low, high = metrics["intervals"][name]
        assert low <= metrics[name] <= high
    assert "non-commercial" in card["dataset"]["license"]
    for figure in ("confusion_matrix", "roc", "reliability"):
        assert (PACKAGE / "report" / f"{figure}.png").is_file()


def test_golden_probabilities_of_the_committed_samples(package: ModelPackage) -> None:
    expected = json.loads((SAMPLES / "expected.json").read_text())
    assert expected["sha256"] == package.card["sha256"]
    with (SAMPLES / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected["images"]) == 7
    prediction = package.predict([open_rgb(SAMPLES / row["file"]) for row in rows])
    for row, probs in zip(rows, prediction.probs, strict=True):
        golden = expected["images"][row["file"]]["probs"]
        assert probs.tolist() == pytest.approx([golden[c] for c in package.class_ids], abs=1e-4)
