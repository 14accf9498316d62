"""int8 copies of model packages: static quantization calibrated on train images, and the accuracy gate
the copy must pass before it may serve.

The quantized file (``model.int8.onnx``) is ONNX Runtime's QDQ format: int8 weights per output
channel, uint8 activations with ranges calibrated on images of the ``train`` split (never val or
test, which the gate measures on). The weights use 7 of their 8 bits (``reduce_range``): x86 CPUs
without VNNI (AVX2, AVX-512 before Cascade Lake) multiply uint8 by int8 with an instruction that
saturates its 16-bit sums, which with full-range weights changed the top class of 26 of 96 val images
of skin-ham10000 on this AVX2 machine (7-bit: 5 of 96); 7-bit weights cannot saturate, so the file
gives the same answers on every x86 CPU, and the gate measured here holds wherever it serves. (On a
CPU with AVX512-VNNI, 8-bit weights kept the top class of 96.8% of 400 val images against 93.5% with
7 bits, still short of the gate, and such a file would answer differently on a CPU without VNNI.)
The gate compares the two files on ``val`` and ``test``:

- |delta macro AUROC| <= 0.005 and |delta balanced accuracy| <= 0.01 on each split;
- calibration not worse: int8 ECE <= fp32 ECE + 0.005 on each split;
- the golden samples (``samples/<model>``): every class probability within ``GOLDEN_TOLERANCE``;
- the heat-map of the int8 model correlates >= 0.95 (Pearson) with the fp32 one on every golden
  sample (the top class's map, at the size it is shown on the image).

Both files' figures and every criterion go into the card's ``int8`` section; a copy that fails any
criterion is deleted and the package serves fp32.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from oncolens.decision import probabilities
from oncolens.evaluation.datasets import Sample, drop_labels, open_rgb, read_manifest, select_split
from oncolens.evaluation.evaluate import evaluate_package
from oncolens.vision.cam import class_activation_map, upsample_cam
from oncolens.zoo.card import Int8Info, read_card
from oncolens.zoo.package import CARD, ONNX, ModelPackage, sha256_of
from oncolens.zoo.preprocess import preprocess

INT8_FILE = "model.int8.onnx"
MAX_DELTA_AUROC = 0.005
MAX_DELTA_BALANCED_ACCURACY = 0.01
MAX_ECE_INCREASE = 0.005
GOLDEN_TOLERANCE = 0.05  # largest change of any class probability on a golden sample
MIN_HEATMAP_CORRELATION = 0.95
METHOD = (
    "ONNX Runtime static quantization, QDQ format: int8 weights per output channel (symmetric, 7-bit range), "
    "uint8 activations, MinMax ranges calibrated on train images; the head that writes the logits in fp32"
)


class QuantizeError(ValueError):
    """A request the int8 step cannot carry out (a bundle of another model, an untuned bundle)."""


QAT_METHOD = (
    "; weights then tuned by quantization-aware distillation from the fp32 model on train images "
    "(fake-quantized int8 graph, KL of the probabilities + feature-map error; activation ranges kept)"
)


def calibration_samples(dataset_dir: Path, package: ModelPackage, count: int, seed: int = 0) -> list[Sample]:
    """``count`` train images spread over the classes (as evenly as each class allows), in a fixed order."""
    samples, _ = drop_labels(select_split(read_manifest(dataset_dir), "train"), package.card.dataset.excluded_labels)
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    pools = {label: [items[i] for i in rng.permutation(len(items))] for label, items in sorted(by_class.items())}
    chosen: list[Sample] = []
    while len(chosen) < min(count, len(samples)):
        for pool in pools.values():
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return chosen


class CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader over preprocessed images, a few at a time."""

    def __init__(self, samples: list[Sample], package: ModelPackage, batch: int = 1) -> None:
        self.samples, self.package, self.batch, self.position = samples, package, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.samples):
            return None
        chunk = self.samples[self.position : self.position + self.batch]
        self.position += len(chunk)
        return {"image": preprocess([open_rgb(s.file) for s in chunk], self.package.input_spec)}

    def rewind(self) -> None:
        self.position = 0


