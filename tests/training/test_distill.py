"""Cached views, grouped folds, teachers and the distilled student, test-time views, decision rules."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from oncolens.cli.main import app

torch = pytest.importorskip("torch")

from oncolens.evaluation.datasets import drop_labels, read_manifest, select_split  # noqa: E402
from oncolens.training.backbones import Classifier, build_backbone  # noqa: E402
from oncolens.training.distill import (  # noqa: E402
    TEACHERS,
    agreement,
    blend,
    ensemble_probabilities,
    fit_distilled,
    grouped_folds,
    teacher_models,
)
from oncolens.training.export import TTA_VIEWS, ExportModel, export_onnx  # noqa: E402
from oncolens.training.recipe import RecipeError, load_recipe  # noqa: E402

runner = CliRunner()


def distill_recipe(tiny_recipe: Path, tmp_path: Path, **train: object) -> Path:
    """The tiny recipe trained by ``method = "distill"`` (2 folds, 2 cached views, 1 epoch)."""
    settings = {
        "method": '"distill"',
        "cache_views": 2,
        "folds": 2,
        "teacher_epochs": 1,
        "freeze_blocks": 12,
    } | {k: str(v) for k, v in train.items()}
    text = tiny_recipe.read_text().replace("freeze_blocks = 3\n", "")
    lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
    text = text.replace("[train]\n", "[train]\n" + lines).replace(
        'tta = ["identity", "hflip"]',
        'tta = ["identity", "hflip"]\ntta_candidates = [["identity"], ["identity", "hflip"]]',
    )
    path = tmp_path / "distill.toml"
    path.write_text(text)
    return path


def test_grouped_folds_keep_a_group_together_and_spread_every_class() -> None:
    groups = [f"g{i // 3}" for i in range(60)]  # 20 groups of 3 images; classes hold 7, 7 and 6 groups
    labels = np.array([int(g[1:]) % 3 for g in groups])
    folds = grouped_folds(labels, groups, 5, seed=0)
    for g in set(groups):
        assert len({folds[i] for i, h in enumerate(groups) if h == g}) == 1, "a group split across folds"
    assert np.bincount(folds).tolist() == [12] * 5
    for f in range(5):
        assert (np.bincount(labels[folds == f], minlength=3) > 0).all(), f"fold {f} lacks a class"
    assert not np.array_equal(folds, grouped_folds(labels, groups, 5, seed=1)), "another seed, another cut"
    with pytest.raises(ValueError, match="2 groups cannot make 5 folds"):
        grouped_folds(np.array([0, 1]), ["a", "b"], 5, seed=0)


def test_a_recipe_with_an_unknown_method_or_too_few_folds_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_recipe.read_text().replace("[train]\n", '[train]\nmethod = "boost"\n'))
    with pytest.raises(RecipeError, match="method 'boost' is not one of"):
        load_recipe(bad)
    bad.write_text(tiny_recipe.read_text().replace("[train]\n", '[train]\nmethod = "distill"\nfolds = 1\n'))
    with pytest.raises(RecipeError, match="distill needs folds >= 2"):
        load_recipe(bad)


def test_blend_mixes_the_chosen_share_of_a_batch_with_a_partner() -> None:
    import torch

    x = torch.arange(64, dtype=torch.float32).view(16, 1, 2, 2)
    gen = torch.Generator().manual_seed(0)
    mixed, partner, weight, blended = blend(x, 0.5, gen)
    assert 0 < int(blended.sum()) < 16
    for i in range(16):
        if blended[i]:
            assert 0.0 < float(weight[i]) < 1.0 and int(partner[i]) != i
            expected = weight[i] * x[i] + (1 - weight[i]) * x[partner[i]]
            assert torch.allclose(mixed[i], expected)
        else:
            assert float(weight[i]) == 1.0 and torch.equal(mixed[i], x[i]), "an unblended row must stay as it was"
    none, _, w0, b0 = blend(x, 0.0, gen)
    assert not bool(b0.any()) and torch.equal(none, x) and bool((w0 == 1).all())
    _, _, _, every = blend(x, 1.0, gen)
    assert int(every.sum()) >= 14  # all but the rows a random permutation leaves in place


def test_agreement_measures_how_far_a_student_is_from_its_teachers() -> None:
    teachers = np.array([[2.0, 0.0], [0.0, 1.0]])
    assert agreement(teachers, teachers) == {"kl": 0.0, "same_top_class": 1.0}
    flipped = agreement(teachers, -teachers)
    p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    q = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    expected = ((p * np.log(p / p[::-1])).sum() + (q * np.log(q / q[::-1])).sum()) / 2
    assert flipped["same_top_class"] == 0.0
    assert flipped["kl"] == pytest.approx(expected, rel=1e-9)


def test_a_recipe_with_a_distill_mix_outside_0_to_1_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"distill_mix is a share of the batch, from 0 to 1, not 1\.5"):
        load_recipe(distill_recipe(tiny_recipe, tmp_path, distill_mix=1.5))


def test_a_blended_student_learns_from_every_teacher_and_is_measured_on_real_maps(
    tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from oncolens.training import distill

    measured: list[int] = []
    original = distill.reestimate_batchnorm

    def recording(model: Classifier, views: object, n_frozen: int, batch: int = 64) -> None:
        measured.append(views.n_images)  # type: ignore[attr-defined]
        original(model, views, n_frozen, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(distill, "reestimate_batchnorm", recording)
    recipe = load_recipe(distill_recipe(tiny_recipe, tmp_path, distill_mix=0.5))
    assert recipe.train.distill_mix == 0.5
    summary = fit_distilled(recipe, read_manifest(tiny_dataset), tmp_path / "run", "pytest blended")
    # the soup's BatchNorm once, then the student's after every epoch, on the 15 train images' real maps
    assert measured == [15] * (1 + len(summary["history"]))
    assert summary["config"]["distill_mix"] == 0.5
    assert summary["history"] and "student" in summary["timings_s"]
    states = [torch.load(p, weights_only=True) for p in sorted((tmp_path / "run" / TEACHERS).glob("*.pt"))]
    teachers = teacher_models(recipe, states)
    assert len(teachers) == 2 and not any(p.requires_grad for t in teachers for p in t.parameters())
    maps = torch.randn(3, *teachers[0].backbone.front(torch.zeros(1, 3, 64, 64), 12).shape[1:])
    probs = ensemble_probabilities(teachers, maps, 12, 2.0)
    each = [torch.softmax(t.tail_logits(maps, 12) / 2.0, dim=1) for t in teachers]
    assert torch.allclose(probs, (each[0] + each[1]) / 2, atol=1e-6)
    assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-5)


@pytest.fixture(scope="module")
def distilled(tiny_dataset: Path, tiny_recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A distilled run (2 teachers, 1 student) and its finished package."""
    from oncolens.training.pipeline import finalize

    work = tmp_path_factory.mktemp("distill")
    recipe = load_recipe(distill_recipe(tiny_recipe, work))
    samples = read_manifest(tiny_dataset)
    fit_distilled(recipe, samples, work / "run", "pytest distill")
    return work / "run", finalize(recipe, samples, work / "run", work / "zoo" / "tiny", "tiny")


