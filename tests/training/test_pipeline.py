"""End to end on a generated dataset: train 2 steps, export, verify, evaluate through the CLI."""

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from oncolens.cli.main import app
from oncolens.evaluation.datasets import read_manifest, select_split
from oncolens.evaluation.evaluate import dataset_logits
from oncolens.zoo import ModelPackage, Zoo

pytest.importorskip("torch")

runner = CliRunner()


def test_package_has_the_contract_files_and_a_consistent_card(tiny_package: Path) -> None:
    assert (tiny_package / "model.onnx").is_file()
    for figure in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (tiny_package / "report" / figure).stat().st_size > 1000
    card = json.loads((tiny_package / "card.json").read_text())
    assert card["id"] == "tiny"
    assert [c["id"] for c in card["classes"]] == ["benign_a", "benign_b", "cancer"]
    assert card["export"]["max_abs_logit_diff_vs_pytorch"] < 1e-3
    assert card["calibration"]["temperature"] > 0
    assert card["calibration"]["bins"] == 15
    assert card["metrics"]["n"] == 9
    assert card["dataset"]["counts"]["train"] == {"benign_a": 5, "benign_b": 5, "cancer": 5}
    assert card["input"]["test_time_views"] == ["identity", "hflip"]
    assert card["training"]["epochs_run"] == 1
    assert card["dataset"]["excluded_labels"] == ["rare"] and card["dataset"]["excluded_images"] == 2
    assert card["input"]["grayscale"] is False
    assert card["schema_version"] == 2
    # training fits the out-of-domain model on its own splits (no other datasets: distance only)
    assert (tiny_package / "domain.npz").is_file() and card["domain"]["other_threshold"] is None
    assert card["domain"]["val_pass_rate"] >= 0.95 and card["domain"]["flagged"]["own_test_n"] == 9
    assert set(card["quality"]) >= {"min_sharpness", "min_brightness", "max_brightness", "min_side"}
    mins = [level["min"] for level in card["risk_policy"]["levels"]]
    assert mins[0] == 0.0 and all(a < b for a, b in itertools.pairwise(mins)), "every level reachable"


def test_sampling_balances_classes_within_each_stratum() -> None:
    from oncolens.training.train import sampling_weights

    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    strata = ["A", "A", "A", "A", "B", "B", "B", "B"]
    w = sampling_weights(labels, 2, 1.0, strata).numpy()
    for site in "AB":
        rows = np.array([s == site for s in strata])
        # at power 1 both classes are drawn equally often within each source ...
        assert w[rows & (labels == 0)].sum() == pytest.approx(w[rows & (labels == 1)].sum())
    # ... and every (source, class) cell equally often overall
    assert w[:3].sum() == pytest.approx(w[3]) == pytest.approx(w[4]) == pytest.approx(w[5:].sum())
    # without strata, power 0.5 draws class c in proportion to sqrt(count_c)
    plain = sampling_weights(labels, 2, 0.5).numpy()
    assert plain[labels == 0].sum() == pytest.approx(plain[labels == 1].sum())
    skewed = sampling_weights(np.array([0, 0, 0, 0, 1]), 2, 0.5).numpy()
    assert skewed[:4].sum() / skewed[4] == pytest.approx(2.0)


def test_onnx_outputs_match_pytorch_on_the_dataset_images(tiny_package: Path, tiny_dataset: Path) -> None:
    import torch

    from oncolens.training.export import ExportModel
    from oncolens.training.recipe import load_recipe
    from oncolens.training.train import build_model

    package = ModelPackage.load(tiny_package)
    recipe_path = Path(json.loads((tiny_package / "card.json").read_text())["training"]["recipe_file"])
    recipe = load_recipe(recipe_path)
    run_dir = tiny_package.parent.parent / "run"
    model = build_model(recipe, pretrained=False)
    model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=False)["model"])
    reference = ExportModel(model, ("identity", "hflip")).eval()
    samples = select_split(read_manifest(tiny_dataset), "test")
    onnx_logits = dataset_logits(lambda x: package.run(x)[0], samples, package.input_spec)
    with torch.no_grad():
        torch_logits = dataset_logits(lambda x: reference(torch.from_numpy(x))[0].numpy(), samples, package.input_spec)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3


