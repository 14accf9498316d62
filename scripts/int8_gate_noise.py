"""How often the int8 gate's split criteria pass for a copy that differs from fp32 only by small noise.

    python scripts/int8_gate_noise.py ../shared/datasets [--models breast-us,oral-photo] [--sigmas 0.01,0.03,0.1]

For each model, the fp32 file's logits on `val` and `test` are perturbed by independent Gaussian noise
of standard deviation ``sigma`` (per image and class; a stand-in for int8 rounding error) ``--draws``
times, and each perturbed copy is put through the gate's split criteria (``quantize.gate``: |delta
macro AUROC| <= 0.005, |delta balanced accuracy| <= 0.01 and ECE at most +0.005, on both splits, with
the card's calibration and decision rule). Printed per model and sigma: the mean largest probability
change per image, the share of draws passing each criterion on both splits, and the share passing all
of them. It measures what the split sizes allow, not any int8 file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from oncolens.decision import probabilities
from oncolens.evaluation import metrics
from oncolens.evaluation.datasets import drop_labels, encode_labels, read_manifest, select_split
from oncolens.evaluation.evaluate import dataset_logits
from oncolens.training.quantize import split_checks
from oncolens.zoo import BUILTIN_DIR
from oncolens.zoo.package import ModelPackage

CRITERIA = ("AUROC", "balanced accuracy", "ECE")  # as named in the gate's criteria (quantize.split_checks)


def split_figures(package: ModelPackage, y: np.ndarray, logits: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    probs = probabilities(package.card, logits)
    pred = package.card.decision.top(probs)
    k = len(package.class_ids)
    figures = {
        "macro_auc": metrics.macro_auc(y, probs),
        "balanced_accuracy": metrics.balanced_accuracy(y, pred, k),
        "ece": metrics.expected_calibration_error(y, probs),
    }
    return figures, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", type=Path)
    parser.add_argument("--models", default="breast-us,thyroid-us,oral-photo,cervical-herlev,skin-isic9,skin-ham10000")
    parser.add_argument("--sigmas", default="0.01,0.03,0.1")
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    print("model | n val/test | sigma | mean max |dp| | pass AUROC / bal-acc / ECE (both splits) | pass all")
    for model_id in args.models.split(","):
        package = ModelPackage.load(BUILTIN_DIR / model_id, precision="fp32")
        dataset = args.datasets / package.card.dataset.name
        splits = {}
        for split in ("val", "test"):
            chosen, _ = drop_labels(select_split(read_manifest(dataset), split), package.card.dataset.excluded_labels)
            y = encode_labels(chosen, package.class_ids)
            logits = dataset_logits(lambda x, p=package: p.run(x)[0], chosen, package.input_spec).astype(np.float64)
            reference, probs = split_figures(package, y, logits)
            splits[split] = (y, logits, reference, probs)
        sizes = "/".join(str(len(splits[s][0])) for s in splits)
        for sigma in sigmas:
            counts = dict.fromkeys((*CRITERIA, "all"), 0)
            changes = []
            for _ in range(args.draws):
                verdict = dict.fromkeys(CRITERIA, True)
                for split, (y, logits, reference, probs) in splits.items():
                    noisy = logits + rng.normal(0.0, sigma, logits.shape)
                    figures, noisy_probs = split_figures(package, y, noisy)
                    changes.append(float(np.abs(noisy_probs - probs).max(axis=1).mean()))
                    for check in split_checks(split, reference, figures):
                        verdict[next(c for c in CRITERIA if c in check["criterion"])] &= check["passed"]
                for name, ok in verdict.items():
                    counts[name] += ok
                counts["all"] += all(verdict.values())
            shares = " / ".join(f"{counts[c] / args.draws:.2f}" for c in CRITERIA)
            print(
                f"{model_id} | {sizes} | {sigma} | {np.mean(changes):.4f} | {shares} | {counts['all'] / args.draws:.2f}"
            )


if __name__ == "__main__":
    main()