def test_a_distilled_run_records_its_teachers_and_chosen_views(distilled: tuple[Path, Path]) -> None:
    run, package = distilled
    history = json.loads((run / "history.json").read_text())
    assert history["method"] == "distill"
    assert sorted(p.name for p in (run / TEACHERS).glob("*.pt")) == ["r0-f0.pt", "r0-f1.pt"]
    teachers = history["teachers"]
    assert teachers["models"] == 2 and teachers["out_of_fold"]["n"] == 15  # every train image predicted once
    assert history["test_time_views"] in (["identity"], ["identity", "hflip"])
    assert set(history["view_choice_val"]) == {"identity", "identity+hflip"}
    assert set(history["timings_s"]) == {"cache", "teachers", "soup", "student"}
    closeness = teachers["served_on_val"]
    assert closeness["kl"] >= 0.0 and 0.0 <= closeness["same_top_class"] <= 1.0
    assert all(set(epoch["val_to_teachers"]) == {"kl", "same_top_class"} for epoch in history["history"])

    card = json.loads((package / "card.json").read_text())
    assert card["input"]["test_time_views"] == history["test_time_views"]
    assert card["training"]["method"] == "distill"
    recorded = card["training"]["teachers"]
    assert recorded["models"] == 2 and recorded["test"]["n"] == 9 and recorded["val"]["n"] == 6
    assert 0.0 <= recorded["test"]["macro_auc"] <= 1.0
    assert recorded["out_of_fold"]["n"] == 15
    assert recorded["served_on_val"] == closeness
    cal = card["metrics"]["calibration"]
    assert set(cal) >= {"ece", "adaptive_ece", "classwise_ece", "brier", "nll", "intervals", "consistency_p"}
    assert 0.0 < cal["consistency_p"]["ece"] <= 1.0
    assert card["decision"]["chosen_on"] == "val"


