"""Re-derive a shipped card's risk levels, figures and out-of-domain shares without retraining.

For each model it runs the served file (int8 where it passed its gate, as ``oncolens serve`` does) over
the dataset's ``val`` and ``test`` splits and rewrites, in ``card.json``:

* ``risk_policy``: levels chosen on val by ``training.calibrate.risk_policy`` (borders at the cut that
  keeps val sensitivity >= 0.95, the card's malignant call and the cut with val specificity >= 0.95,
  no level narrower than 0.05), each with its operating point in words and what it meant on test;
  the call threshold stays the one training chose on val;
* ``metrics.rule`` (which decision rule the card's class figures are for) and ``metrics.argmax``
  (accuracy, balanced accuracy and macro F1 of the named class, the most probable one, as served);
* ``domain.flagged``: the share of the own test images flagged out of domain, per class and by reason.

The model file, its sha256 and everything else in the card stay as they are.

    python scripts/rederive_risk_levels.py --datasets ../shared/datasets            # every shipped model
    python scripts/rederive_risk_levels.py --datasets ../shared/datasets skin-ham10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from oncolens.decision import p_malignant, probabilities
from oncolens.evaluation.calibrate import risk_policy
from oncolens.evaluation.datasets import Sample, drop_labels, encode_labels, open_rgb, read_manifest, select_split
from oncolens.training.pipeline import named_class_figures
from oncolens.training.recipe import load_recipe
from oncolens.zoo.card import read_card
from oncolens.zoo.package import ModelPackage
from oncolens.zoo.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "src" / "oncolens" / "zoo"


def outputs(package: ModelPackage, samples: list[Sample]) -> tuple[np.ndarray, list[str]]:
    """Calibrated probabilities [N, C] and each image's out-of-domain reason ("" in domain)."""
    probs, reasons = [], []
    for start in range(0, len(samples), 16):
        images = [open_rgb(s.file) for s in samples[start : start + 16]]
        logits, features = package.run(preprocess(images, package.input_spec), with_features=True)
        probs.append(probabilities(package.card, logits))
        assert features is not None
        reasons += [check.reason if check is not None else "" for check in package.domain_checks(features)]
    return np.concatenate(probs), reasons


def rederive(model_id: str, datasets: Path, n_boot: int) -> dict[str, Any]:
    folder = ZOO / model_id
    package = ModelPackage.load(folder, precision="int8")
    card_path = folder / "card.json"
    data = json.loads(card_path.read_text(encoding="utf-8"))
    recipe = load_recipe(ROOT / "recipes" / f"{model_id}.toml")
    samples = read_manifest(datasets / data["dataset"]["name"])
    excluded = list(data["dataset"].get("excluded_labels", []))
    classes, malignant = package.class_ids, np.asarray(package.malignant)
    split = {}
    for name in ("val", "test"):
        chosen, _ = drop_labels(select_split(samples, name), excluded)
        y = encode_labels(chosen, classes)
        probs, reasons = outputs(package, chosen)
        split[name] = (y, probs, reasons)
    (y_val, val_probs, _), (y_test, test_probs, test_reasons) = split["val"], split["test"]
    p_val, p_test = p_malignant(val_probs, list(malignant)), p_malignant(test_probs, list(malignant))
    call = float(data["risk_policy"]["malignant_threshold"])
    policy = risk_policy(p_val, malignant[y_val], recipe.risk, (p_test, malignant[y_test]), call=call)
    policy["reasoning"] = (
        f"{policy['reasoning']} Is-malignant: {data['risk_policy']['reasoning'].split('Is-malignant: ')[-1]} "
        f"Levels re-derived without retraining by scripts/rederive_risk_levels.py on the served "
        f"({package.precision}) model."
    )
    data["risk_policy"] = policy
    named = named_class_figures(y_test, test_probs, classes, list(malignant), call, data.get("decision", {}), n_boot)
    data["metrics"] |= named
    flagged = np.asarray([r != "" for r in test_reasons])
    by_class = {
        c: {
            "n": int((y_test == k).sum()),
            "flagged": float(flagged[y_test == k].mean()) if (y_test == k).any() else None,
        }
        for k, c in enumerate(classes)
    }
    if data.get("domain"):
        data["domain"]["flagged"]["own_test"] = float(flagged.mean())
        data["domain"]["flagged"]["own_test_n"] = len(flagged)
        data["domain"]["flagged"]["own_test_by_class"] = by_class
        data["domain"]["flagged"]["own_test_reasons"] = dict(Counter(r for r in test_reasons if r))
    card_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    read_card(card_path)  # still a valid card
    return {
        "model": model_id,
        "levels": [(lv["level"], round(lv["min"], 3)) for lv in policy["levels"]],
        "call": round(call, 3),
        "argmax balanced accuracy": round(float(named["argmax"]["balanced_accuracy"]), 3),
        "flagged": round(float(flagged.mean()), 3),
        "reasons": dict(Counter(r for r in test_reasons if r)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="model ids (default: every package in the zoo)")
    parser.add_argument("--datasets", type=Path, required=True, help="folder holding <dataset>/manifest.csv")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    models = args.models or sorted(p.parent.name for p in ZOO.glob("*/card.json"))
    for model_id in models:
        start = time.perf_counter()
        summary = rederive(model_id, args.datasets, args.n_boot)
        print(json.dumps(summary), f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