def quantize(
    package: ModelPackage,
    samples: list[Sample],
    out: Path,
    keep_fp32: Sequence[str] = (),
    reduce_range: bool = True,
    head_fp32: bool = True,
) -> None:
    """Write the int8 QDQ copy of ``package``'s fp32 model to ``out``, calibrated on ``samples``.

    ``keep_fp32`` names graph nodes left unquantized (`scripts/int8_probe.py` tries such variants);
    ``reduce_range=False`` uses all 8 bits of the weights. ``head_fp32`` keeps the node that writes
    the logits in fp32 (a C x 1280 product): int8 logits are clamped to the range the calibration
    images reached, so the most confident answers lose confidence and the copy's ECE rises.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(package.directory / ONNX), str(prepared), skip_symbolic_shape=True)
        if head_fp32:
            graph = onnx.load(str(prepared)).graph
            keep_fp32 = [*keep_fp32, *(n.name for n in graph.node if "logits" in n.output)]
        quantize_static(
            str(prepared),
            str(out),
            CalibrationReader(samples, package),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=list(keep_fp32),
        )


def golden_images(package: ModelPackage, samples_dir: Path) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    """(file, model input [1,3,S,S], original size) of each golden sample of the package."""
    manifest = samples_dir / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        image = open_rgb(samples_dir / row["file"])
        out.append((row["file"], preprocess([image], package.input_spec), image.size))
    return out


def compare_golden(
    fp32: ModelPackage, int8: ModelPackage, golden: list[tuple[str, np.ndarray, tuple[int, int]]]
) -> dict[str, Any]:
    """Largest probability change and the heat-maps' correlation on each golden sample."""
    weight = fp32.head_weight
    size = fp32.input_spec.size
    rows = {}
    for name, inputs, _ in golden:
        logits_a, features_a = fp32.run(inputs, with_features=True)
        logits_b, features_b = int8.run(inputs, with_features=True)
        probs_a = probabilities(fp32.card, logits_a.astype(np.float64))[0]
        probs_b = probabilities(int8.card, logits_b.astype(np.float64))[0]
        top = int(fp32.card.decision.top(probs_a[None])[0])
        assert features_a is not None and features_b is not None
        maps = [
            upsample_cam(class_activation_map(f[0], weight, top), size, fp32.feature_offset).ravel()
            for f in (features_a, features_b)
        ]
        rows[name] = {
            "max_abs_probability_change": float(np.abs(probs_a - probs_b).max()),
            "same_decision": bool(top == int(int8.card.decision.top(probs_b[None])[0])),
            "heatmap_correlation": float(np.corrcoef(maps[0], maps[1])[0, 1]),
        }
    return rows


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece")
    out = {k: report.get(k) for k in keys}
    if "malignant" in report:
        out["malignant_auc"] = report["malignant"].get("auc")
    return out


