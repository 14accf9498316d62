"""Probe int8 quantization recipes on one model before gating: agreement with fp32 and speed.

    python scripts/int8_probe.py MODEL_ID DATASET_DIR [--variants base,head+stem,dw,8bit] [--images 400]

Each variant is `oncolens quantize`'s own call (QDQ, per-channel 7-bit int8 weights, uint8
activations, MinMax ranges from 200 train images) with some nodes left in fp32: ``head`` (the last
convolution and the linear head), ``stem`` (the first convolution), ``dw`` (every depthwise
convolution), and ``8bit`` (weights in all 8 bits, not 7: exact only on a CPU with VNNI, where
nothing saturates). Printed per variant, on ``--images`` random val images and the golden samples: the
share with the same top class, the mean and 95th percentile of the largest class-probability change,
the golden samples' largest change, the change of balanced accuracy (argmax), and the batch-1 p50.
(Percentile/entropy calibration was tried too: onnxruntime keeps every activation of the 200 images
in memory for its histograms and was killed at 24 GB.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from oncolens import decision
from oncolens.evaluation.datasets import drop_labels, open_rgb, read_manifest, select_split
from oncolens.evaluation.metrics import balanced_accuracy
from oncolens.training.quantize import METHOD, calibration_samples, golden_images, quantize, staged_int8
from oncolens.zoo import ModelPackage, Zoo
from oncolens.zoo.card import Int8Info
from oncolens.zoo.preprocess import preprocess

SAMPLES = Path(__file__).parents[1] / "samples"


def probabilities(package: ModelPackage, x: np.ndarray) -> np.ndarray:
    chunks = [package.run(x[i : i + 32])[0].astype("float64") for i in range(0, len(x), 32)]
    return decision.probabilities(package.card, np.concatenate(chunks))


def excluded(model: onnx.ModelProto, variant: str) -> list[str]:
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    parts = variant.split("+")
    names: list[str] = []
    if "head" in parts:
        names += [convs[-1].name] + [n.name for n in model.graph.node if n.op_type == "Gemm"]
    if "stem" in parts:
        names.append(convs[0].name)
    if "dw" in parts:
        names += [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_id")
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--variants", default="base,head+stem,dw,head+stem+dw")
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    fp32 = Zoo().get(args.model_id)
    val, _ = drop_labels(select_split(read_manifest(args.dataset_dir), "val"), fp32.card.dataset.excluded_labels)
    rng = np.random.default_rng(1)
    val = [val[i] for i in rng.permutation(len(val))[: args.images]]
    x = np.concatenate(
        [preprocess([open_rgb(s.file) for s in val[i : i + 32]], fp32.input_spec) for i in range(0, len(val), 32)]
    )
    y = np.array([fp32.class_ids.index(s.label) for s in val])
    golden = golden_images(fp32, SAMPLES / args.model_id)
    reference, golden_reference = probabilities(fp32, x), [probabilities(fp32, g[1]) for g in golden]
    calibration = calibration_samples(args.dataset_dir, fp32, 200)
    graph = onnx.load(str(fp32.directory / "model.onnx"))
    classes = len(fp32.class_ids)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            out = Path(tmp) / f"{variant}.onnx"
            start = time.perf_counter()
            seven_bit = "8bit" not in variant.split("+")
            quantize(fp32, calibration, out, keep_fp32=excluded(graph, variant), reduce_range=seven_bit)
            seconds = time.perf_counter() - start
            with staged_int8(fp32.directory, out, Int8Info(passed=False, method=METHOD)) as int8:
                probs = probabilities(int8, x)
                golden_probs = [probabilities(int8, g[1]) for g in golden]
                for _ in range(10):
                    int8.run(x[:1])
                times = []
                for _ in range(100):
                    tick = time.perf_counter()
                    int8.run(x[:1])
                    times.append(time.perf_counter() - tick)
            change = np.abs(probs - reference).max(axis=1)
            row = {
                "variant": variant,
                "fp32 nodes": len(excluded(graph, variant)),
                "same top class": float((probs.argmax(1) == reference.argmax(1)).mean()),
                "mean max |dp|": float(change.mean()),
                "p95 max |dp|": float(np.percentile(change, 95)),
                "golden max |dp|": max(
                    float(np.abs(a - b).max()) for a, b in zip(golden_probs, golden_reference, strict=True)
                ),
                "delta bal-acc": balanced_accuracy(y, probs.argmax(1), classes)
                - balanced_accuracy(y, reference.argmax(1), classes),
                "p50 ms": float(np.median(times) * 1000),
                "quantize s": round(seconds, 1),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
