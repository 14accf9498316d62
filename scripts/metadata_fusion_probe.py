"""Would age, sex and body site help skin-ham10000? A probe on `val` only (test is not read).

    python scripts/metadata_fusion_probe.py ../shared/datasets/skin-ham10000 [--model skin-ham10000]

HAM10000's manifest gives each lesion's age, sex and site (`dx_type`, how the diagnosis was made, is
left out: a clinician does not have it before the diagnosis). A multinomial logistic regression
fitted on the *train* rows alone gives P(class | age decade, sex, site); the sites are grouped into
head and neck / trunk / upper limb / lower limb / hands and feet / genital, since the source hospitals
coded the trunk differently ("trunk" against "back", "abdomen", "chest"), a code that tells the
source rather than the body. It is combined with the served model's calibrated probabilities as
independent evidence:

    log p(class | image, metadata) = log p(class | image) + beta * (log p(class | metadata) - log prior)

The fusion weight beta, the temperature and the decision rule's logit adjustment tau are chosen by
grouped 5-fold cross-fitting on `val` (5 repeats, pooled out-of-fold figures), with beta = 0 (the
image alone) put through the same choice, so the two rows are compared on equal terms.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from oncolens.decision import calibrate, probabilities
from oncolens.evaluation import metrics
from oncolens.evaluation.datasets import Sample, encode_labels, read_manifest, select_split
from oncolens.evaluation.evaluate import dataset_logits
from oncolens.training.distill import grouped_folds
from oncolens.zoo import BUILTIN_DIR
from oncolens.zoo.package import ModelPackage

SITES = {
    "face": "head_neck",
    "scalp": "head_neck",
    "ear": "head_neck",
    "neck": "head_neck",
    "back": "trunk",
    "abdomen": "trunk",
    "chest": "trunk",
    "trunk": "trunk",
    "upper extremity": "upper_limb",
    "lower extremity": "lower_limb",
    "hand": "hands_feet",
    "foot": "hands_feet",
    "acral": "hands_feet",
    "genital": "genital",
}
GROUPS = sorted(set(SITES.values()))
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEMPERATURES = (0.8, 0.9, 1.0, 1.1, 1.25)
TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)


def features(sample: Sample) -> np.ndarray:
    """Age decade (one-hot, or 'unknown'), sex (male, female; neither = unknown), site group."""
    meta = sample.metadata
    decade = [0.0] * 11
    try:
        decade[min(int(float(meta.get("age", "")) // 10), 9)] = 1.0
    except ValueError:
        decade[10] = 1.0
    sex = [float(meta.get("sex") == "male"), float(meta.get("sex") == "female")]
    site = [float(SITES.get(str(meta.get("localization")), "") == g) for g in GROUPS]
    return np.array(decade + sex + site)


def fused(image_probs: np.ndarray, evidence: np.ndarray, beta: float, temperature: float) -> np.ndarray:
    log_probs: np.ndarray = np.log(np.clip(image_probs, 1e-12, None))
    probs: np.ndarray = calibrate(log_probs + beta * evidence, temperature)
    return probs


def nll(y: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())


def figures(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    c = len(classes)
    mel = classes.index("mel")
    return {
        "accuracy": metrics.accuracy(y, pred),
        "balanced_accuracy": metrics.balanced_accuracy(y, pred, c),
        "macro_auc": metrics.macro_auc(y, probs),
        "nll": nll(y, probs),
        "melanoma_recall": float(((pred == mel) & (y == mel)).sum() / max((y == mel).sum(), 1)),
    }


def cross_fitted(
    y: np.ndarray,
    image_probs: np.ndarray,
    evidence: np.ndarray,
    log_prior: np.ndarray,
    groups: list[str],
    betas: tuple[float, ...],
    classes: list[str],
    repeats: int = 5,
) -> dict[str, float]:
    """Pooled out-of-fold figures of the fusion with (beta, tau) chosen for balanced accuracy and the
    temperature for NLL on the other folds, averaged over ``repeats`` cuts."""
    rows = []
    for repeat in range(repeats):
        folds = grouped_folds(y, groups, 5, seed=repeat)
        probs, pred = np.zeros_like(image_probs), np.zeros(len(y), dtype=np.int64)
        for f in range(5):
            fit, held = folds != f, folds == f
            best = (-math.inf, 0.0, 0.0)
            for beta in betas:
                p = fused(image_probs[fit], evidence[fit], beta, 1.0)
                for tau in TAUS:
                    chosen = (np.log(p) - tau * log_prior).argmax(axis=1)
                    score = metrics.balanced_accuracy(y[fit], chosen, len(classes))
                    if score > best[0]:
                        best = (score, beta, tau)
            _, beta, tau = best

            scores = {t: nll(y[fit], fused(image_probs[fit], evidence[fit], beta, t)) for t in TEMPERATURES}
            temperature = min(scores, key=scores.__getitem__)
            probs[held] = fused(image_probs[held], evidence[held], beta, temperature)
            pred[held] = (np.log(probs[held]) - tau * log_prior).argmax(axis=1)
        rows.append(figures(y, probs, pred, classes))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", default="skin-ham10000")
    args = parser.parse_args()
    package = ModelPackage.load(BUILTIN_DIR / args.model, precision="fp32")
    classes = package.class_ids
    samples = read_manifest(args.dataset)
    train, val = select_split(samples, "train"), select_split(samples, "val")
    y_train, y_val = encode_labels(train, classes), encode_labels(val, classes)
    meta_model = LogisticRegression(C=1.0, max_iter=5000).fit(np.stack([features(s) for s in train]), y_train)
    prior = np.bincount(y_train, minlength=len(classes)) / len(y_train)
    meta_probs = meta_model.predict_proba(np.stack([features(s) for s in val]))
    evidence = np.log(meta_probs) - np.log(prior)
    image_probs = probabilities(package.card, dataset_logits(lambda x: package.run(x)[0], val, package.input_spec))
    groups = [s.group_id for s in val]
    alone = figures(y_val, meta_probs, (np.log(meta_probs) - np.log(prior)).argmax(axis=1), classes)
    print(f"{args.model} v{package.version}, {len(val)} val images; metadata model fitted on {len(train)} train rows")
    print("metadata alone (prior-corrected):", {k: round(v, 4) for k, v in alone.items()})
    for beta in BETAS:
        p = fused(image_probs, evidence, beta, 1.0)
        row = figures(y_val, p, package.card.decision.top(p), classes)
        print(f"beta {beta:<4}  the card's temperature and decision rule:", {k: round(v, 4) for k, v in row.items()})
    for name, betas in (("image alone", (0.0,)), ("image + metadata", BETAS)):
        row = cross_fitted(y_val, image_probs, evidence, np.log(prior), groups, betas, classes)
        print(f"{name:<17} cross-fitted on val:", {k: round(v, 4) for k, v in row.items()})


if __name__ == "__main__":
    main()
