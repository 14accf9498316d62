"""How closely a (tuned) int8 copy follows its fp32 model on its tuning images and on unseen val images.

    python scripts/qat_fit.py breast-us ../shared/datasets/breast-us BUNDLE_DIR [--int8 FILE]

Prints KL(fp32 || int8) of the class probabilities on the first 96 images of the bundle (the images
the copy was tuned on) and on the first 96 `val` images, for the tuned copy and the untuned one, and
KL(fp32 || the bundle's fp16-stored teacher). A tuned copy that fits its tuning images far better
than val has fitted those images rather than the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from oncolens.evaluation.datasets import open_rgb, read_manifest, select_split
from oncolens.training import qat
from oncolens.zoo.package import ONNX, ModelPackage
from oncolens.zoo.preprocess import preprocess

ZOO = Path(__file__).resolve().parents[1] / "src" / "oncolens" / "zoo"


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = torch.softmax(torch.from_numpy(p_logits).double(), 1)
    log_q = torch.log_softmax(torch.from_numpy(q_logits).double(), 1)
    return float((p * (p.log() - log_q)).sum(1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_id")
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--int8", type=Path, help="the tuned copy (default: the bundle's)")
    parser.add_argument("--images", type=int, default=96)
    args = parser.parse_args()
    package = ZOO / args.model_id
    spec = ModelPackage.load(package, precision="fp32").input_spec
    val = select_split(read_manifest(args.dataset_dir), "val")[: args.images]
    sets = {
        "tuning images": qat.bundle_images(args.bundle)[: args.images],
        "val": preprocess([open_rgb(s.file) for s in val], spec),
    }

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    fp32 = session(package / ONNX)
    tuned = session(args.int8 or args.bundle / qat.TUNED)
    untuned = session(args.bundle / qat.BUNDLE_INT8)
    teacher = qat.graph_teacher(qat.fp32_weights(onnx.load(str(args.bundle / qat.BUNDLE_TEACHER))), torch.device("cpu"))
    for name, x in sets.items():
        reference = fp32.run(["logits"], {"image": x})[0]
        print(
            f"{name} (n {len(x)}): KL(fp32 || tuned int8) {kl(reference, tuned.run(['logits'], {'image': x})[0]):.5f}, "
            f"untuned {kl(reference, untuned.run(['logits'], {'image': x})[0]):.5f}, "
            f"fp16-stored teacher {kl(reference, teacher(x)[0].numpy()):.6f}"
        )


if __name__ == "__main__":
    main()
