"""Print, from the shipped cards, each ensemble against the one-network build it was measured against.

    python scripts/ensemble_table.py

Per model: what serves, the members and how they combine, the cost (one image, p50, measured in the
build's run), val after calibration (the rule's inputs), the teachers' pooled out-of-fold figures on
train, and test (read once, for the card) for both builds. Markdown, for the models page and notes.
"""

from __future__ import annotations

import json
from typing import Any

from oncolens.zoo import BUILTIN_DIR, ONE_NETWORK


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "–"


def _test(metrics: dict[str, Any]) -> str:
    malignant = metrics.get("malignant") or {}
    consistency = (metrics.get("calibration") or {}).get("consistency_p", {}).get("ece")
    return (
        f"acc {_f(metrics.get('accuracy'))} · bal-acc {_f(metrics.get('balanced_accuracy'))} · "
        f"AUROC {_f(metrics.get('macro_auc'))} · mal. AUROC {_f(malignant.get('auc'))} "
        f"(sens {_f(malignant.get('sensitivity'))} / spec {_f(malignant.get('specificity'))}) · "
        f"ECE {_f(metrics.get('ece'))} · consistency p {_f(consistency)}"
    )


def main() -> None:
    print("| model | serves | cost (p50, one image) | val: ensemble vs one network | out of fold (train) | test |")
    print("|---|---|---|---|---|---|")
    for card_path in sorted(BUILTIN_DIR.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        training = card.get("training", {})
        record = training.get("ensemble") if training.get("method") == "ensemble" else None
        record = record or training.get("ensemble_candidate")
        if not record:
            continue
        served = training.get("method") == "ensemble"
        single_dir = card_path.parent / ONE_NETWORK
        single = json.loads((single_dir / "card.json").read_text()) if served else card
        cost, val = record["cost"], record["val"]
        oof = record.get("out_of_fold") or {}
        kind = f"ensemble of {record['members']} ({record['combine']}, views {'+'.join(record['test_time_views'])})"
        candidate = record.get("test", {})
        ours = card["metrics"] if served else candidate | {"malignant": {"auc": candidate.get("malignant_auc")}}
        print(
            f"| `{card['id']}` {card['version']} | {kind if served else 'one network (ensemble lost)'} | "
            f"{cost['p50_ms']} vs {cost['one_network_p50_ms']} ms = {cost['ratio']}x (budget {cost['max_ratio']}x) | "
            f"NLL {_f(val['ensemble']['nll'])} vs {_f(val['one_network']['nll'])}; "
            f"AUROC {_f(val['ensemble']['macro_auc'])} vs {_f(val['one_network']['macro_auc'])}; "
            f"acc {_f(val['ensemble']['accuracy'])} vs {_f(val['one_network']['accuracy'])} | "
            f"acc {_f(oof.get('accuracy'))} · AUROC {_f(oof.get('macro_auc'))} | "
            f"ensemble: {_test(ours)}<br>one network {single['version']}: {_test(single['metrics'])} |"
        )


if __name__ == "__main__":
    main()
