"""Networks rebuilt from package files, view distillation, repackaging with today's view choice."""

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from oncolens.cli.main import app

torch = pytest.importorskip("torch")

from oncolens.evaluation.datasets import read_manifest  # noqa: E402
from oncolens.training.export import ExportModel, OnnxWeightsError, export_onnx, load_onnx_weights  # noqa: E402
from oncolens.training.qat import onnx_teacher  # noqa: E402
from oncolens.training.recipe import load_recipe  # noqa: E402
from oncolens.training.train import build_model  # noqa: E402
from oncolens.training.view_distill import (  # noqa: E402
    ViewDistillConfig,
    classifier_from_onnx,
    distill_loss,
    distill_views,
)
from oncolens.training.views import candidate_views  # noqa: E402
from oncolens.zoo.package import ONNX, sha256_of  # noqa: E402

runner = CliRunner()


def test_a_package_file_gives_back_its_network_with_batchnorm_folded_out(tiny_package: Path, tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe)
    model = classifier_from_onnx(recipe, tiny_package / ONNX)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    file_logits = onnx_teacher(tiny_package / ONNX)(x.numpy())[0]
    with torch.no_grad():
        two_views, features = ExportModel(model, ("identity", "hflip")).eval()(x)
        one_view = model.eval()(x)[0]
    assert (two_views - file_logits).abs().max() < 1e-4
    assert features.shape[1] == 1280
    assert (one_view - two_views).abs().max() > 1e-4, "one view is a different answer from the two views"
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.allclose(norm.weight, torch.ones_like(norm.weight))
    # exported again, the rebuilt network is the same file's function
    export_onnx(ExportModel(model, ("identity", "hflip")), tiny_package.parent / "again.onnx", 64)
    again = onnx_teacher(tiny_package.parent / "again.onnx")(x.numpy())[0]
    assert (again - file_logits).abs().max() < 1e-4


def test_weights_of_another_network_are_refused(tiny_package: Path, tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe)
    other = build_model(recipe.with_overrides(backbone="efficientnet-lite1"), pretrained=False)
    with pytest.raises(OnnxWeightsError, match="convolutions, not a multiple of the network's"):
        load_onnx_weights(other, tiny_package / ONNX, 64)


def test_the_distillation_loss_is_the_softened_kl_times_t_squared() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    assert distill_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[0.0, 1.0, 0.0]])
    p, q = torch.softmax(teacher / 2, 1), torch.softmax(student / 2, 1)
    expected = float((p * (p.log() - q.log())).sum()) * 4
    assert distill_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_the_image_alone_is_always_a_candidate_where_views_are_chosen(tiny_recipe: Path, tmp_path: Path) -> None:
    path = tmp_path / "views.toml"
    path.write_text(
        tiny_recipe.read_text().replace(
            'tta = ["identity", "hflip"]', 'tta = ["identity", "hflip"]\ntta_candidates = [["identity", "hflip"]]'
        )
    )
    assert candidate_views(load_recipe(path)) == [("identity",), ("identity", "hflip")]
    assert candidate_views(load_recipe(tiny_recipe)) == [("identity", "hflip")], "no candidates: the recipe's views"


