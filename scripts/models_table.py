"""Print the README's model table (Markdown) from the shipped model cards: python scripts/models_table.py"""

from __future__ import annotations

import json
import re

from oncolens.zoo import BUILTIN_DIR

ORDER = ["skin-ham10000", "skin-isic9", "breast-us", "thyroid-us", "cervical-herlev", "oral-photo"]


def ci(metrics: dict, key: str) -> str:  # type: ignore[type-arg]
    low, high = metrics["intervals"][key]
    return f"{metrics[key]:.3f} [{low:.3f}, {high:.3f}]"


def served(card: dict) -> str:  # type: ignore[type-arg]
    """What answers: the ensemble with its cost against the one-network build, or one network."""
    training = card.get("training", {})
    ensemble = training.get("ensemble") if training.get("method") == "ensemble" else None
    if ensemble:
        cost, single = ensemble["cost"], ensemble["one_network"]
        return (
            f"ensemble of {ensemble['members']} on one front: p50 {cost['p50_ms']:.0f} ms for one image, "
            f"{cost['ratio']:.2f}x the one-network build (v{single['version']}, kept)"
        )
    candidate = training.get("ensemble_candidate")
    if candidate:
        return "one network (its ensemble lost the recipe's rule on val; see the card)"
    return "one network"


def main() -> None:
    cards = {p.parent.name: json.loads(p.read_text()) for p in BUILTIN_DIR.glob("*/card.json")}
    print(
        "| model | serves | organ · modality | classes (malignant in bold) | test metrics, 95% bootstrap CI "
        "| data licence |"
    )
    print("|---|---|---|---|---|---|")
    for model_id in [m for m in ORDER if m in cards] + sorted(set(cards) - set(ORDER)):
        card = cards[model_id]
        m = card["metrics"]
        classes = ", ".join(f"**{c['id']}**" if c["malignant"] else c["id"] for c in card["classes"])
        parts = [
            f"n = {m['n']}",
            f"accuracy {ci(m, 'accuracy')}",
            f"balanced acc. {ci(m, 'balanced_accuracy')}",
            f"macro AUROC {ci(m, 'macro_auc')}",
            f"ECE {ci(m, 'ece')}",
        ]
        mal = m.get("malignant")
        if mal:
            low, high = mal["intervals"]["auc"]
            parts.append(
                f"malignant-vs-rest AUROC {mal['auc']:.3f} [{low:.3f}, {high:.3f}], "
                f"sens. {mal['sensitivity']:.3f} / spec. {mal['specificity']:.3f} at P ≥ {mal['threshold']:.2f}"
            )
        cal = m.get("calibration")
        if cal:
            parts.append(
                f"equal-mass ECE {ci(cal, 'adaptive_ece')}, Brier {ci(cal, 'brier')}, "
                f"consistency p {cal['consistency_p']['ece']:.2f}"
            )
        teachers = card.get("training", {}).get("teachers")
        if teachers and card["training"].get("method") != "ensemble":
            t = teachers["test"]
            parts.append(
                f"teacher ensemble ({teachers['models']}): bal. acc. {t['balanced_accuracy']:.3f}, "
                f"AUROC {t['macro_auc']:.3f}"
            )
        for column, groups in m.get("by", {}).items():
            for value, g in groups.items():
                auc = (g.get("malignant") or {}).get("auc")
                auc_text = "n/a" if auc is None else f"{auc:.3f}"
                parts.append(f"{column}={value}: n {g['n']}, acc. {g['accuracy']:.3f}, AUROC {auc_text}")
        licence = re.split(r" \(|: |; ", card["dataset"]["license"])[0]
        if "commercial" in card["dataset"]["license"].lower():
            licence += " — **no commercial use**"
        print(
            f"| `{model_id}` v{card['version']} | {served(card)} | {card['organ']} · {card['modality']} | {classes} | "
            f"{' · '.join(parts)} | {licence} |"
        )


if __name__ == "__main__":
    main()
