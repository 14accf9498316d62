"""Every committed model package: integrity, shapes, how it was made, and golden outputs on its samples."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from oncolens.datasets import open_rgb
from oncolens.training.recipe import load_recipe
from oncolens.zoo import BUILTIN_DIR, ModelPackage, Zoo
from oncolens.zoo.package import sha256_of

ROOT = Path(__file__).parents[2]
SHIPPED = sorted(p.parent.name for p in BUILTIN_DIR.glob("*/card.json"))

# The classes each shipped model must have, malignant ones first-class in the card.
CLASSES = {
    "skin-ham10000": (["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], ["akiec", "bcc", "mel"]),
    "skin-isic9": (
        [
            "melanoma",
            "basal_cell_carcinoma",
            "squamous_cell_carcinoma",
            "actinic_keratosis",
            "nevus",
            "pigmented_benign_keratosis",
            "dermatofibroma",
            "vascular_lesion",
        ],
        ["melanoma", "basal_cell_carcinoma", "squamous_cell_carcinoma", "actinic_keratosis"],
    ),
    "breast-us": (["malignant", "benign", "normal"], ["malignant"]),
    "thyroid-us": (["tirads_4_5", "tirads_2_3"], ["tirads_4_5"]),
    "cervical-herlev": (
        [
            "carcinoma_in_situ",
            "severe_dysplastic",
            "moderate_dysplastic",
            "light_dysplastic",
            "normal_columnar",
            "normal_intermediate",
            "normal_superficiel",
        ],
        ["carcinoma_in_situ", "severe_dysplastic", "moderate_dysplastic", "light_dysplastic"],
    ),
    "oral-photo": (["cancer", "non_cancer"], ["cancer"]),
}


def test_every_shipped_model_is_one_we_know_and_is_discovered() -> None:
    assert "skin-ham10000" in SHIPPED
    assert set(SHIPPED) <= set(CLASSES)
    assert set(SHIPPED) <= set(Zoo().ids())


@pytest.fixture(scope="module", params=SHIPPED)
def package(request: pytest.FixtureRequest) -> ModelPackage:
    return ModelPackage.load(BUILTIN_DIR / request.param)


def test_sha256_matches_the_card_and_the_file_is_small(package: ModelPackage) -> None:
    onnx = BUILTIN_DIR / package.id / "model.onnx"
    assert sha256_of(onnx) == package.card["sha256"]
    assert onnx.stat().st_size <= 25 * 1024 * 1024


def test_outputs_have_the_card_shapes_and_classes(package: ModelPackage) -> None:
    size = package.input_spec.size
    classes, malignant = CLASSES[package.id]
    logits, features = package.run(np.zeros((3, 3, size, size), np.float32), with_features=True)
    assert logits.shape == (3, len(classes))
    assert features is not None and list(features.shape[1:]) == package.card["outputs"]["features"]
    assert package.class_ids == classes
    assert [c["id"] for c in package.card["classes"] if c["malignant"]] == malignant
    assert all(c["description"] for c in package.card["classes"])


def test_card_records_how_it_was_made_and_what_it_may_be_used_for(package: ModelPackage) -> None:
    card = package.card
    training = card["training"]
    assert training["command"].startswith("oncolens train")
    assert training["seed"] == 0 and training["wall_time_s"] > 0 and training["machine"]
    recipe = ROOT / training["recipe_file"]
    assert recipe.is_file(), "the recipe that rebuilds the package is in the repository"
    assert [c.id for c in load_recipe(recipe).classes] == package.class_ids
    assert card["export"]["max_abs_logit_diff_vs_pytorch"] < 1e-3
    assert card["calibration"]["fitted_on"] == "val" and card["calibration"]["temperature"] > 0
    metrics = card["metrics"]
    assert metrics["split"] == "test"
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        low, high = metrics["intervals"][name]
        assert low <= metrics[name] <= high
    assert card["dataset"]["license"] and card["dataset"]["citation"]
    assert card["intended_use"] and len(card["limitations"]) >= 3
    levels = card["risk_policy"]["levels"]
    assert [lv["level"] for lv in levels] == ["low", "borderline", "moderate", "high"]
    assert [lv["min"] for lv in levels] == sorted(lv["min"] for lv in levels)
    for figure in ("confusion_matrix", "roc", "reliability"):
        assert (BUILTIN_DIR / package.id / "report" / f"{figure}.png").is_file()


def test_golden_probabilities_of_the_committed_samples(package: ModelPackage) -> None:
    samples = ROOT / "samples" / package.id
    expected = json.loads((samples / "expected.json").read_text())
    assert expected["sha256"] == package.card["sha256"], "expected.json was recorded from this very ONNX file"
    with (samples / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected["images"]) >= 3
    prediction = package.predict([open_rgb(samples / row["file"]) for row in rows])
    for row, probs in zip(rows, prediction.probs, strict=True):
        golden = expected["images"][row["file"]]["probs"]
        assert probs.tolist() == pytest.approx([golden[c] for c in package.class_ids], abs=1e-4)


def test_model_specific_promises() -> None:
    cards = {i: json.loads((BUILTIN_DIR / i / "card.json").read_text()) for i in SHIPPED}
    if "skin-isic9" in cards:
        card = cards["skin-isic9"]
        assert card["dataset"]["excluded_labels"] == ["seborrheic_keratosis"]
        assert any("Seborrheic keratosis is NOT a class" in text for text in card["limitations"])
    if "thyroid-us" in cards:
        card = cards["thyroid-us"]
        assert all("TI-RADS" in c["name"] for c in card["classes"])
        assert "not biopsy" in card["intended_use"].lower() or "not pathology" in card["intended_use"].lower()
    if "oral-photo" in cards:
        by_origin = cards["oral-photo"]["metrics"]["by"]["origin_dataset"]
        assert set(by_origin) == {"kaggle_shivam17299", "mendeley_chandrashekar2021", "mod_mouth_oral_diseases"}
        assert sum(g["n"] for g in by_origin.values()) == cards["oral-photo"]["metrics"]["n"]
    if "cervical-herlev" in cards:
        assert set(cards["cervical-herlev"]["metrics"]["by"]["width_orig"]) == {"200", "224"}
    for card in cards.values():
        if card["modality"] == "ultrasound":
            assert card["input"]["grayscale"] is True