def test_a_distilled_student_moves_towards_its_teacher_and_records_the_comparison(
    tiny_package: Path, tiny_recipe: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    recipe = load_recipe(tiny_recipe)
    samples = read_manifest(tiny_dataset)
    student = classifier_from_onnx(recipe, tiny_package / ONNX)
    config = ViewDistillConfig(epochs=2, lr=3e-3, temperature=1.0)
    views = ("identity", "hflip")
    summary = distill_views(recipe, samples, tiny_package / ONNX, views, student, tmp_path / "run", "pytest", config)
    record = summary["view_distillation"]
    assert record["teacher"]["onnx_sha256"] == sha256_of(tiny_package / ONNX)
    assert record["teacher"]["test_time_views"] == list(views)
    assert record["epochs"] == 2 and record["lr"] == 3e-3
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert all(h["val"]["kl_to_teacher"] >= 0 for h in summary["history"])
    assert summary["history"][0]["val"]["kl_to_teacher"] > 0, "one view differs from the teacher's two"
    # the best epoch on val (the untuned network, epoch 0, included) is the one kept
    scores = [h["val"][record["metric"]] for h in summary["history"]]
    assert summary["best_epoch"] == scores.index(max(scores))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["val"] == summary["history"][summary["best_epoch"]]["val"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    start = classifier_from_onnx(recipe, tiny_package / ONNX).state_dict()
    moved = [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert "head.weight" in moved and "backbone._blocks.3._project_conv.weight" in moved
    frozen = ("backbone._conv_stem", "backbone._bn0", *(f"backbone._blocks.{i}." for i in range(3)))
    assert not [k for k in moved if k.startswith(frozen)], "freeze_blocks = 3: the front stays"
    assert all(torch.equal(last["model"][k], start[k]) for k in start if "running_" in k), "statistics stay"
    assert set(summary["view_choice_val"]) == {"identity", "identity+hflip"}
    chosen, metric = summary["test_time_views"], record["metric"]
    teacher_score = record["teacher"]["val"][metric]
    expected = len(chosen) < 2 and summary["view_choice_val"]["+".join(chosen)] >= teacher_score - record["tolerance"]
    assert record["kept"] is expected
    assert json.loads((tmp_path / "run" / "history.json").read_text())["method"] == "view_distill"
    # a repeated run resumes after the last epoch instead of training again
    again = distill_views(
        recipe,
        samples,
        tiny_package / ONNX,
        views,
        classifier_from_onnx(recipe, tiny_package / ONNX),
        tmp_path / "run",
        "pytest",
        config,
    )
    assert [h["epoch"] for h in again["history"]] == [0, 1, 2]
    assert again["history"][-1]["val"] == summary["history"][-1]["val"]


def _distill(dataset: Path, recipe: Path, teacher: Path, out: Path, *more: str) -> Result:
    """``oncolens distill-views tiny`` at version 0.0.2 from ``teacher`` into ``out``."""
    args = ["distill-views", "tiny", str(dataset), "--version", "0.0.2", "--recipe", str(recipe)]
    return runner.invoke(app, [*args, "--teacher", str(teacher), "--out", str(out), *more])


def test_distill_views_cli_writes_a_package_that_names_its_teacher(
    package: Path, tiny_recipe: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    card = json.loads((package / "card.json").read_text())
    ensemble = {"models": 2, "test_time_views": ["identity"], "val": {"n": 6, "balanced_accuracy": 0.5}}
    card["training"]["teachers"] = ensemble  # as a distilled package records its teachers
    (package / "card.json").write_text(json.dumps(card))
    out = tmp_path / "student" / "tiny"
    result = _distill(tiny_dataset, tiny_recipe, package, out, "--epochs", "1", "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert card["version"] == "0.0.2"
    training = card["training"]
    assert training["method"] == "view_distill"
    assert training["view_distillation"]["teacher"]["version"] == "0.0.1"
    assert training["view_distillation"]["teacher"]["onnx_sha256"] == sha256_of(package / ONNX)
    assert training["command"] == card["export"]["command"], "the command that made this network"
    assert training["teachers"] == ensemble, "the ensemble behind the teacher's network stays on record"
    assert (
        card["input"]["test_time_views"]
        == json.loads((tmp_path / "run" / "history.json").read_text())["test_time_views"]
    )


def test_distill_views_refuses_a_package_with_one_view(
    package: Path, tiny_recipe: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    card = json.loads((package / "card.json").read_text())
    card["input"]["test_time_views"] = ["identity"]
    (package / "card.json").write_text(json.dumps(card))
    result = _distill(tiny_dataset, tiny_recipe, package, tmp_path / "out")
    assert result.exit_code == 2
    assert "answers with one view already: there is nothing to distil" in result.output
    missing = _distill(tiny_dataset, tiny_recipe, tmp_path / "nowhere", tmp_path / "out")
    assert missing.exit_code == 2 and "card.json" in missing.output
    card["input"]["test_time_views"] = ["identity", "vflip"]  # not what the file computes
    (package / "card.json").write_text(json.dumps(card))
    wrong = _distill(tiny_dataset, tiny_recipe, package, tmp_path / "out")
    assert wrong.exit_code == 2 and "the rebuilt network's logits differ by" in wrong.output
