"""Run an OncoLens edge export on a device: ``python predict.py IMAGE [IMAGE ...]``.

Standalone (numpy, Pillow and onnxruntime only; no OncoLens): ``oncolens export-edge`` copies this file
next to the ``.ort`` model and ``oncolens-edge.json`` as ``predict.py``. It follows the spec file
step by step, so it is also the reference for a port to a phone (Kotlin/Swift with ONNX Runtime
Mobile). Decision support, not a diagnosis.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
MAX_CANVAS_SIDE = 4096


def load(folder: Path = HERE) -> tuple[dict[str, Any], ort.InferenceSession]:
    spec = json.loads((folder / "oncolens-edge.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(str(folder / spec["file"]), providers=["CPUExecutionProvider"])
    return spec, session


def model_input(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """One decoded image -> [3, S, S] float32, by the spec's resize rule and normalisation."""
    info = spec["input"]
    size, rule, grey = int(info["size"]), info["resize"], bool(info["grayscale"])
    image = ImageOps.exif_transpose(image).convert("L" if grey else "RGB")
    if rule == "center_crop":
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif rule == "pad":
        w, h = image.size
        side = max(w, h)
        if side > MAX_CANVAS_SIDE:  # a long thin image is shrunk first, aspect kept
            w, h = max(1, round(w * MAX_CANVAS_SIDE / side)), max(1, round(h * MAX_CANVAS_SIDE / side))
            image = image.resize((w, h), Image.Resampling.BILINEAR)
            side = max(w, h)
        canvas = Image.new(image.mode, (side, side))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas.resize((size, size), Image.Resampling.BILINEAR)
    else:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    x = (pixels - np.asarray(info["mean"], np.float32)) / np.asarray(info["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def answer(logits: np.ndarray, spec: dict[str, Any]) -> dict[str, Any]:
    """One image's logits -> calibrated probabilities, top class, P(malignant), risk level."""
    calib = spec["probabilities"]
    z = (logits.astype(np.float64) + np.asarray(calib["logit_bias"], np.float64)) / float(calib["temperature"])
    p = np.exp(z - z.max())
    p /= p.sum()
    decision = spec["decision"]
    if decision["rule"] == "offsets" and decision["class_offsets"] is not None:
        top = int(np.argmax(np.log(np.maximum(p, 1e-300)) + np.asarray(decision["class_offsets"], np.float64)))
    else:
        top = int(np.argmax(p))
    classes = spec["classes"]
    p_malignant = float(sum(p[i] for i, c in enumerate(classes) if c["malignant"]))
    level = next(lv for lv in reversed(spec["risk_levels"]) if p_malignant >= lv["min_p_malignant"])
    return {
        "probabilities": {c["id"]: float(p[i]) for i, c in enumerate(classes)},
        "top_class": classes[top]["id"],
        "p_malignant": p_malignant,
        "risk_level": level["level"],
        "recommendation": level["recommendation"],
    }


def predict(paths: list[Path], folder: Path = HERE) -> list[dict[str, Any]]:
    spec, session = load(folder)
    batch = np.stack([model_input(Image.open(path), spec) for path in paths])
    logits = session.run(["logits"], {spec["input"]["name"]: batch})[0]
    return [{"file": str(path)} | answer(row, spec) for path, row in zip(paths, logits, strict=True)]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python predict.py IMAGE [IMAGE ...]")
    for row in predict([Path(p) for p in sys.argv[1:]]):
        print(json.dumps(row))
