"""Evaluate a packaged ONNX model on a dataset directory (ONNX Runtime only, no torch)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oncolens.decision import decide, p_malignant, probabilities, probability_columns
from oncolens.evaluation.datasets import (
    ManifestError,
    Sample,
    drop_labels,
    encode_labels,
    open_rgb,
    read_manifest,
    select_split,
)
from oncolens.evaluation.metrics import classification_report
from oncolens.zoo.package import ModelPackage
from oncolens.zoo.preprocess import InputSpec, preprocess

LogitsFn = Callable[[np.ndarray], np.ndarray]


Progress = Callable[[int, int], None]


def dataset_logits(
    run: LogitsFn, samples: list[Sample], spec: InputSpec, batch: int = 32, progress: Progress | None = None
) -> np.ndarray:
    """[N, C] logits of ``run`` (preprocessed batch -> logits) over the samples' image files;
    ``progress(done, total)`` is called after each batch."""
    out = []
    for start in range(0, len(samples), batch):
        if progress is not None and start:
            progress(start, len(samples))
        images = []
        for sample in samples[start : start + batch]:
            try:
                images.append(open_rgb(sample.file))
            except OSError as exc:
                raise ManifestError(f"cannot read image {sample.file}: {exc}") from exc
        out.append(np.asarray(run(preprocess(images, spec)), dtype=np.float64))
    if progress is not None:
        progress(len(samples), len(samples))
    return np.concatenate(out)


def finite(value: Any) -> Any:
    """NaN/inf -> None, recursively, so the report is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


SUBGROUP_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece", "intervals", "malignant", "labels")