def test_teachers_are_loaded_not_retrained_when_the_run_is_repeated(
    distilled: tuple[Path, Path], tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path
) -> None:
    run, _ = distilled
    before = {p.name: p.stat().st_mtime_ns for p in (run / TEACHERS).glob("*.pt")}
    again = tmp_path / "again"
    again.mkdir()
    (again / TEACHERS).mkdir()
    for name in before:
        (again / TEACHERS / name).write_bytes((run / TEACHERS / name).read_bytes())
    recipe = load_recipe(distill_recipe(tiny_recipe, tmp_path))
    summary = fit_distilled(recipe, read_manifest(tiny_dataset), again, "pytest again")
    first = json.loads((run / "history.json").read_text())
    # the same teachers give the same out-of-fold predictions
    assert summary["teachers"]["out_of_fold"]["accuracy"] == first["teachers"]["out_of_fold"]["accuracy"]
    assert {p.name: p.stat().st_mtime_ns for p in (again / TEACHERS).glob("*.pt")} == {
        name: (again / TEACHERS / name).stat().st_mtime_ns for name in before
    }


def test_a_weight_soup_averages_the_teachers_and_measures_batchnorm_again(
    tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path
) -> None:
    from oncolens.training.distill import reestimate_batchnorm, weight_soup
    from oncolens.training.train import build_model, load_split
    from oncolens.training.views import test_time_views

    recipe = load_recipe(distill_recipe(tiny_recipe, tmp_path))
    n_frozen = recipe.train.freeze_blocks
    torch.manual_seed(0)
    first = build_model(recipe).state_dict()
    second = {k: v + torch.randn_like(v) if v.dtype.is_floating_point else v.clone() for k, v in first.items()}
    samples, _ = drop_labels(read_manifest(tiny_dataset), recipe.excluded_labels)
    pixels = load_split(samples, "train", recipe).pixels[:8]
    views = test_time_views(build_model(recipe).eval(), pixels, recipe, ("identity", "hflip"))

    soup = weight_soup(recipe, [first, second], views)
    got = soup.state_dict()
    name = "head.weight"
    assert torch.allclose(got[name], (first[name] + second[name]) / 2)
    front_bn = "backbone._bn0.running_mean"  # the stem's BatchNorm never runs on cached maps: averaged only
    assert torch.allclose(got[front_bn], (first[front_bn] + second[front_bn]) / 2)
    assert not soup.training

    # the tail's first BatchNorm now holds the mean of its input over every cached view and image
    tail_bn = soup.backbone._blocks[n_frozen]._bn0  # type: ignore[index]
    momentum = tail_bn.momentum
    seen: list[torch.Tensor] = []
    hook = tail_bn.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    reestimate_batchnorm(soup, views, n_frozen, batch=4)
    hook.remove()
    inputs = torch.cat(seen)
    assert len(seen) == 4  # 2 batches x 2 views
    assert torch.allclose(tail_bn.running_mean, inputs.mean(dim=(0, 2, 3)), atol=1e-5)
    assert momentum is not None and tail_bn.momentum == momentum  # back to its own momentum
    assert not soup.training

    with pytest.raises(ValueError, match="at least one teacher"):
        weight_soup(recipe, [], views)