def gate(
    fp32: ModelPackage,
    int8: ModelPackage,
    dataset_dir: Path,
    samples_dir: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both files' figures on val and test, the golden comparison, and each criterion's verdict."""
    figures: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    for split in ("val", "test"):
        a = _headline(evaluate_package(fp32, dataset_dir, split, n_boot=0))
        b = _headline(evaluate_package(int8, dataset_dir, split, n_boot=0))
        figures[split] = {"fp32": a, "int8": b}
        log(
            f"{split}: fp32 bal-acc {a['balanced_accuracy']:.4f} AUROC {a['macro_auc']:.4f} ECE {a['ece']:.4f} | "
            f"int8 {b['balanced_accuracy']:.4f} {b['macro_auc']:.4f} {b['ece']:.4f}"
        )
        checks += split_checks(split, a, b)
    golden = compare_golden(fp32, int8, golden_images(fp32, samples_dir))
    if golden:
        worst = max(r["max_abs_probability_change"] for r in golden.values())
        lowest = min(r["heatmap_correlation"] for r in golden.values())
        checks += [
            _check("golden samples: largest probability change", worst, GOLDEN_TOLERANCE),
            _check("golden samples: lowest heat-map correlation", lowest, MIN_HEATMAP_CORRELATION, at_least=True),
        ]
    else:
        checks.append({"criterion": "golden samples", "value": None, "limit": None, "passed": False})
    return {"figures": figures, "golden": golden, "checks": checks, "passed": all(c["passed"] for c in checks)}


def split_checks(split: str, fp32: dict[str, Any], int8: dict[str, Any]) -> list[dict[str, Any]]:
    """The gate's criteria on one split, from each file's ``macro_auc``, ``balanced_accuracy`` and ``ece``."""
    return [
        _check(f"{split} |delta macro AUROC|", abs(int8["macro_auc"] - fp32["macro_auc"]), MAX_DELTA_AUROC),
        _check(
            f"{split} |delta balanced accuracy|",
            abs(int8["balanced_accuracy"] - fp32["balanced_accuracy"]),
            MAX_DELTA_BALANCED_ACCURACY,
        ),
        _check(f"{split} ECE increase", int8["ece"] - fp32["ece"], MAX_ECE_INCREASE),
    ]


def _check(criterion: str, value: float, limit: float, at_least: bool = False) -> dict[str, Any]:
    passed = value >= limit if at_least else value <= limit
    return {"criterion": criterion, "value": round(float(value), 6), "limit": limit, "passed": bool(passed)}


@contextlib.contextmanager
def staged_int8(package_dir: Path, int8_file: Path, info: Int8Info, spinning: bool = False) -> Iterator[ModelPackage]:
    """The package in ``package_dir`` served from ``int8_file``, as if its card said ``info`` (gating, timing).

    Loaded from a temporary folder of links and a copy of the card; the package itself is not touched.
    """
    card = read_card(package_dir / CARD)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp)
        (probe / ONNX).symlink_to((package_dir / ONNX).resolve())
        (probe / INT8_FILE).symlink_to(int8_file.resolve())
        if card.domain is not None:
            (probe / card.domain.file).symlink_to((package_dir / card.domain.file).resolve())
        staged = info.model_copy(update={"file": INT8_FILE, "sha256": sha256_of(int8_file), "passed": True})
        (probe / CARD).write_text(card.model_copy(update={"int8": staged}).to_json())
        yield ModelPackage.load(probe, precision="int8", spinning=spinning)


QAT_IMAGE_SEED = 1  # the tuning images are drawn apart from the calibration images (seed 0)


def _prepared_copy(
    fp32: ModelPackage, dataset_dir: Path, target: Path, calibration_images: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Write the calibrated (untuned) int8 copy to ``target``; the calibration record for the card."""
    samples = calibration_samples(dataset_dir, fp32, calibration_images)
    start = time.perf_counter()
    quantize(fp32, samples, target)
    log(f"quantized {fp32.id} on {len(samples)} train images in {time.perf_counter() - start:.0f} s")
    return {"split": "train", "images": len(samples), "seed": 0, "per_class": _per_class(samples)}


def export_qat(
    package_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    calibration_images: int = 200,
    qat_images: int = 512,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a bundle that ``python -m oncolens.training.qat`` tunes on another machine (a GPU): the calibrated
    int8 copy, the fp32 graph with fp16-stored weights (the teacher), the tuning images' model pixels (JPEG,
    quality ``qat.BUNDLE_JPEG_QUALITY``, to travel: teacher and student both see the decoded pixels) and their
    normalisation table. The package is not touched; ``add_int8(..., tuned=out_dir)`` gates the result.
    """
    import onnx
    import torch

    from oncolens.training import qat
    from oncolens.zoo.preprocess import _normalize_table, model_pixels

    fp32 = ModelPackage.load(package_dir, precision="fp32")
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration = _prepared_copy(fp32, dataset_dir, out_dir / qat.BUNDLE_INT8, calibration_images, log)
    chosen = calibration_samples(dataset_dir, fp32, qat_images, seed=QAT_IMAGE_SEED)
    spec = fp32.input_spec
    encoded: list[bytes] = []
    for sample in chosen:
        pixels = model_pixels(open_rgb(sample.file), spec)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if spec.grayscale else pixels).save(
            buffer, "JPEG", quality=qat.BUNDLE_JPEG_QUALITY
        )
        encoded.append(buffer.getvalue())
    np.savez(
        out_dir / qat.BUNDLE_PIXELS,
        jpeg=np.frombuffer(b"".join(encoded), np.uint8),
        ends=np.cumsum([len(e) for e in encoded]),
        table=_normalize_table(tuple(spec.mean), tuple(spec.std)),
    )
    teacher = qat.fp16_weights(onnx.load(str(package_dir / ONNX)))
    onnx.save(teacher, str(out_dir / qat.BUNDLE_TEACHER))
    # what storing the teacher's weights in fp16 costs, on the tuning images themselves
    x = qat.bundle_images(out_dir)[:64]
    exact = qat.onnx_teacher(package_dir / ONNX)(x)[0].numpy()
    rounded = qat.graph_teacher(qat.fp32_weights(teacher), torch.device("cpu"))(x)[0].numpy()
    settings = {
        "model": fp32.id,
        "fp32_sha256": sha256_of(package_dir / ONNX),
        "calibration": calibration,
        "qat_images": {
            "split": "train",
            "images": len(chosen),
            "seed": QAT_IMAGE_SEED,
            "per_class": _per_class(chosen),
            "pixels": f"model pixels as JPEG, quality {qat.BUNDLE_JPEG_QUALITY}",
        },
        "teacher_fp16_max_abs_logit_change": round(float(np.abs(rounded - exact).max()), 6),
    }
    (out_dir / qat.BUNDLE).write_text(json.dumps(settings, indent=2))
    log(
        f"{fp32.id}: bundle of {len(chosen)} images in {out_dir}; fp16 teacher max |delta logit| "
        f"{settings['teacher_fp16_max_abs_logit_change']}"
    )
    return out_dir


def _tuned_copy(fp32: ModelPackage, bundle: Path, target: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Copy a bundle's tuned int8 file (:func:`export_qat`, tuned elsewhere) to ``target``; the card's record."""
    from oncolens.training import qat

    settings = json.loads((bundle / qat.BUNDLE).read_text())
    if settings["model"] != fp32.id or settings["fp32_sha256"] != sha256_of(fp32.directory / ONNX):
        raise QuantizeError(f"the bundle in {bundle} was made from another model file than {fp32.id}'s")
    if not (bundle / qat.TUNED).is_file():
        raise QuantizeError(f"the bundle in {bundle} has not been tuned (no {qat.TUNED})")
    shutil.copyfile(bundle / qat.TUNED, target)
    result = json.loads((bundle / qat.TUNED_RESULT).read_text())
    log(f"gating the copy tuned for {result['steps']} steps on {result['hardware']}")
    return {
        **settings["calibration"],
        "qat": {
            **result,
            **settings["qat_images"],
            "teacher": "the fp32 model, its weights stored in fp16 to travel (run by teacher_runtime)",
            "teacher_fp16_max_abs_logit_change": settings["teacher_fp16_max_abs_logit_change"],
        },
    }


def _tune_here(
    fp32: ModelPackage, dataset_dir: Path, target: Path, steps: int, images: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Tune the int8 copy at ``target`` on this machine's CPU; the card's record of the tuning."""
    from oncolens.training.qat import tune_int8

    chosen = calibration_samples(dataset_dir, fp32, images, seed=QAT_IMAGE_SEED)
    x = np.concatenate(
        [preprocess([open_rgb(s.file) for s in chosen[i : i + 32]], fp32.input_spec) for i in range(0, len(chosen), 32)]
    )
    tuning = tune_int8(target, fp32.directory / ONNX, x, steps, log=log)
    log(f"tuned the int8 copy for {tuning.steps} steps on {tuning.images} train images in {tuning.seconds:.0f} s")
    return {**asdict(tuning), "split": "train", "seed": QAT_IMAGE_SEED, "per_class": _per_class(chosen)}


def add_int8(
    package_dir: Path,
    dataset_dir: Path,
    samples_dir: Path,
    calibration_images: int = 200,
    log: Callable[[str], None] = print,
    qat_steps: int = 0,
    qat_images: int = 512,
    tuned: Path | None = None,
) -> Int8Info:
    """Quantize the package in ``package_dir``, gate the copy, and write the verdict into its card.

    With ``qat_steps`` > 0 the copy's weights are then tuned towards the fp32 model's answers on
    ``qat_images`` train images (`training/qat.py`) before the gate. With ``tuned`` (a bundle from
    :func:`export_qat`, tuned elsewhere) its tuned copy is gated instead. A copy that passes stays as
    ``model.int8.onnx`` (serving picks it by default); one that fails is removed and the card says
    which criterion it failed.
    """
    if tuned is not None and qat_steps > 0:
        raise QuantizeError("a bundle tuned elsewhere is gated as it is: give either the bundle or the steps")
    fp32 = ModelPackage.load(package_dir, precision="fp32")
    target = package_dir / INT8_FILE
    target.unlink(missing_ok=True)
    if tuned is not None:
        calibration = _tuned_copy(fp32, tuned, target, log)
    else:
        calibration = _prepared_copy(fp32, dataset_dir, target, calibration_images, log)
        if qat_steps > 0:
            try:
                calibration["qat"] = _tune_here(fp32, dataset_dir, target, qat_steps, qat_images, log)
            except BaseException:
                target.unlink(missing_ok=True)  # never leave an ungated copy beside the package
                raise
    method = METHOD + QAT_METHOD if "qat" in calibration else METHOD
    card_path = package_dir / CARD
    card = read_card(card_path)
    trial = Int8Info(passed=True, file=INT8_FILE, sha256=sha256_of(target), method=method, calibration=calibration)
    try:
        with staged_int8(package_dir, target, trial) as int8:
            verdict = gate(fp32, int8, dataset_dir, samples_dir, log)
    except BaseException:
        target.unlink(missing_ok=True)  # never leave an ungated copy beside the package
        raise
    info = trial.model_copy(update={"passed": verdict["passed"], "gate": verdict})
    if not verdict["passed"]:
        failed = [c["criterion"] for c in verdict["checks"] if not c["passed"]]
        log(f"int8 copy of {fp32.id} failed the gate ({'; '.join(failed)}): removed, fp32 serves")
        target.unlink()
        info = info.model_copy(update={"file": "", "sha256": ""})
    card_path.write_text(card.model_copy(update={"int8": info}).to_json())
    return info


def _per_class(samples: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.label] = counts.get(sample.label, 0) + 1
    return dict(sorted(counts.items()))