def subgroup_reports(
    y: np.ndarray,
    probs: np.ndarray,
    samples: list[Sample],
    classes: list[str],
    malignant: list[bool],
    columns: list[str],
    n_boot: int = 1000,
    pred: np.ndarray | None = None,
    malignant_threshold: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Headline metrics per value of each metadata column (e.g. per source dataset).

    Columns the samples do not carry are skipped. A subgroup holding one class only has no AUROC
    (reported as null), which is itself worth seeing.
    """
    out: dict[str, dict[str, Any]] = {}
    for column in columns:
        if not samples or any(column not in s.metadata for s in samples):
            continue
        values = np.array([s.metadata[column] for s in samples])
        groups: dict[str, Any] = {}
        for value in sorted(set(values.tolist())):
            mask = values == value
            chosen = pred[mask] if pred is not None else None
            report = classification_report(
                y[mask], probs[mask], classes, malignant, n_boot, 0, malignant_threshold, chosen, calibration=False
            )
            report["labels"] = {c: int((y[mask] == k).sum()) for k, c in enumerate(classes)}
            groups[value] = finite({k: report[k] for k in SUBGROUP_KEYS if k in report})
        out[column] = groups
    return out


def write_predictions(
    path: Path,
    dataset_dir: Path,
    samples: list[Sample],
    y: np.ndarray,
    probs: np.ndarray,
    pred: np.ndarray,
    package: ModelPackage,
) -> None:
    """One CSV row per image: file, label, the calibrated probability of every class (``p_<class>``;
    ``p_class_<class>`` where that would repeat ``p_malignant``), P(malignant), the class the card's
    decision rule picks (``predicted``, what the metrics use), and what the server states: the named
    class (the most probable) and the risk level (``decision.decide``, without the out-of-domain check)."""
    classes = package.class_ids
    p_mal = p_malignant(probs, package.malignant)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["file", "label", *probability_columns(classes).values(), "p_malignant", "predicted"]
        writer.writerow([*header, "named_class", "risk_level"])
        for sample, label, row, pm, chosen in zip(samples, y, probs, p_mal, pred, strict=True):
            stated = decide(package.card, row)
            writer.writerow(
                [
                    sample.file.relative_to(dataset_dir).as_posix(),
                    classes[label],
                    *(f"{v:.6f}" for v in row),
                    f"{pm:.6f}",
                    classes[chosen],
                    stated.top_class,
                    stated.risk_level.value,
                ]
            )


def evaluate_package(
    package: ModelPackage,
    dataset_dir: Path,
    split: str | None = None,
    n_boot: int = 1000,
    predictions: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Metrics of a package on one split (``None``: ``test`` if the manifest has splits, else all).

    Rows whose label the model card lists as excluded (a class left out in training, e.g. one
    with too few images) are left out and counted; any other unknown label is an error.
    """
    samples = read_manifest(dataset_dir)
    if split is None:
        split = "test" if any(s.split != "all" for s in samples) else "all"
    chosen = select_split(samples, split)
    excluded = list(package.card.dataset.excluded_labels)
    chosen, n_excluded = drop_labels(chosen, excluded)
    if not chosen:
        raise ManifestError(f"no rows left in split {split!r} after leaving out excluded labels {excluded}")
    y = encode_labels(chosen, package.class_ids)
    logits = dataset_logits(lambda x: package.run(x)[0], chosen, package.input_spec, progress=progress)
    probs = probabilities(package.card, logits)
    pred = package.card.decision.top(probs)
    threshold = package.card.risk_policy.malignant_threshold
    classes, malignant = package.class_ids, package.malignant
    if predictions is not None:
        write_predictions(predictions, dataset_dir, chosen, y, probs, pred, package)
    report = classification_report(y, probs, classes, malignant, n_boot, 0, threshold, pred)
    columns = list(package.card.dataset.report_by)
    by = subgroup_reports(y, probs, chosen, classes, malignant, columns, n_boot, pred, threshold)
    head: dict[str, Any] = {"model": package.id, "version": package.version, "split": split}
    if n_excluded:
        head["excluded"] = {"labels": excluded, "rows": n_excluded}
    result: dict[str, Any] = finite(head | report | ({"by": by} if by else {}))
    return result


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics, per-class figures and malignant-vs-benign."""

    def fmt(value: Any) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    lines = [f"{report['model']} v{report['version']} on split '{report['split']}' (n={report['n']})", ""]
    if "excluded" in report:
        ex = report["excluded"]
        lines[-1:] = [
            f"left out {ex['rows']} row(s) labelled {', '.join(ex['labels'])} (not a class of this model)",
            "",
        ]
    lines.append(f"{'metric':<20}{'value':>8}   95% bootstrap interval")
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        low, high = report["intervals"][name]
        lines.append(f"{name:<20}{fmt(report[name]):>8}   [{fmt(low)}, {fmt(high)}]")
    if "malignant" in report:
        mal = report["malignant"]
        lines += ["", f"malignant vs benign (P(malignant) >= {mal['threshold']})"]
        for name in ("sensitivity", "specificity", "auc"):
            low, high = mal["intervals"][name]
            lines.append(f"{name:<20}{fmt(mal[name]):>8}   [{fmt(low)}, {fmt(high)}]")
    if "calibration" in report:
        cal = report["calibration"]
        lines += ["", "calibration (consistency p: how likely an error this large is if the model is calibrated)"]
        for name in ("ece", "adaptive_ece", "classwise_ece", "brier", "nll"):
            low, high = cal["intervals"][name]
            p_value = cal["consistency_p"].get(name)
            extra = f"   p = {p_value:.3f}" if p_value is not None else ""
            lines.append(f"{name:<20}{fmt(cal[name]):>8}   [{fmt(low)}, {fmt(high)}]{extra}")
    lines += ["", f"{'class':<28}{'precision':>10}{'recall':>8}{'f1':>8}{'AUROC':>8}{'support':>9}"]
    for name, row in report["per_class"].items():
        lines.append(
            f"{name:<28}{fmt(row['precision']):>10}{fmt(row['recall']):>8}{fmt(row['f1']):>8}"
            f"{fmt(row['auc']):>8}{row['support']:>9}"
        )
    for column, groups in report.get("by", {}).items():
        lines += ["", f"by {column}:", f"{'value':<30}{'n':>5}{'acc':>8}{'bal-acc':>9}{'AUROC':>8}{'mal-AUC':>9}"]
        for value, sub in groups.items():
            mal_auc = (sub.get("malignant") or {}).get("auc")
            lines.append(
                f"{value:<30}{sub['n']:>5}{fmt(sub['accuracy']):>8}{fmt(sub['balanced_accuracy']):>9}"
                f"{fmt(sub['macro_auc']):>8}{fmt(mal_auc):>9}"
            )
    return "\n".join(lines)