def test_a_soup_run_serves_the_teachers_average_without_a_student(
    distilled: tuple[Path, Path], tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path
) -> None:
    from oncolens.training.pipeline import finalize

    run, _ = distilled
    distilled_history = json.loads((run / "history.json").read_text())
    assert distilled_history["soup"]["models"] == 2  # a distilled run measures the soup too
    assert set(distilled_history["soup"]["val_uncalibrated"]) >= {"balanced_accuracy", "macro_auc", "loss"}

    soup_run = tmp_path / "soup"
    (soup_run / TEACHERS).mkdir(parents=True)
    for path in (run / TEACHERS).glob("*.pt"):  # the same teachers, loaded instead of trained
        (soup_run / TEACHERS / path.name).write_bytes(path.read_bytes())
    recipe = load_recipe(distill_recipe(tiny_recipe, tmp_path, method='"soup"'))
    samples = read_manifest(tiny_dataset)
    summary = fit_distilled(recipe, samples, soup_run, "pytest soup")
    assert summary["method"] == "soup" and summary["history"] == []
    assert set(summary["timings_s"]) == {"cache", "teachers", "soup"}
    assert summary["best_val"] == summary["soup"]["val_uncalibrated"] == distilled_history["soup"]["val_uncalibrated"]
    served = torch.load(soup_run / "best.pt", weights_only=False)["model"]
    teachers = [torch.load(p, weights_only=True) for p in sorted((soup_run / TEACHERS).glob("*.pt"))]
    head = (teachers[0]["head.weight"] + teachers[1]["head.weight"]) / 2
    assert torch.allclose(served["head.weight"], head)

    package = finalize(recipe, samples, soup_run, tmp_path / "zoo" / "tiny", "tiny")
    card = json.loads((package / "card.json").read_text())
    assert card["training"]["method"] == "soup"
    assert card["training"]["soup"]["models"] == 2
    assert card["training"]["teachers"]["models"] == 2


def test_cached_tail_logits_match_the_exported_model(tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    """Training on cached front maps sees what the exported network computes (fp16 cache rounding only)."""
    from oncolens.training.train import build_model, load_split
    from oncolens.training.views import test_time_views, view_logits

    recipe = load_recipe(distill_recipe(tiny_recipe, tmp_path))
    val = load_split(read_manifest(tiny_dataset), "val", recipe)
    model = build_model(recipe).eval()
    cache = test_time_views(model, val.pixels, recipe, ("identity", "hflip", "rot90"))
    cached = view_logits(model, cache, recipe.train.freeze_blocks).mean(axis=1)
    from oncolens.training.augment import to_input

    with torch.no_grad():
        exported = ExportModel(model, ("identity", "hflip", "rot90"))(
            to_input(torch.from_numpy(val.pixels), recipe.input_spec)
        )[0]
    assert np.abs(cached - exported.numpy()).max() < 2e-2


def test_all_eight_views_make_a_rotation_invariant_model_that_exports_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ExportModel(Classifier(build_backbone("efficientnet-lite0", pretrained=False), 3), TTA_VIEWS).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, features = model(x)
        for turned in (torch.rot90(x, 1, (2, 3)), x.flip(3), x.transpose(2, 3)):
            assert torch.allclose(model(turned)[0], logits, atol=1e-4), "the D4 average ignores orientation"
    assert model.feature_offset(64) == (0.0, 0.0), "the offsets of the eight views cancel"
    assert ExportModel(model, ("identity", "rot180")).feature_offset(64) == (0.0, 0.0)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, 64)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_features = session.run(["logits", "features"], {"image": x.numpy()})
    assert np.abs(onnx_logits - logits.numpy()).max() < 1e-4
    assert np.abs(onnx_features - features.numpy()).max() < 1e-4
    with pytest.raises(ValueError, match=r"unknown test-time views \['spin'\]"):
        ExportModel(model, ("identity", "spin"))


