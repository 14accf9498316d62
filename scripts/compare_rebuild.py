"""Compare a rebuilt model package with the shipped one: is it the same network, the same figures?

    python scripts/compare_rebuild.py REBUILT_DIR [--against PACKAGE_DIR]

REBUILT_DIR is what a card's command wrote (``oncolens train … --out REBUILT_DIR``, ``oncolens
distill-views … --out REBUILT_DIR``); ``--against`` defaults to the installed package of the same id.
Printed: both ``model.onnx`` sha256, then the `test` and `val` figures of both cards side by side
(with the teachers' out-of-fold figures where the run had teachers) and the largest difference. The
time, machine and command of the run are not compared: they differ by nature. Exit status 0 when the
two ONNX files are the same bytes, 1 when they are not (the figures say by how much they differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from oncolens.zoo import BUILTIN_DIR
from oncolens.zoo.package import sha256_of

KEYS = ("accuracy", "balanced_accuracy", "macro_auc", "ece")


def figures(card: dict[str, Any]) -> dict[str, float]:
    """The card's headline figures, flattened to 'section.key' -> value."""
    out: dict[str, float] = {}
    teachers = card.get("training", {}).get("teachers") or {}
    sections = {
        "test": card["metrics"],
        "val": card.get("metrics_val") or {},
        "teachers.oof": teachers.get("out_of_fold") or {},
    }
    for name, section in sections.items():
        for key in KEYS:
            if isinstance(section.get(key), int | float):
                out[f"{name}.{key}"] = float(section[key])
    malignant = card["metrics"].get("malignant") or {}
    if isinstance(malignant.get("auc"), int | float):
        out["test.malignant_auc"] = float(malignant["auc"])
    return out


def read_card(directory: Path) -> dict[str, Any]:
    path = directory / "card.json"
    if not path.is_file() or not (directory / "model.onnx").is_file():
        raise SystemExit(f"error: {directory} holds no card.json and model.onnx: not a model package")
    card: dict[str, Any] = json.loads(path.read_text())
    return card


def compare(rebuilt: Path, shipped: Path | None = None) -> tuple[bool, list[str]]:
    """Whether the two ONNX files are identical, and the lines of the report. ``shipped`` defaults
    to the installed package of the rebuilt one's id."""
    new = read_card(rebuilt)
    shipped = shipped or BUILTIN_DIR / new["id"]
    old = read_card(shipped)
    if new["id"] != old["id"]:
        raise SystemExit(f"error: {rebuilt} is {new['id']!r}, {shipped} is {old['id']!r}: not the same model")
    new_sha, old_sha = sha256_of(rebuilt / "model.onnx"), sha256_of(shipped / "model.onnx")
    same = new_sha == old_sha
    lines = [
        f"{new['id']}: rebuilt {new['version']} ({rebuilt}) against {old['version']} ({shipped})",
        f"model.onnx sha256 rebuilt {new_sha}",
        f"                  against {old_sha}",
        "the same network, byte for byte" if same else "a different network",
        f"{'figure':<30}{'rebuilt':>10}{'against':>10}{'difference':>12}",
    ]
    a, b = figures(new), figures(old)
    worst = 0.0
    for key in sorted(a.keys() & b.keys()):
        worst = max(worst, abs(a[key] - b[key]))
        lines.append(f"{key:<30}{a[key]:>10.4f}{b[key]:>10.4f}{a[key] - b[key]:>+12.4f}")
    for key in sorted(a.keys() ^ b.keys()):
        lines.append(f"{key:<30} only in the {'rebuilt' if key in a else 'other'} card")
    lines.append(f"largest difference {worst:.4f}")
    return same, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rebuilt", type=Path, help="the package folder the card's command wrote")
    parser.add_argument("--against", type=Path, help="the package to compare with (default: the installed one)")
    args = parser.parse_args()
    same, lines = compare(args.rebuilt, args.against)
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
