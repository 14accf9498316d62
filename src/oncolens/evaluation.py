"""Evaluate a packaged ONNX model on a dataset directory (ONNX Runtime only, no torch)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oncolens.datasets import ManifestError, Sample, encode_labels, open_rgb, read_manifest, select_split
from oncolens.inference import calibrate
from oncolens.metrics import classification_report
from oncolens.zoo.package import ModelPackage
from oncolens.zoo.preprocess import InputSpec, preprocess

LogitsFn = Callable[[np.ndarray], np.ndarray]


def dataset_logits(run: LogitsFn, samples: list[Sample], spec: InputSpec, batch: int = 32) -> np.ndarray:
    """[N, C] logits of ``run`` (preprocessed batch -> logits) over the samples' image files."""
    out = []
    for start in range(0, len(samples), batch):
        images = []
        for sample in samples[start : start + batch]:
            try:
                images.append(open_rgb(sample.file))
            except (OSError, ValueError) as exc:
                raise ManifestError(f"cannot read image {sample.file}: {exc}") from exc
        out.append(np.asarray(run(preprocess(images, spec)), dtype=np.float64))
    return np.concatenate(out)


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively, so the report is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def evaluate_package(
    package: ModelPackage, dataset_dir: Path, split: str | None = None, n_boot: int = 1000
) -> dict[str, Any]:
    """Metrics of a package on one split (``None``: ``test`` if the manifest has splits, else all)."""
    samples = read_manifest(dataset_dir)
    if split is None:
        split = "test" if any(s.split != "all" for s in samples) else "all"
    chosen = select_split(samples, split)
    y = encode_labels(chosen, package.class_ids)
    logits = dataset_logits(lambda x: package.run(x)[0], chosen, package.input_spec)
    probs = calibrate(logits, package.temperature)
    report = classification_report(y, probs, package.class_ids, package.malignant, n_boot=n_boot)
    result: dict[str, Any] = _finite({"model": package.id, "version": package.version, "split": split} | report)
    return result


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics, per-class figures and malignant-vs-benign."""

    def fmt(value: Any) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    lines = [f"{report['model']} v{report['version']} on split '{report['split']}' (n={report['n']})", ""]
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
    lines += ["", f"{'class':<28}{'precision':>10}{'recall':>8}{'f1':>8}{'AUROC':>8}{'support':>9}"]
    for name, row in report["per_class"].items():
        lines.append(
            f"{name:<28}{fmt(row['precision']):>10}{fmt(row['recall']):>8}{fmt(row['f1']):>8}"
            f"{fmt(row['auc']):>8}{row['support']:>9}"
        )
    return "\n".join(lines)