def test_evaluate_writes_per_image_predictions_that_reproduce_the_metrics(
    tiny_package: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    out, csv_path = tmp_path / "metrics.json", tmp_path / "pred.csv"
    args = ["evaluate", "tiny", str(tiny_dataset), "--model-dir", str(tiny_package.parent)]
    result = runner.invoke(app, [*args, "--json", str(out), "--predictions", str(csv_path)])
    assert result.exit_code == 0, result.output
    assert "adaptive_ece" in result.output and "consistency p" in result.output
    report = json.loads(out.read_text())
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [s for s in select_split(read_manifest(tiny_dataset), "test") if s.label != "rare"]
    assert [r["file"] for r in rows] == [s.file.relative_to(tiny_dataset).as_posix() for s in test]
    classes = ["benign_a", "benign_b", "cancer"]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose([float(r["p_malignant"]) for r in rows], probs[:, 2], atol=1e-6)
    correct = [r["predicted"] == r["label"] for r in rows]
    assert np.mean(correct) == pytest.approx(report["accuracy"])
    assert report["calibration"]["nll"] == pytest.approx(
        -np.mean([np.log(float(r[f"p_{r['label']}"])) for r in rows]), abs=1e-4
    )


def test_cv_cross_validates_on_train_and_val_without_reading_test(
    tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path
) -> None:
    recipe = distill_recipe(tiny_recipe, tmp_path)
    out = tmp_path / "cv.json"
    args = ["cv", str(tiny_dataset), "--model-id", "tiny", "--recipe", str(recipe), "--repeats", "2"]
    result = runner.invoke(app, [*args, "--set", "augment.saturation=0.4", "--set", "lr=0.002", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 21  # 15 train + 6 val; the excluded 'rare' row and the 9 test rows are not read
    oof = report["out_of_fold"]
    assert oof["repeats"] == 2 and len(oof["balanced_accuracy_by_repeat"]) == 2
    assert report["recipe"]["augment"]["saturation"] == 0.4 and report["recipe"]["train"]["lr"] == 0.002
    assert set(report["by_views"]) == {"identity", "identity+hflip"}
    assert set(report["by"]["site"]) == {"A", "B"}
    assert "2-fold x 2 out of fold on 21 train+val images" in result.output

    only = runner.invoke(app, [*args[:6], "--only", "site=A"])
    assert only.exit_code == 0, only.output
    assert "out of fold on 12 train+val images" in only.output
    for bad, message in (
        (["--set", "nonsense"], "expected KEY=VALUE"),
        (["--set", "colour=3"], "[train] has no key 'colour'"),
        (["--set", "epochs=many"], "epochs takes a int"),
        (["--only", "hospital=X"], "expected COLUMN=VALUE with a manifest column"),
    ):
        failed = runner.invoke(app, [*args, *bad])
        assert failed.exit_code == 2 and message in failed.output, failed.output


def test_train_val_only_stops_before_test_and_export_packages_the_run_later(
    tiny_dataset: Path, tiny_recipe: Path, tmp_path: Path
) -> None:
    import shutil

    recipe = distill_recipe(tiny_recipe, tmp_path)
    blind = shutil.copytree(tiny_dataset, tmp_path / "no-test-images")
    with (blind / "manifest.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "test":
                (blind / row["file"]).unlink()  # reading any test image would fail the run
    run, package = tmp_path / "run", tmp_path / "zoo" / "tiny"
    common = ["--model-id", "tiny", "--recipe", str(recipe)]
    sets = ["--set", "epochs=2", "--set", "patience=2"]
    args = ["train", str(blind), *common, "--run-dir", str(run), "--out", str(package), *sets, "--val-only"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test not read, no package written" in result.output
    assert not package.exists() and (run / "best.pt").is_file()
    history = json.loads((run / "history.json").read_text())
    assert history["config"]["epochs"] == 2 and history["config"]["patience"] == 2
    assert len(history["history"]) == 2, "the student ran the two epochs --set gave it"

    bad = runner.invoke(app, ["train", str(blind), *common, "--set", "epoch=2", "--val-only"])
    assert bad.exit_code == 2 and "[train] has no key 'epoch'" in bad.output

    forgot = runner.invoke(app, ["export", str(run), str(tiny_dataset), *common, "--out", str(package)])
    assert forgot.exit_code == 2 and "was trained with epochs=2, patience=2" in forgot.output, forgot.output
    assert not package.exists()
    nothing = runner.invoke(app, ["export", str(tmp_path / "no-run"), str(tiny_dataset), *common])
    assert nothing.exit_code == 2 and "holds no best.pt: not a finished training run" in nothing.output

    exported = runner.invoke(app, ["export", str(run), str(tiny_dataset), *common, *sets, "--out", str(package)])
    assert exported.exit_code == 0, exported.output
    card = json.loads((package / "card.json").read_text())
    assert card["training"]["recipe"]["train"]["epochs"] == 2 and card["metrics"]["n"] == 9
    assert card["training"]["command"] == history["command"]
