"""Write each built-in package's ``monitoring`` block: P(malignant) of its dataset's test split, as served.

Drift monitoring (``GET /api/v1/models/{id}/monitoring``) compares a site's cases with this distribution.
New packages get it from the training pipeline; this adds it to the packages built before it existed,
by running the served file (int8 where it passed its gate, else fp32) on ``../shared/datasets/<id>``:

    python scripts/record_monitoring_reference.py [--datasets ../shared/datasets] [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from oncolens.decision import p_malignant, probabilities
from oncolens.evaluation.datasets import drop_labels, read_manifest, select_split
from oncolens.evaluation.drift import reference_distribution
from oncolens.evaluation.evaluate import dataset_logits
from oncolens.zoo import BUILTIN_DIR, ONE_NETWORK, ModelPackage
from oncolens.zoo.package import CARD


def record(package_dir: Path, dataset_dir: Path) -> int:
    package = ModelPackage.load(package_dir)  # the serving default: int8 where it passed its gate
    test, _ = drop_labels(select_split(read_manifest(dataset_dir), "test"), list(package.card.dataset.excluded_labels))
    logits = dataset_logits(lambda x: package.run(x)[0], test, package.input_spec)
    p = p_malignant(probabilities(package.card, logits), package.malignant)
    card_path = package_dir / CARD
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["monitoring"] = reference_distribution(
        p, "test", f"{package.precision} file, scripts/record_monitoring_reference.py"
    )
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model ids (default: every built-in package)")
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    args = parser.parse_args()
    ids = args.models or sorted(p.parent.name for p in BUILTIN_DIR.glob(f"*/{CARD}"))
    for model_id in ids:
        for folder in (BUILTIN_DIR / model_id, BUILTIN_DIR / model_id / ONE_NETWORK):
            if (folder / CARD).is_file():
                n = record(folder, args.datasets / model_id)
                print(f"{folder.relative_to(BUILTIN_DIR)}: {n} test images")


if __name__ == "__main__":
    main()
