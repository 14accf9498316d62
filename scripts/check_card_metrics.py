"""Re-measure every shipped card's test metrics with ``oncolens evaluate``'s code path.

The images go through the serving decoder (``imaging.decode_image``, via ``datasets.open_rgb``), so a
card whose numbers this reproduces measured what patients' images get. Needs the datasets:
``python scripts/check_card_metrics.py ../shared/datasets`` prints a table and writes
``card_metrics_check.json`` next to where it runs. With ``--add-calibration``, a card without the
calibration block (equal-mass and class-wise ECE, Brier, NLL, consistency p; cards written before
it existed) gets the one measured here, when its headline figures agree with the card's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from oncolens.evaluation.evaluate import evaluate_package
from oncolens.zoo import BUILTIN_DIR, Zoo

KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", type=Path, help="Folder holding one dataset folder per model id.")
    parser.add_argument("--out", type=Path, default=Path("card_metrics_check.json"))
    parser.add_argument(
        "--add-calibration", action="store_true", help="Write the calibration block into cards lacking it."
    )
    args = parser.parse_args()
    zoo = Zoo([BUILTIN_DIR])
    rows, worst = {}, 0.0
    print(f"{'model':<17}{'n':>6}" + "".join(f"{k:>19}" for k in KEYS) + f"{'max |diff|':>12}{'s':>6}")
    for model_id in zoo.ids():
        package = zoo.get(model_id)
        start = time.perf_counter()
        missing = args.add_calibration and "calibration" not in package.card.metrics
        report = evaluate_package(package, args.datasets / model_id, "test", n_boot=1000 if missing else 10)
        card = package.card.metrics
        diffs = {k: abs(report[k] - card[k]) for k in KEYS}
        worst = max(worst, *diffs.values())
        seconds = time.perf_counter() - start
        rows[model_id] = {
            "n": report["n"],
            "evaluate": {k: report[k] for k in KEYS},
            "card": {k: card[k] for k in KEYS},
        }
        if missing and max(diffs.values()) < 1e-9:
            path = package.directory / "card.json"
            data = json.loads(path.read_text())
            data["metrics"]["calibration"] = report["calibration"]
            path.write_text(json.dumps(data, indent=2) + "\n")
            print(f"{model_id}: calibration block added to {path}")
        cells = "".join(f"{report[k]:>9.4f}/{card[k]:<9.4f}" for k in KEYS)
        print(f"{model_id:<17}{report['n']:>6}{cells}{max(diffs.values()):>12.1e}{seconds:>6.0f}")
    args.out.write_text(json.dumps({"max_abs_difference": worst, "models": rows}, indent=2) + "\n")
    print(f"\nevaluate / card; largest difference {worst:.1e}; wrote {args.out}")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
