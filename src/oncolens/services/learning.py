"""The learning loop: the clinic's confirmed cases as a dataset (``oncolens cases export-dataset``) and a
site version of a package re-calibrated on them behind an acceptance gate (``oncolens adapt``).

Export: every reviewed case of a model with a reference class, its in-domain images written in the
layout training reads. ``group_id`` is a keyed hash (HMAC-SHA256 under the server's key) of the patient
reference, so no patient identifier leaves and a patient's images stay together; the split (60 % train,
20 % val, 20 % test) is taken from that hash, so re-exports keep every patient where it was. The same
database gives byte-identical files.

Adapt: the parent package's temperature and class offsets and its risk thresholds are re-fitted on the
local ``train`` + ``val`` rows at the card's operating points; the gate, fixed before the run and written
into the card, compares the new version with its parent on the local ``test`` rows. A failed gate
writes nothing.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import math
import platform
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlmodel import Session, col, select

from oncolens.decision import p_malignant, probabilities
from oncolens.errors import InvalidInput
from oncolens.evaluation import metrics
from oncolens.evaluation.calibrate import fit_scaling, risk_policy
from oncolens.evaluation.datasets import ManifestError, Sample, encode_labels, open_rgb, read_manifest
from oncolens.evaluation.drift import reference_distribution
from oncolens.evaluation.evaluate import dataset_logits, finite
from oncolens.services.audit import Actor, audit_by
from oncolens.services.versions import require_admin
from oncolens.store.db.models import AuditEvent, Case, CaseImage, CaseStatus, utcnow
from oncolens.store.images import EXTENSIONS, MEDIA_TYPES, ImageStore
from oncolens.store.packages import package_files
from oncolens.zoo.card import ModelCard, RiskLevel, parse_card
from oncolens.zoo.package import CARD, ONNX, ModelPackage, sha256_of
from oncolens.zoo.preprocess import preprocess

MANIFEST_COLUMNS = [
    "file",
    "label",
    "group_id",
    "split",
    "case",
    "image",
    "reference_standard",
    "reference_date",
    "model_version",
    "media_type",
]
SPLITS = (("train", 60), ("val", 80), ("test", 100))  # cumulative shares of the hash's 0..99
EXTENSION_OF = {MEDIA_TYPES[name]: EXTENSIONS[name] for name in MEDIA_TYPES}


@dataclass
class ExportReport:
    folder: Path
    manifest_sha256: str
    rows: int
    cases: int
    counts: dict[str, dict[str, int]]
    left_out: dict[str, int] = field(default_factory=dict)


def keyed(key: str, purpose: str, value: str) -> str:
    return hmac.new(key.encode("utf-8"), f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def split_of(group_id: str) -> str:
    """train / val / test from the group's keyed hash: 60/20/20, the same on every export."""
    bucket = int(group_id[:8], 16) % 100
    return next(name for name, upper in SPLITS if bucket < upper)


def _in_range(query: Any, column: Any, since: date | None, until: date | None) -> Any:
    if since is not None:
        query = query.where(column >= datetime.combine(since, datetime.min.time(), UTC))
    if until is not None and until < date.max:  # the last day itself has no next day to end before
        query = query.where(column < datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC))
    return query


