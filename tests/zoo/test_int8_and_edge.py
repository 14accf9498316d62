"""int8 copies behind an accuracy gate, and edge exports (.ort + spec) that give the server's answers."""

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from typer.testing import CliRunner

from oncolens.cli.main import app
from oncolens.evaluation.datasets import open_rgb
from oncolens.training import quantize
from oncolens.training.pipeline import record_sample_expectations
from oncolens.zoo import Zoo
from oncolens.zoo.card import read_card
from oncolens.zoo.package import ModelPackage, PackageError

runner = CliRunner()


@pytest.fixture()
def golden(tiny_dataset: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "samples"
    folder.mkdir()
    rows = ["file,label"]
    for name in ("benign_a_7.png", "benign_b_8.png", "cancer_9.png"):
        shutil.copy(tiny_dataset / "images" / name, folder / name)
        rows.append(f"{name},{name.rsplit('_', 1)[0]}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_a_copy_that_passes_the_gate_serves_and_is_recorded(
    package: Path, golden: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # limits no copy can miss: this test is about what happens after a pass
    for name in ("MAX_DELTA_AUROC", "MAX_DELTA_BALANCED_ACCURACY", "MAX_ECE_INCREASE", "GOLDEN_TOLERANCE"):
        monkeypatch.setattr(quantize, name, 10.0)
    monkeypatch.setattr(quantize, "MIN_HEATMAP_CORRELATION", -10.0)
    info = quantize.add_int8(package, tiny_dataset, golden, calibration_images=12, log=lambda _: None)
    assert info.passed and (package / "model.int8.onnx").is_file()
    card = read_card(package / "card.json")
    assert card.int8 is not None and card.int8.passed and card.int8.calibration["split"] == "train"
    assert card.int8.calibration["images"] == 12 and sum(card.int8.calibration["per_class"].values()) == 12
    gate = card.int8.gate
    assert [c["criterion"] for c in gate["checks"]] == [
        "val |delta macro AUROC|", "val |delta balanced accuracy|", "val ECE increase",
        "test |delta macro AUROC|", "test |delta balanced accuracy|", "test ECE increase",
        "golden samples: largest probability change", "golden samples: lowest heat-map correlation",
    ]  # fmt: skip
    for split in ("val", "test"):
        for precision in ("fp32", "int8"):
            figures = gate["figures"][split][precision]
            assert 0.0 <= figures["balanced_accuracy"] <= 1.0 and figures["n"] > 0
    assert set(gate["golden"]) == {"benign_a_7.png", "benign_b_8.png", "cancer_9.png"}
    # serving picks the int8 file by default, fp32 when asked
    assert ModelPackage.load(package).precision == "int8"
    assert ModelPackage.load(package, precision="fp32").precision == "fp32"
    assert Zoo([package.parent], precision="fp32").get("tiny").precision == "fp32"
    # the golden expectations record both files; the int8 numbers are the int8 file's own
    record_sample_expectations(package, golden)
    expected = json.loads((golden / "expected.json").read_text())
    assert expected["sha256"] == card.sha256 and expected["int8"]["sha256"] == card.int8.sha256
    int8 = ModelPackage.load(package).predict([open_rgb(golden / "cancer_9.png")]).probs[0]
    recorded = expected["int8"]["probs"]["cancer_9.png"]
    assert int8.tolist() == pytest.approx([recorded[c] for c in card.class_ids], abs=1e-6)
    # a changed int8 file is refused, as a changed fp32 file is
    with (package / "model.int8.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PackageError, match="does not match the card's int8 sha256"):
        ModelPackage.load(package)


def test_a_copy_that_fails_the_gate_is_removed_and_fp32_serves(
    package: Path, golden: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantize, "MIN_HEATMAP_CORRELATION", 1.01)  # no copy reaches it
    info = quantize.add_int8(package, tiny_dataset, golden, calibration_images=12, log=lambda _: None)
    assert not info.passed and not (package / "model.int8.onnx").exists()
    card = read_card(package / "card.json")
    assert card.int8 is not None and not card.int8.passed and card.int8.file == "" and card.int8.sha256 == ""
    failed = [c["criterion"] for c in card.int8.gate["checks"] if not c["passed"]]
    assert "golden samples: lowest heat-map correlation" in failed
    assert ModelPackage.load(package).precision == "fp32"  # the failed copy never serves


def test_the_quantize_command_reports_each_criterion(package: Path, golden: Path, tiny_dataset: Path) -> None:
    result = runner.invoke(app, ["quantize", "tiny", str(tiny_dataset), "--model-dir", str(package.parent)])
    assert result.exit_code == 0, result.output
    assert "val |delta macro AUROC|" in result.output and "(limit 0.005)" in result.output
    assert "tiny int8 passed: the int8 file serves" in result.output or "tiny int8 failed: fp32 serves" in result.output


def images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(40, 50), (64, 64), (90, 30)]):
        pixels = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
        pixels[5:20, 5:20, i % 3] = 240
        path = folder / f"case-{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_an_edge_export_gives_the_servers_answers(blob_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "edge"
    result = runner.invoke(app, ["export-edge", "blob", str(out), "--model-dir", str(blob_package.parent)])
    assert result.exit_code == 0, result.output
    assert "blob has no int8 copy: wrote the fp32 model" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "blob.ort", "oncolens-edge.json", "predict.py", "required_operators.config",
    ]  # fmt: skip
    spec = json.loads((out / "oncolens-edge.json").read_text())
    assert spec["model"]["precision"] == "fp32" and spec["input"]["shape"] == ["N", 3, 64, 64]
    assert [c["id"] for c in spec["classes"]] == ["blob", "plain"]
    # the .ort file loads in ONNX Runtime and runs
    session = ort.InferenceSession(str(out / "blob.ort"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    # the device runner (no OncoLens imports) follows the spec to the server's probabilities and risk
    device = runpy.run_path(str(out / "predict.py"))
    paths = images(tmp_path)
    answers = device["predict"](paths, out)
    package = ModelPackage.load(blob_package)
    served = package.predict([open_rgb(p) for p in paths])
    for answer, probs, p_mal in zip(answers, served.probs, served.p_malignant, strict=True):
        assert [answer["probabilities"][c] for c in package.class_ids] == pytest.approx(probs.tolist(), abs=1e-5)
        assert answer["p_malignant"] == pytest.approx(float(p_mal), abs=1e-5)
        levels = [lv for lv in package.card.risk_policy.levels if lv.min <= p_mal]
        assert answer["risk_level"] == str(levels[-1].level)
    assert "Not on the device: the server's out-of-domain check" in (out / "README.md").read_text()


def test_edge_export_errors_are_clear(blob_package: Path, tmp_path: Path) -> None:
    base = ["export-edge", "--model-dir", str(blob_package.parent)]
    unknown = runner.invoke(app, [*base, "nope", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "no model 'nope'" in unknown.output
    bad = runner.invoke(app, [*base, "blob", str(tmp_path / "x"), "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision must be int8 or fp32, got 'fp16'" in bad.output


def test_a_package_built_outside_the_zoo_leaves_the_shipped_expectations_alone(
    package: Path, golden: Path, tmp_path: Path
) -> None:
    from oncolens.cli.main import _expected_file

    assert _expected_file(None) is None  # into the zoo: the samples' own expected.json
    beside = _expected_file(tmp_path / "candidate")
    assert beside == tmp_path / "candidate.samples-expected.json"
    assert record_sample_expectations(package, golden, beside) == 3
    assert not (golden / "expected.json").exists()
    assert set(json.loads(beside.read_text())["images"]) == {"benign_a_7.png", "benign_b_8.png", "cancer_9.png"}
