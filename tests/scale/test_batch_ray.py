"""``oncolens batch --engine ray``: Ray Data reads the files (a folder or an S3 prefix on a real
SeaweedFS server), actors holding one ONNX session each screen them, and the rows are those of the
local engine, resume included. The test starts a local Ray cluster (2 CPUs) and stops it."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from oncolens.cli.main import app
from tests.seaweed import S3Server

ray = pytest.importorskip("ray")
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("screening")
    (root / "clinic-b").mkdir()
    rng = np.random.default_rng(7)
    for i in range(9):
        pixels = rng.integers(0, 60, (40 + i, 50, 3), dtype=np.uint8)
        pixels[10:20, 10:20, 0] = 250 if i % 2 else 0
        Image.fromarray(pixels).save(root / ("clinic-b" if i >= 6 else ".") / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    (root / ".hidden.png").write_bytes(b"left out")
    return root


def batch(source: str, out: Path, package: Path, *extra: str) -> str:
    args = ["batch", source, "--model", "blob", "--out", str(out), "--model-dir", str(package.parent), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def same_rows(ray_rows: list[dict], local_rows: list[dict]) -> None:
    assert [r["file"] for r in ray_rows] == [r["file"] for r in local_rows]  # same files, same order
    for got, want in zip(ray_rows, local_rows, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            if key == "probabilities":
                assert got[key] == pytest.approx(want[key], abs=1e-6)
            elif key not in ("confidence", "p_malignant", "ood_score", "heatmap"):
                assert got[key] == want[key], (got["file"], key)
        assert got["status"] == "error" or got["confidence"] == pytest.approx(want["confidence"], abs=1e-6)


def test_ray_writes_the_local_engines_rows(folder: Path, blob_package: Path, tmp_path: Path) -> None:
    local = tmp_path / "local.jsonl"
    batch(str(folder), local, blob_package)
    out, maps = tmp_path / "ray.jsonl", tmp_path / "maps"
    output = batch(str(folder), out, blob_package, "--engine", "ray", "--batch-size", "4", "--heatmaps", str(maps))
    assert (
        "9 image(s) analysed" in output and "1 not images (skipped)" in output and "1 could not be analysed" in output
    )
    assert "not analysed broken.jpg: " in output
    got = rows(out)
    same_rows(got, rows(local))
    assert {r["status"] for r in got} == {"ok", "error"} and ".hidden.png" not in {r["file"] for r in got}
    for row in got:
        if row["status"] == "ok":  # the driver wrote each heat-map, at the image's own size
            assert Image.open(row["heatmap"]).size == Image.open(folder / row["file"]).size


def test_ray_resumes_after_an_interrupted_write(folder: Path, blob_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray.jsonl"
    batch(str(folder), out, blob_package, "--engine", "ray", "--actors", "1")
    first = out.read_text().splitlines()
    out.write_text("\n".join(first[:4]) + "\n" + first[4][:30])  # killed while writing the 5th row
    output = batch(str(folder), out, blob_package, "--engine", "ray")
    assert "4 already in ray.jsonl" in output
    assert sorted(out.read_text().splitlines()) == sorted(first)
    assert "0 image(s) analysed" in batch(str(folder), out, blob_package, "--engine", "ray")


def test_ray_reads_an_s3_prefix(
    folder: Path, blob_package: Path, tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.bucket("archive")
    client = s3.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(
            Bucket=bucket, Key=f"screening/2026/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
        )
    for name, value in s3.env(bucket).items():
        monkeypatch.setenv(name, value)
    local = tmp_path / "local.jsonl"
    batch(str(folder), local, blob_package)
    out = tmp_path / "s3.jsonl"
    output = batch(f"s3://{bucket}/screening/2026", out, blob_package, "--engine", "ray")
    assert "9 image(s) analysed" in output
    same_rows(rows(out), rows(local))
    missing = runner.invoke(
        app, ["batch", "s3://no-such-bucket/x", "--model", "blob", "--out", str(tmp_path / "m.jsonl"),
              "--model-dir", str(blob_package.parent), "--engine", "ray"],
    )  # fmt: skip
    assert missing.exit_code == 2 and "cannot list s3://no-such-bucket/x" in missing.output


def test_engine_options_are_checked(folder: Path, blob_package: Path, tmp_path: Path) -> None:
    base = ["batch", "--model", "blob", "--out", str(tmp_path / "r.jsonl"), "--model-dir", str(blob_package.parent)]
    local_s3 = runner.invoke(app, [*base, "s3://archive/screening"])
    assert local_s3.exit_code == 2 and "an s3:// source is read with --engine ray" in local_s3.output
    actors = runner.invoke(app, [*base, str(folder), "--actors", "2"])
    assert actors.exit_code == 2 and "--ray-address and --actors go with --engine ray" in actors.output
    engine = runner.invoke(app, [*base, str(folder), "--engine", "spark"])
    assert engine.exit_code == 2 and "--engine must be local or ray, got 'spark'" in engine.output
