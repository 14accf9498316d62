"""scripts/compare_rebuild.py: a rebuilt package against the shipped one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from oncolens.zoo import BUILTIN_DIR

SCRIPT = Path(__file__).parents[2] / "scripts" / "compare_rebuild.py"


def run(*args: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=False)


def test_an_identical_rebuild_passes_and_a_different_one_is_shown_by_how_much(tmp_path: Path) -> None:
    rebuilt = tmp_path / "breast-us"
    shutil.copytree(BUILTIN_DIR / "breast-us", rebuilt)
    shipped_accuracy = json.loads((rebuilt / "card.json").read_text())["metrics"]["accuracy"]

    same = run(rebuilt)
    assert same.returncode == 0, same.stderr
    assert "the same network, byte for byte" in same.stdout
    assert "largest difference 0.0000" in same.stdout
    assert f"test.accuracy{'':<17}{shipped_accuracy:>10.4f}{shipped_accuracy:>10.4f}{0.0:>+12.4f}" in same.stdout

    card = json.loads((rebuilt / "card.json").read_text())
    card["metrics"]["accuracy"] = shipped_accuracy + 0.0125
    (rebuilt / "card.json").write_text(json.dumps(card))
    with (rebuilt / "model.onnx").open("ab") as onnx:
        onnx.write(b"\0")
    other = run(rebuilt)
    assert other.returncode == 1
    assert "a different network" in other.stdout
    assert f"{shipped_accuracy + 0.0125:>10.4f}{shipped_accuracy:>10.4f}{0.0125:>+12.4f}" in other.stdout
    assert "largest difference 0.0125" in other.stdout


def test_a_folder_that_is_no_package_or_another_model_is_refused_with_a_message(tmp_path: Path) -> None:
    empty = run(tmp_path)
    assert empty.returncode != 0
    assert f"{tmp_path} holds no card.json and model.onnx: not a model package" in empty.stderr
    no_network = tmp_path / "breast-us"
    no_network.mkdir()
    shutil.copy(BUILTIN_DIR / "breast-us" / "card.json", no_network)
    half = run(no_network)
    assert half.returncode != 0 and "Traceback" not in half.stderr
    assert f"{no_network} holds no card.json and model.onnx: not a model package" in half.stderr

    other = run(BUILTIN_DIR / "breast-us", "--against", BUILTIN_DIR / "thyroid-us")
    assert other.returncode != 0
    assert "is 'breast-us'" in other.stderr and "is 'thyroid-us'" in other.stderr
    assert "not the same model" in other.stderr
