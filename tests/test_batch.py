"""oncolens batch: a folder in, one row per image out, failures reported, other files left out, resumable."""

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from oncolens.cli.main import app
from oncolens.zoo import ModelPackage

runner = CliRunner()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "screening"
    (root / "clinic-b").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        pixels = rng.integers(0, 60, (40, 50, 3), dtype=np.uint8)
        pixels[10:20, 10:20, 0] = 250 if i % 2 else 0
        Image.fromarray(pixels).save(root / ("clinic-b" if i >= 3 else ".") / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "manifest.csv").write_text("file,label\nimg0.png,benign\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    (root / ".DS_Store").write_bytes(b"hidden")
    return root


def invoke(folder: Path, out: Path, package: Path, *extra: str) -> str:
    args = ["batch", str(folder), "--model", "blob", "--out", str(out), "--model-dir", str(package.parent), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_csv_rows_errors_and_heatmaps(folder: Path, blob_package: Path, tmp_path: Path) -> None:
    out, maps = tmp_path / "results.csv", tmp_path / "maps"
    output = invoke(folder, out, blob_package, "--heatmaps", str(maps), "--workers", "3", "--batch-size", "2")
    assert "5 image(s) analysed" in output and "1 could not be analysed" in output and "images/s" in output
    # files that are no image by their first bytes are left out and counted apart, not as errors
    assert "2 not images (skipped)" in output and "not images, left out: manifest.csv, notes.txt" in output
    assert "not analysed broken.jpg: " in output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    by_file = {r["file"]: r for r in rows}
    assert set(by_file) == {
        "img0.png",
        "img1.png",
        "img2.png",
        "clinic-b/img3.png",
        "clinic-b/img4.png",
        "broken.jpg",
    }
    assert by_file["broken.jpg"]["status"] == "error" and "cannot be read as one" in by_file["broken.jpg"]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    for row in ok:
        assert float(row["p_blob"]) + float(row["p_plain"]) == pytest.approx(1.0, abs=1e-5)
        assert row["top_class"] == ("blob" if float(row["p_blob"]) >= 0.5 else "plain")
        assert Image.open(row["heatmap"]).size == (50, 40)
    # the red-blob images score higher on "blob" than the plain ones
    assert float(by_file["img1.png"]["p_blob"]) > float(by_file["img0.png"]["p_blob"])


def test_a_rerun_resumes_after_an_interrupted_write(folder: Path, blob_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    invoke(folder, out, blob_package)
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    first = [json.loads(line) for line in lines]
    # as if killed while writing the 4th row: three whole lines and half of one
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    output = invoke(folder, out, blob_package)
    assert "3 already in results.jsonl" in output
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in again) == sorted(r["file"] for r in first)
    assert {r["file"]: r.get("probabilities") for r in again} == {r["file"]: r.get("probabilities") for r in first}
    assert "0 image(s) analysed" in invoke(folder, out, blob_package)


def test_bad_output_and_another_models_file_are_refused(folder: Path, blob_package: Path, tmp_path: Path) -> None:
    args = ["batch", str(folder), "--model", "blob", "--model-dir", str(blob_package.parent)]
    wrong = runner.invoke(app, [*args, "--out", str(tmp_path / "results.xlsx")])
    assert wrong.exit_code == 2 and ".csv or .jsonl" in wrong.output
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"file": "img0.png", "model_id": "skin-ham10000", "status": "ok"}) + "\n")
    refused = runner.invoke(app, [*args, "--out", str(other)])
    assert refused.exit_code == 2 and "skin-ham10000" in refused.output
    missing = runner.invoke(app, [*args, "--out", str(tmp_path / "r.csv"), "--model", "nope"])
    assert missing.exit_code == 2 and "no model 'nope'" in missing.output


def test_images_of_another_modality_are_reported_not_scored(blob_package: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(root / "grey.png")
    pixels = np.zeros((40, 50, 3), np.uint8)
    pixels[10:20, 10:20, 0] = 250
    Image.fromarray(pixels).save(root / "colour.png")
    out = tmp_path / "r.csv"
    output = invoke(root, out, blob_package)
    assert "1 image(s) analysed" in output and "not analysed grey.png: this is a greyscale image" in output


def test_models_lists_the_zoo_with_figures_and_licence_flags() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line and not line.startswith("id ")}
    for model_id in ("breast-us", "cervical-herlev", "oral-photo", "skin-ham10000", "skin-isic9", "thyroid-us"):
        assert model_id in lines
    assert "skin/dermoscopy" in lines["skin-ham10000"] and lines["skin-ham10000"].endswith("non-commercial")
    rows = [json.loads(line) for line in runner.invoke(app, ["models", "--json"]).output.splitlines()]
    ham = next(r for r in rows if r["id"] == "skin-ham10000")
    assert ham["classes"] == 7 and 0.5 < ham["macro_auc"] <= 1.0 and ham["non_commercial"] is True


def test_the_model_runs_a_batch_in_slices_of_batch_max_passes(
    folder: Path, blob_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--batch-size`` images are decoded and written together; BATCH_MAX bounds each session run."""
    sizes: list[int] = []
    original = ModelPackage.run

    def recording(self: ModelPackage, *args: Any, **kwargs: Any) -> Any:
        session_run = self.session.run

        def counted(names: list[str], feeds: dict[str, np.ndarray], *rest: Any) -> Any:
            sizes.append(len(feeds["image"]))
            return session_run(names, feeds, *rest)

        monkeypatch.setattr(self.session, "run", counted)
        try:
            return original(self, *args, **kwargs)
        finally:
            monkeypatch.setattr(self.session, "run", session_run)

    monkeypatch.setattr(ModelPackage, "run", recording)
    monkeypatch.setenv("ONCOLENS_BATCH_MAX", "2")
    invoke(folder, tmp_path / "results.csv", blob_package, "--batch-size", "5")
    # six files: a step of 5 (the broken one and 4 images: runs of 2 and 2), then a step of 1 image
    assert sizes == [2, 2, 1]