def export_dataset(
    session: Session,
    store: ImageStore,
    actor: Actor,
    model_id: str,
    out: Path,
    key: str,
    since: date | None = None,
    until: date | None = None,
) -> ExportReport:
    """Write the reviewed cases of ``model_id`` with a reference class to ``out`` as a dataset (admins
    only; audited ``export_dataset``). ``since``/``until``: the cases' creation dates, both inclusive."""
    require_admin(actor)
    if since is not None and until is not None and since > until:
        raise InvalidInput(f"--since {since} is after --until {until}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"{out} exists and is not an empty folder")
    query = _in_range(select(Case).where(Case.model_id == model_id), Case.created_at, since, until)
    cases = list(session.exec(query.order_by(col(Case.created_at), col(Case.id))))
    left_out: Counter[str] = Counter()
    chosen: list[Case] = []
    for case in cases:
        if case.status == CaseStatus.pending.value:
            left_out["unreviewed cases"] += 1
        elif case.risk_level == RiskLevel.indeterminate.value:
            left_out["indeterminate cases"] += 1
        elif case.reference_class is None:
            left_out["reviewed cases without a reference class"] += 1
        else:
            chosen.append(case)
    deleted = _in_range(
        select(AuditEvent.id).where(
            AuditEvent.action == "delete", col(AuditEvent.detail).contains(f"{model_id} case of patient ref")
        ),
        AuditEvent.at,
        since,
        until,
    )
    left_out["deleted cases (audit trail)"] = len(session.exec(deleted).all())
    rows: list[dict[str, str]] = []
    files: list[tuple[str, CaseImage]] = []
    versions: Counter[str] = Counter()
    for case in chosen:
        group = keyed(key, "patient", case.patient_ref) if case.patient_ref else keyed(key, "case", case.id)
        group = group[:20]
        case_tag = keyed(key, "case", case.id)[:16]
        images = session.exec(select(CaseImage).where(CaseImage.case_id == case.id)).all()
        kept = 0
        for image in sorted(images, key=lambda i: i.position):
            if json.loads(image.result_json).get("risk_level") == RiskLevel.indeterminate.value:
                left_out["out-of-domain images of exported cases"] += 1
                continue
            name = f"images/{case.reference_class}/{case_tag}_{image.position}{EXTENSION_OF.get(image.media_type, '')}"
            rows.append(
                {
                    "file": name,
                    "label": str(case.reference_class),
                    "group_id": group,
                    "split": split_of(group),
                    "case": case_tag,
                    "image": str(image.position),
                    "reference_standard": case.reference_standard or "",
                    "reference_date": case.reference_date.isoformat() if case.reference_date else "",
                    "model_version": case.model_version,
                    "media_type": image.media_type,
                }
            )
            files.append((name, image))
            kept += 1
        if kept:
            versions[case.model_version] += 1
    rows.sort(key=lambda row: row["file"])
    if not rows:
        raise InvalidInput(
            f"no reviewed case of {model_id} with a reference class"
            + (f" between {since or 'the start'} and {until or 'now'}" if since or until else "")
            + f"; left out: {_words(left_out) or 'nothing (no cases)'}"
        )
    manifest = _manifest_bytes(rows)
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["split"], {}).setdefault(row["label"], 0)
        counts[row["split"]][row["label"]] += 1
    counts = {split: dict(sorted(counts[split].items())) for split, _ in SPLITS if split in counts}
    digest = hashlib.sha256(manifest).hexdigest()
    summary = {
        "model_id": model_id,
        "manifest_sha256": digest,
        "rows": len(rows),
        "cases": sum(versions.values()),
        "counts": counts,
        "model_versions": dict(sorted(versions.items())),
        "left_out": dict(sorted((k, v) for k, v in left_out.items() if v)),
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "group_id": "HMAC-SHA256 of the patient reference under this server's key (of the case id where none)",
        "split": "60 % train, 20 % val, 20 % test by the group's hash: stable across re-exports",
    }
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        for name, image in files:
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = store.read(image.stored_name)
            if hashlib.sha256(data).hexdigest() != image.sha256:
                raise InvalidInput(f"the stored file of image {image.id} does not match its checksum; not exported")
            path.write_bytes(data)
        (staging / "manifest.csv").write_bytes(manifest)
        (staging / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(_readme(summary), encoding="utf-8")
        for entry in sorted(staging.iterdir()):
            entry.rename(out / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    audit_by(
        session,
        actor,
        "export_dataset",
        None,
        f"{model_id}: {len(rows)} image(s) of {summary['cases']} case(s) to {out}; manifest sha256 {digest[:16]}",
    )
    session.commit()
    return ExportReport(out, digest, len(rows), int(summary["cases"]), counts, dict(left_out))  # type: ignore[call-overload]


def _manifest_bytes(rows: list[dict[str, str]]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def _words(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items()) if n)


def _readme(summary: dict[str, Any]) -> str:
    lines = [
        f"# {summary['model_id']}: this site's confirmed cases",
        "",
        "Written by `oncolens cases export-dataset` from the reviewed cases with a reference class (the class",
        "a clinician recorded with its reference standard). Patient identifiers do not leave: `group_id` is a",
        "keyed hash of the patient reference and `case` one of the case id.",
        "",
        f"- rows (images): {summary['rows']}, cases: {summary['cases']}",
        f"- created between: {summary['since'] or 'the first case'} and {summary['until'] or 'the export'}",
        f"- answered by: {', '.join(f'{v} ({n} cases)' for v, n in summary['model_versions'].items())}",
        f"- manifest sha256: {summary['manifest_sha256']}",
        f"- split: {summary['split']}",
        "",
        "| split | " + " | ".join(sorted({c for s in summary["counts"].values() for c in s})) + " |",
    ]
    classes = sorted({c for s in summary["counts"].values() for c in s})
    lines.append("|---" * (len(classes) + 1) + "|")
    for split, counts in summary["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in classes) + " |")
    lines += ["", "Left out: " + (_words(summary["left_out"]) or "nothing") + ".", ""]
    return "\n".join(lines)


# --- adapt ---------------------------------------------------------------------------------------------

MIN_FIT = 20  # train + val rows
MIN_TEST = 20
MIN_PER_SIDE = 5  # malignant and benign rows, in the fit rows and in the test rows
GATE_RULES = [
    "calibration: consistency p (15-bin ECE, consistency resampling) >= 0.05 on the local test rows, "
    "or an ECE lower than the parent's on the same rows",
    "macro AUROC on the local test rows not below the parent's by more than the half-width of the parent's "
    "95 % bootstrap interval (below its lower bound)",
    "sensitivity at each version's own malignant call on the local test rows not below the parent's by more "
    "than the half-width of the parent's 95 % bootstrap interval",
]


class NotEnoughImages(InvalidInput):
    """Too few local rows to fit or to judge a site version; the message says how many are needed."""


class GateFailed(RuntimeError):
    """The site version failed its acceptance gate; nothing was written."""

    def __init__(self, failed: list[dict[str, Any]], gate: dict[str, Any]) -> None:
        self.failed, self.gate = failed, gate
        super().__init__("; ".join(f"{c['criterion']}: {c['figures']}" for c in failed))


@dataclass
class AdaptResult:
    package: Path
    card: ModelCard
    gate: dict[str, Any]


def site_version(parent_version: str, taken: list[str]) -> str:
    """``X.Y.Z+site.N``: N one above the highest site number of the same X.Y.Z among ``taken`` and the parent."""
    base, _, local = parent_version.partition("+")
    numbers = [int(local.split(".", 1)[1])] if local.startswith("site.") and local[5:].isdigit() else []
    for version in taken:
        other, _, tail = version.partition("+")
        if other == base and tail.startswith("site.") and tail[5:].isdigit():
            numbers.append(int(tail[5:]))
    return f"{base}+site.{max(numbers, default=0) + 1}"


def _need(samples: list[Sample], card: ModelCard, what: str, minimum: int) -> list[str]:
    malignant = {c.id for c in card.classes if c.malignant}
    positives = sum(s.label in malignant for s in samples)
    problems = []
    if len(samples) < minimum:
        problems.append(f"the {what} rows hold {len(samples)} image(s); at least {minimum} are needed")
    if positives < MIN_PER_SIDE or len(samples) - positives < MIN_PER_SIDE:
        problems.append(
            f"the {what} rows hold {positives} {card.positive_label} and {len(samples) - positives} other image(s); "
            f"at least {MIN_PER_SIDE} of each are needed"
        )
    return problems


def _dataset_sha(dataset_dir: Path) -> str:
    return hashlib.sha256((dataset_dir / "manifest.csv").read_bytes()).hexdigest()


def adapt(
    parent: ModelPackage,
    dataset_dir: Path,
    out: Path,
    version: str,
    command: str = "",
    n_boot: int = 1000,
    retrain_tail: bool = False,
) -> AdaptResult:
    """A site version of ``parent`` re-calibrated on the dataset's train+val rows, written to ``out`` only
    if it passes the gate on the test rows (GateFailed otherwise; NotEnoughImages before any work).

    With ``retrain_tail`` the network's head (the linear layer on its pooled features) is re-trained on
    the ``train`` rows first, for every class with at least ``MIN_TAIL_PER_CLASS`` of them (the others
    keep the parent's weights), and the calibration and risk thresholds are then fitted on ``val`` alone.
    """
    card = parent.card
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"{out} exists and is not an empty folder")
    try:
        samples = read_manifest(dataset_dir)
    except ManifestError as exc:
        raise InvalidInput(str(exc)) from exc
    unknown = sorted({s.label for s in samples} - set(card.class_ids))
    if unknown:
        raise InvalidInput(f"labels {unknown} are not classes of {card.id} ({', '.join(card.class_ids)})")
    fit_rows = [s for s in samples if s.split in ("train", "val")]
    test_rows = [s for s in samples if s.split == "test"]
    tail: TailFit | None = None
    if retrain_tail:
        train_rows = [s for s in samples if s.split == "train"]
        fit_rows = [s for s in samples if s.split == "val"]
        problems = _need(fit_rows, card, "val", MIN_FIT) + _need(test_rows, card, "test", MIN_TEST)
        problems += _tail_problems(train_rows, card)
    else:
        problems = _need(fit_rows, card, "train+val", MIN_FIT) + _need(test_rows, card, "test", MIN_TEST)
    if problems:
        raise NotEnoughImages("too few images to adapt " + card.id + ": " + "; ".join(problems))
    try:
        parent_test_logits = dataset_logits(lambda x: parent.run(x)[0], test_rows, parent.input_spec)
        if retrain_tail:
            tail = retrain_head(parent, train_rows, fit_rows, test_rows)
            fit_logits, test_logits = tail.val_logits, tail.test_logits
        else:
            fit_logits = dataset_logits(lambda x: parent.run(x)[0], fit_rows, parent.input_spec)
            test_logits = parent_test_logits
    except ManifestError as exc:
        raise InvalidInput(str(exc)) from exc
    y_fit, y_test = encode_labels(fit_rows, card.class_ids), encode_labels(test_rows, card.class_ids)
    bias0 = np.asarray(card.calibration.logit_bias or [0.0] * len(card.classes), dtype=np.float64)
    temperature, bias = fit_scaling(fit_logits, y_fit, card.calibration.temperature, bias0)
    calibration = card.calibration.model_dump(mode="json") | {
        "method": "site re-calibration: temperature and class offsets re-fitted (NLL, pulled towards the parent's) "
        "on this site's train+val rows",
        "temperature": temperature,
        "logit_bias": [round(float(b), 6) for b in bias],
        "fitted_on": "site train+val",
        "parent": {"temperature": card.calibration.temperature, "logit_bias": card.calibration.logit_bias},
    }
    base = card.model_dump(mode="json") | {"calibration": calibration, "version": version}
    if tail is not None:
        base |= tail.card_fields
    site_card = parse_card(base, "site card")
    malignant = parent.malignant
    is_mal = np.asarray(malignant)
    p_fit = p_malignant(probabilities(site_card, fit_logits), malignant)
    p_test_site = p_malignant(probabilities(site_card, test_logits), malignant)
    # The call keeps the sensitivity the parent's call gave on these same rows (at least the card's
    # call_sensitivity): a re-calibration may make the call more specific, never less sensitive.
    policy_config = _policy_config(card)
    parent_fit_logits = fit_logits if tail is None else tail.parent_val_logits
    parent_p_fit = p_malignant(probabilities(card, parent_fit_logits), malignant)
    parent_sensitivity = float((parent_p_fit[is_mal[y_fit]] >= card.risk_policy.malignant_threshold).mean())
    policy_config["call_sensitivity"] = max(float(policy_config["call_sensitivity"]), parent_sensitivity)
    policy = risk_policy(p_fit, is_mal[y_fit], policy_config, (p_test_site, is_mal[y_test]))
    policy["chosen_on"] = "site train+val"
    site_card = parse_card(site_card.model_dump(mode="json") | {"risk_policy": policy}, "site card")
    gate = acceptance_gate(card, site_card, y_test, parent_test_logits, n_boot, test_logits)
    if not gate["passed"]:
        raise GateFailed([c for c in gate["criteria"] if not c["passed"]], gate)
    site_probs = probabilities(site_card, test_logits)
    report = metrics.classification_report(
        y_test,
        site_probs,
        card.class_ids,
        malignant,
        n_boot,
        0,
        policy["malignant_threshold"],
        site_card.decision.top(site_probs),
    )
    counts = {
        split: dict(sorted(Counter(s.label for s in samples if s.split == split).items()))
        for split in ("train", "val", "test")
    }
    lineage = {
        "parent": {"id": card.id, "version": card.version, "sha256": card.sha256, "card_sha256": _card_sha(parent)},
        "dataset": {
            "path": str(dataset_dir),
            "sha256": _dataset_sha(dataset_dir),
            "counts": counts,
            "provenance": _provenance(dataset_dir),
        },
        "refit": {
            "head": tail.words if tail is not None else "the parent's network, unchanged",
            "calibration": "temperature and class offsets" + (" (on val)" if tail is not None else ""),
            "risk_policy": "thresholds at the card's operating points; the call at the sensitivity the parent's "
            f"call had on the same rows ({parent_sensitivity:.3f}) or the card's call sensitivity, the higher",
        },
        "gate": gate,
        "parent_metrics": {
            k: card.metrics.get(k) for k in ("split", "n", "accuracy", "balanced_accuracy", "macro_auc")
        },
        "command": command,
        "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or platform.system()})",
        "at": utcnow().isoformat(timespec="seconds"),
    }
    final = parse_card(
        site_card.model_dump(mode="json")
        | {
            "metrics": finite({"split": "site test", **report}),
            "monitoring": reference_distribution(p_test_site, "site test", "oncolens adapt"),
            "lineage": lineage,
        },
        "site card",
    )
    _write_package(parent.directory, final, out, tail.onnx if tail is not None else None)
    return AdaptResult(out, final, gate)


def _card_sha(parent: ModelPackage) -> str:
    return sha256_of(parent.directory / CARD)


def _provenance(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: data.get(k) for k in ("model_id", "manifest_sha256", "model_versions", "since", "until") if k in data}


def _policy_config(card: ModelCard) -> dict[str, Any]:
    """The operating points and words of the parent's risk policy (its recipe's [risk], else the defaults)."""
    recipe_risk = (
        card.training.get("recipe", {}).get("risk", {}) if isinstance(card.training.get("recipe"), dict) else {}
    )
    policy = card.risk_policy
    return {
        "sensitivity_target": 0.95,
        "specificity_target": 0.95,
        "call_sensitivity": 0.90,
        "positives": getattr(policy, "positives", "malignant cases"),
        "negatives": getattr(policy, "negatives", "benign cases"),
        "recommendations": {level.level.value: level.recommendation for level in policy.levels},
    } | {k: v for k, v in recipe_risk.items() if k in ("sensitivity_target", "specificity_target", "call_sensitivity")}


def acceptance_gate(
    parent: ModelCard,
    site: ModelCard,
    y: np.ndarray,
    logits: np.ndarray,
    n_boot: int = 1000,
    site_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """The gate of GATE_RULES on labelled test rows, each criterion with its figures (``site_logits``:
    the site version's own logits where its network differs from the parent's)."""
    malignant = [c.malignant for c in parent.classes]
    is_mal = np.asarray(malignant)[y]
    old, new = probabilities(parent, logits), probabilities(site, logits if site_logits is None else site_logits)
    ece = metrics.expected_calibration_error
    ece_old, ece_new = ece(y, old), ece(y, new)
    p_old = metrics.consistency_p_value(y, old, ece)
    p_new = metrics.consistency_p_value(y, new, ece)
    auc_old, auc_new = metrics.macro_auc(y, old), metrics.macro_auc(y, new)
    auc_low, _ = metrics.bootstrap_interval(lambda i: metrics.macro_auc(y[i], old[i]), len(y), n_boot)
    call_old, call_new = parent.risk_policy.malignant_threshold, site.risk_policy.malignant_threshold
    pm_old, pm_new = p_malignant(old, malignant), p_malignant(new, malignant)

    def sensitivity(p: np.ndarray, call: float, i: np.ndarray) -> float:
        positives = is_mal[i]
        return float((p[i][positives] >= call).mean()) if positives.any() else float("nan")

    everything = np.arange(len(y))
    sens_old, sens_new = sensitivity(pm_old, call_old, everything), sensitivity(pm_new, call_new, everything)
    sens_low, _ = metrics.bootstrap_interval(lambda i: sensitivity(pm_old, call_old, i), len(y), n_boot)
    criteria = [
        {
            "criterion": "calibration",
            "passed": bool(p_new >= 0.05 or ece_new < ece_old),
            "figures": f"consistency p {p_new:.3f} (parent {p_old:.3f}); ECE {ece_new:.4f} (parent {ece_old:.4f})",
            "site": {"consistency_p": p_new, "ece": ece_new},
            "parent": {"consistency_p": p_old, "ece": ece_old},
        },
        {
            "criterion": "macro AUROC",
            "passed": bool(auc_new >= auc_low or math.isclose(auc_new, auc_low)),
            "figures": f"{auc_new:.4f} against the parent's {auc_old:.4f} (95 % interval from {auc_low:.4f})",
            "site": auc_new,
            "parent": auc_old,
            "bound": auc_low,
        },
        {
            "criterion": "sensitivity at the malignant call",
            "passed": bool(sens_new >= sens_low or math.isclose(sens_new, sens_low)),
            "figures": (
                f"{sens_new:.3f} at P >= {call_new:.3f} against the parent's {sens_old:.3f} at P >= {call_old:.3f} "
                f"(95 % interval from {sens_low:.3f})"
            ),
            "site": sens_new,
            "parent": sens_old,
            "bound": sens_low,
        },
    ]
    gate: dict[str, Any] = finite(
        {
            "rules": GATE_RULES,
            "fixed": "before the run: the rules above are constants of this OncoLens release",
            "rows": len(y),
            "malignant_rows": int(is_mal.sum()),
            "bootstrap": n_boot,
            "criteria": criteria,
            "passed": all(c["passed"] for c in criteria),
        }
    )
    return gate


def _write_package(parent_dir: Path, card: ModelCard, out: Path, onnx: bytes | None = None) -> None:
    """The parent's files (its one-network build left out) with the site card (and, after a re-trained
    head, the new model.onnx and no int8 copy), written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapt-", dir=out.parent))
    skip = {CARD} | ({ONNX} | ({card_int8_file(parent_dir)} - {""}) if onnx is not None else set())
    try:
        if onnx is not None:
            (staging / ONNX).write_bytes(onnx)
        for relative in package_files(parent_dir):
            if relative.as_posix() in skip:
                continue
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(parent_dir / relative, target)
        (staging / CARD).write_text(card.to_json(), encoding="utf-8")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- --retrain-tail: the head re-trained on cached features ---------------------------------------------

MIN_TAIL_PER_CLASS = 20  # train rows a class needs for its head row to be re-trained
TAIL_STRENGTHS = (1e-1, 1e-2, 1e-3)  # pull of the weights towards the parent's, chosen on val
TAIL_STEPS = 400
HEAD_NAMES = ("head.weight", "head.weight.fp16", "head.bias")


@dataclass
class TailFit:
    """A re-trained head: the new logits of the val and test rows, the parent's val logits, the new
    model.onnx, the card fields that change, and what was done, in words."""

    val_logits: np.ndarray
    test_logits: np.ndarray
    parent_val_logits: np.ndarray
    onnx: bytes
    card_fields: dict[str, Any]
    words: str


def card_int8_file(directory: Path) -> str:
    try:
        card = json.loads((directory / CARD).read_text(encoding="utf-8"))
        return str((card.get("int8") or {}).get("file") or "")
    except (OSError, ValueError):
        return ""


def _tail_problems(train_rows: list[Sample], card: ModelCard) -> list[str]:
    counts = Counter(s.label for s in train_rows)
    able = [c for c in card.class_ids if counts.get(c, 0) >= MIN_TAIL_PER_CLASS]
    if len(able) >= 2:
        return []
    shown = ", ".join(f"{c} {counts.get(c, 0)}" for c in card.class_ids)
    return [f"--retrain-tail needs at least {MIN_TAIL_PER_CLASS} train images of two classes or more ({shown})"]


def _pooled(package: ModelPackage, rows: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], pooled features [N, K]) of the rows through the package's network."""
    pooled: list[np.ndarray] = []

    def run(x: np.ndarray) -> np.ndarray:
        logits, features = package.run(x, with_features=True)
        assert features is not None
        pooled.append(features.mean(axis=(2, 3)).astype(np.float64))
        return logits

    logits = dataset_logits(run, rows, package.input_spec)
    return logits, np.concatenate(pooled)


def _fit_head(
    features: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, trainable: np.ndarray, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy with ``strength`` x squared distance from the parent's head, by Adam (full batch);
    the rows of classes not in ``trainable`` stay the parent's."""
    w, b = weight.copy(), bias.copy()
    onehot = np.eye(len(bias))[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    mask = trainable.astype(np.float64)[:, None]
    for step in range(1, TAIL_STEPS + 1):
        z = features @ w.T + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        r = (p - onehot) / len(y)
        grads = [
            (r.T @ features + strength * (w - weight)) * mask,
            (r.sum(axis=0) + strength * (b - bias)) * mask[:, 0],
        ]
        for k, (param, grad) in enumerate(zip((w, b), grads, strict=True)):
            m[k] = 0.9 * m[k] + 0.1 * grad
            v[k] = 0.999 * v[k] + 0.001 * grad**2
            param -= 0.01 * (m[k] / (1 - 0.9**step)) / (np.sqrt(v[k] / (1 - 0.999**step)) + 1e-8)
    return w, b


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    from oncolens.evaluation.calibrate import fit_temperature, nll

    return nll(logits, y, fit_temperature(logits, y))


def retrain_head(
    parent: ModelPackage, train_rows: list[Sample], val_rows: list[Sample], test_rows: list[Sample]
) -> TailFit:
    """The head re-trained on the train rows' pooled features (the network before it is the parent's,
    so its features are computed once), its pull towards the parent chosen on val, and written into a
    copy of the fp32 model.onnx."""
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError:
        raise InvalidInput("--retrain-tail needs the onnx package: pip install 'oncolens[train]'") from None
    card = parent.card
    fp32 = ModelPackage.load(parent.directory, precision="fp32")
    weight = card_head(card)
    w0, b0 = weight
    train_logits, train_f = _pooled(fp32, train_rows)
    val_logits, val_f = _pooled(fp32, val_rows)
    _, test_f = _pooled(fp32, test_rows)
    gap = float(np.abs(train_f @ w0.T + b0 - train_logits).max())
    if gap > 1e-2:
        raise InvalidInput(
            f"{card.id}'s logits are not its card's head on its pooled features (largest gap {gap:.3g}); "
            "--retrain-tail cannot re-train it"
        )
    y_train, y_val = encode_labels(train_rows, card.class_ids), encode_labels(val_rows, card.class_ids)
    counts = np.bincount(y_train, minlength=len(card.classes))
    trainable = counts >= MIN_TAIL_PER_CLASS
    fits = []
    for strength in TAIL_STRENGTHS:
        w, b = _fit_head(train_f, y_train, w0, b0, trainable, strength)
        fits.append((_nll(val_f @ w.T + b, y_val), strength, w, b))
    parent_nll = _nll(val_logits, y_val)
    best_nll, strength, w, b = min(fits, key=lambda fit: fit[0])
    model = onnx.load(str(fp32.model_file))
    replaced = set()
    for initializer in model.graph.initializer:
        if initializer.name not in HEAD_NAMES:
            continue
        old = numpy_helper.to_array(initializer)
        is_bias = initializer.name == "head.bias"
        expected = b0 if is_bias else w0
        if old.shape != expected.shape or float(np.abs(old.astype(np.float64) - expected).max()) > 1e-3:
            raise InvalidInput(f"{card.id}'s model.onnx holds a {initializer.name} unlike its card's head")
        new = (b if is_bias else w).astype(old.dtype)
        initializer.CopyFrom(numpy_helper.from_array(new, initializer.name))
        if is_bias:
            b = new.astype(np.float64)
        else:
            w = new.astype(np.float64)
        replaced.add("bias" if is_bias else "weight")
    if replaced != {"weight", "bias"}:
        raise InvalidInput(f"{card.id}'s model.onnx has no head initializers named {', '.join(HEAD_NAMES)}")
    data = model.SerializeToString()
    check = _answer_gap(data, fp32, train_rows[:4], w, b)
    if check > 1e-3:
        raise InvalidInput(f"the re-written model.onnx does not answer as its new head says (gap {check:.3g})")
    head = {
        "weight_shape": list(w.shape),
        "weight_f32_b64": base64.b64encode(w.astype("<f4").tobytes()).decode(),
        "bias_f32_b64": base64.b64encode(b.astype("<f4").tobytes()).decode(),
    }
    retrained = [c for c, able in zip(card.class_ids, trainable, strict=True) if able]
    words = (
        f"the head (linear layer on the pooled features) re-trained on {len(y_train)} train rows for "
        f"{', '.join(retrained)} (the other classes keep the parent's rows), pulled towards the parent's "
        f"weights with strength {strength:g} chosen on val (val NLL {best_nll:.4f}; the parent's {parent_nll:.4f}); "
        "the int8 copy is left out (it holds the parent's head)"
    )
    return TailFit(
        val_f @ w.T + b,
        test_f @ w.T + b,
        val_logits,
        data,
        {"head": head, "sha256": hashlib.sha256(data).hexdigest(), "int8": None},
        words,
    )


def _answer_gap(data: bytes, package: ModelPackage, rows: list[Sample], w: np.ndarray, b: np.ndarray) -> float:
    """Largest difference between the re-written network's logits and its new head on its own features."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    images = preprocess([open_rgb(s.file) for s in rows], package.input_spec)
    logits, features = session.run(["logits", "features"], {"image": images})
    return float(np.abs(features.mean(axis=(2, 3)) @ w.T + b - logits).max())


def card_head(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """The card's head weights [C, K] and bias [C], float64."""
    shape = card.head.weight_shape
    weight = np.frombuffer(base64.b64decode(card.head.weight_f32_b64), dtype="<f4").reshape(shape)
    bias_text = card.head.bias_f32_b64
    bias = np.frombuffer(base64.b64decode(bias_text), dtype="<f4") if bias_text else np.zeros(shape[0], "<f4")
    return weight.astype(np.float64), bias.astype(np.float64)