def test_logits_equal_the_head_on_pooled_features(tiny_package: Path) -> None:
    package = ModelPackage.load(tiny_package)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    logits, features = package.run(x, with_features=True)
    assert features is not None and features.shape == (2, 1280, 2, 2)
    bias = np.frombuffer(__import__("base64").b64decode(package.card.head.bias_f32_b64 or ""), dtype="<f4")
    recomputed = features.mean(axis=(2, 3)) @ package.head_weight.T + bias
    assert np.abs(recomputed - logits).max() < 1e-4


def test_evaluate_cli_takes_any_split_name(tiny_package: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """A user's own split (``holdout``) is evaluated by name; ``all`` takes every row."""
    with (tiny_dataset / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for index, row in enumerate(rows):
        row["split"] = "holdout" if index % 2 == 0 else "site-b"
        row["file"] = str((tiny_dataset / row["file"]).resolve())
    own = tmp_path / "own"
    own.mkdir()
    with (own / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    holdout = sum(1 for r in rows if r["split"] == "holdout" and r["label"] != "rare")
    for split, n in (("holdout", holdout), ("all", sum(1 for r in rows if r["label"] != "rare"))):
        out = tmp_path / f"{split}.json"
        args = [
            "evaluate",
            "tiny",
            str(own),
            "--split",
            split,
            "--model-dir",
            str(tiny_package.parent),
            "--json",
            str(out),
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert report["split"] == split and report["n"] == n
    missing = runner.invoke(app, ["evaluate", "tiny", str(own), "--model-dir", str(tiny_package.parent)])
    assert missing.exit_code == 2
    assert "no rows in split 'test'; the manifest has ['holdout', 'site-b']" in missing.output


def test_evaluate_cli_reads_the_package_back(tiny_package: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app,
        ["evaluate", "tiny", str(tiny_dataset), "--model-dir", str(tiny_package.parent), "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "balanced_accuracy" in result.output and "malignant vs benign" in result.output
    report = json.loads(out.read_text())
    assert report["n"] == 9 and report["split"] == "test"
    card = json.loads((tiny_package / "card.json").read_text())
    # the CLI evaluation of the shipped ONNX reproduces the card's test metrics exactly
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert report[name] == pytest.approx(card["metrics"][name], abs=1e-9)
    assert set(report["per_class"]["cancer"]) >= {"precision", "recall", "f1", "support"}
    assert set(report["malignant"]) >= {"sensitivity", "specificity", "auc"}
    # the one 'rare' test row is left out (the recipe excludes that label) and said so
    assert report["excluded"] == {"labels": ["rare"], "rows": 1}
    assert "left out 1 row(s) labelled rare" in result.output
    # per-site breakdown, as the card lists report_by = ["site"]; it matches the card's own
    assert "by site:" in result.output
    assert set(report["by"]["site"]) == {"A", "B"}
    assert sum(g["n"] for g in report["by"]["site"].values()) == 9
    for site in ("A", "B"):
        assert report["by"]["site"][site]["accuracy"] == pytest.approx(card["metrics"]["by"]["site"][site]["accuracy"])
        assert sum(report["by"]["site"][site]["labels"].values()) == report["by"]["site"][site]["n"]


def test_evaluate_split_all_is_the_default_without_a_split_column(tiny_package: Path, tmp_path: Path) -> None:
    from tests.conftest import make_dataset

    root = make_dataset(tmp_path / "nosplit", with_split=False)
    out = tmp_path / "m.json"
    result = runner.invoke(
        app, ["evaluate", "tiny", str(root), "--model-dir", str(tiny_package.parent), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 30
    assert report["excluded"] == {"labels": ["rare"], "rows": 2}


def test_evaluate_rejects_labels_the_model_does_not_know(tiny_package: Path, tmp_path: Path) -> None:
    from tests.conftest import make_dataset

    root = make_dataset(tmp_path / "other")
    manifest = root / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",cancer,", ",melanoma,"))
    result = runner.invoke(app, ["evaluate", "tiny", str(root), "--model-dir", str(tiny_package.parent)])
    assert result.exit_code == 2
    assert "labels not known to the model: ['melanoma']" in result.output


def test_evaluate_unknown_model_lists_the_available_ones(tiny_package: Path, tiny_dataset: Path) -> None:
    result = runner.invoke(
        app, ["evaluate", "no-such-model", str(tiny_dataset), "--model-dir", str(tiny_package.parent)]
    )
    assert result.exit_code == 2
    assert "no model 'no-such-model'" in result.output and "tiny" in result.output


def test_training_resumes_from_the_last_checkpoint(tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    from oncolens.training.recipe import load_recipe
    from oncolens.training.train import fit

    recipe = load_recipe(tiny_recipe)
    samples = read_manifest(tiny_dataset)
    first = fit(recipe, samples, tmp_path, "pytest")
    assert first["epochs_run"] == 1
    second = fit(recipe.with_overrides(epochs=2), samples, tmp_path, "pytest")
    assert second["epochs_run"] == 2
    assert second["history"][0] == first["history"][0]


def test_a_tampered_onnx_file_is_refused(tiny_package: Path, tmp_path: Path) -> None:
    import shutil

    from oncolens.zoo import PackageError

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_package, copy)
    with (copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PackageError, match="sha256"):
        ModelPackage.load(copy)
    assert Zoo([copy.parent]).ids() == ["tiny"]


def test_evaluate_names_a_missing_or_broken_image(tiny_package: Path, tmp_path: Path) -> None:
    from tests.conftest import make_dataset

    root = make_dataset(tmp_path / "broken")
    (root / "images" / "cancer_7.png").write_bytes(b"not a png")
    (root / "images" / "cancer_8.png").unlink()
    result = runner.invoke(app, ["evaluate", "tiny", str(root), "--model-dir", str(tiny_package.parent)])
    assert result.exit_code == 2
    assert "cannot read image" in result.output and "cancer_" in result.output


def test_fine_tuning_chooses_its_test_time_views_on_val(tiny_recipe: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    from oncolens.training.pipeline import finalize
    from oncolens.training.recipe import load_recipe
    from oncolens.training.train import fit

    path = tmp_path / "views.toml"
    path.write_text(
        tiny_recipe.read_text().replace(
            'tta = ["identity", "hflip"]',
            'tta = ["identity", "hflip"]\ntta_candidates = [["identity", "hflip", "vflip", "rot90"], ["identity"]]\n'
            "tta_tolerance = 1.0",
        )
    )
    recipe = load_recipe(path)
    samples = read_manifest(tiny_dataset)
    summary = fit(recipe, samples, tmp_path / "run", "pytest")
    # every candidate scored on val; with a tolerance of 1 the cheapest set is always kept
    assert set(summary["view_choice_val"]) == {"identity+hflip+vflip+rot90", "identity"}
    assert all(0.0 <= v <= 1.0 for v in summary["view_choice_val"].values())
    assert summary["test_time_views"] == ["identity"]
    package = finalize(recipe, samples, tmp_path / "run", tmp_path / "zoo" / "views", "views")
    card = json.loads((package / "card.json").read_text())
    assert card["input"]["test_time_views"] == ["identity"]


def test_train_val_only_on_a_fine_tuned_recipe_prints_the_val_figures_and_writes_no_package(
    tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path
) -> None:
    run, package = tmp_path / "run", tmp_path / "zoo" / "tiny"
    args = ["train", str(tiny_dataset), "--model-id", "tiny", "--recipe", str(tiny_recipe)]
    result = runner.invoke(
        app, [*args, "--run-dir", str(run), "--out", str(package), "--set", "lr=0.0002", "--val-only"]
    )
    assert result.exit_code == 0, result.output
    history = json.loads((run / "history.json").read_text())
    assert history["config"]["lr"] == 0.0002
    accuracy = history["best_val"]["accuracy"]
    assert f"accuracy {accuracy:.4f}" in result.output and "test not read, no package written" in result.output
    assert (run / "best.pt").is_file() and not package.exists()
