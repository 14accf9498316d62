"""Edge export: a model package as ONNX Runtime's mobile format (``.ort``) with everything a phone or a
Raspberry-Pi-class device needs to give the server's answer without OncoLens installed: how to make
the input from an image, which output is what, how logits become calibrated probabilities, the
decision rule, P(malignant) and the risk levels.

The ``.ort`` file is the serving file (the int8 copy where it passed its accuracy gate, else fp32)
converted by ``onnxruntime.tools.convert_onnx_models_to_ort`` with the fixed optimisations of the
ONNX Runtime release that wrote it; ``required_operators.config`` lists its operators, for a
reduced-size ONNX Runtime build.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from oncolens.zoo.package import ModelPackage, PackageError

SPEC_FILE = "oncolens-edge.json"


@dataclass(frozen=True)
class EdgeExport:
    model: Path
    spec: Path
    precision: str


def edge_spec(package: ModelPackage, model_file: str) -> dict[str, Any]:
    """The device-side contract: preprocessing, outputs, calibration, decision and risk levels."""
    card = package.card
    spec = package.input_spec
    return {
        "format": "oncolens-edge/1",
        "model": {"id": card.id, "version": card.version, "title": card.title, "precision": package.precision},
        "file": model_file,
        "onnxruntime_version": ort.__version__,
        "disclaimer": card.disclaimer,
        "input": {
            "name": "image",
            "shape": ["N", 3, spec.size, spec.size],
            "dtype": "float32",
            "layout": "NCHW",
            "color": "RGB",
            "steps": [
                "decode the image to 8-bit RGB (apply EXIF orientation)"
                + ("; convert to grey (luma) and back to three equal channels" if spec.grayscale else ""),
                _resize_step(spec.resize, spec.size),
                "scale to [0, 1] (divide by 255), subtract mean and divide by std per channel (RGB order)",
                "transpose HWC -> CHW and stack images into a batch",
            ],
            "size": spec.size,
            "resize": spec.resize,
            "interpolation": "bilinear",
            "grayscale": spec.grayscale,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "outputs": {
            "logits": ["N", len(card.classes)],
            "features": "[N, K, h, w]: the last feature map, for a class-activation heat-map with head.weight",
        },
        "classes": [{"id": c.id, "name": c.name, "malignant": c.malignant} for c in card.classes],
        "probabilities": {
            "formula": "softmax((logits + logit_bias) / temperature)",
            "temperature": card.calibration.temperature,
            "logit_bias": card.calibration.logit_bias or [0.0] * len(card.classes),
        },
        "decision": {
            "rule": card.decision.rule,
            "formula": "argmax(log(p) + class_offsets)" if card.decision.rule == "offsets" else "argmax(p)",
            "class_offsets": card.decision.class_offsets,
        },
        "p_malignant": "sum of the probabilities of the classes marked malignant",
        "risk_levels": [
            {"level": str(level.level), "min_p_malignant": level.min, "recommendation": level.recommendation}
            for level in card.risk_policy.levels
        ],
        "malignant_threshold": card.risk_policy.malignant_threshold,
        "not_on_device": [
            "the out-of-domain check (images unlike the training images get no answer on the server)",
            "the image-quality warnings",
        ],
    }


def _resize_step(rule: str, size: int) -> str:
    return {
        "squash": f"resize to {size}x{size} ignoring the aspect ratio",
        "center_crop": f"resize the shorter side to {size} (aspect kept), then crop the central {size}x{size}",
        "pad": f"paste onto a black square of the longer side (centred; a side over 4096 px is first shrunk "
        f"to 4096, aspect kept), then resize to {size}x{size}",
    }[rule]


def export_edge(package: ModelPackage, out_dir: Path) -> EdgeExport:
    """Write ``<id>.ort``, its operator list and ``oncolens-edge.json`` into ``out_dir``."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    card, source = package.card, package.model_file  # the file that serves, checked when it loaded
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(source, work / f"{card.id}.onnx")
        convert_onnx_models_to_ort(
            work / f"{card.id}.onnx", output_dir=work / "out", optimization_styles=[OptimizationStyle.Fixed]
        )
        converted = sorted((work / "out").glob("*.ort"))
        if len(converted) != 1:
            raise PackageError(f"the conversion of {source.name} to the ORT format gave {len(converted)} files")
        model = out_dir / f"{card.id}.ort"
        shutil.copy(converted[0], model)
        for config in (work / "out").glob("*.config"):
            shutil.copy(config, out_dir / "required_operators.config")
    spec = out_dir / SPEC_FILE
    spec.write_text(json.dumps(edge_spec(package, model.name), indent=2) + "\n")
    shutil.copy(Path(__file__).with_name("edge_runner.py"), out_dir / "predict.py")
    (out_dir / "README.md").write_text(_readme(package, model.name))
    return EdgeExport(model, spec, package.precision)


def _readme(package: ModelPackage, model_file: str) -> str:
    card = package.card
    return f"""# {card.title} ({card.id} v{card.version}) on a device

{card.disclaimer}

- `{model_file}`: the model in ONNX Runtime's mobile format ({package.precision}), written with ONNX Runtime
  {ort.__version__}; load it with that release or a newer one.
- `oncolens-edge.json`: how to make the input from an image, the outputs, the calibration (temperature and
  logit bias), the decision rule, P(malignant) and the risk levels with their recommendations.
- `predict.py`: a reference runner (numpy, Pillow, onnxruntime; no OncoLens) that follows the JSON step by step.
- `required_operators.config`: the operators the model uses, for a reduced-size ONNX Runtime build
  (`build.sh --minimal_build --include_ops_by_config required_operators.config`).

## Raspberry Pi (64-bit OS) or any Linux/macOS/Windows machine

```bash
python3 -m venv venv && . venv/bin/activate
pip install onnxruntime numpy pillow        # aarch64 wheels exist for Raspberry Pi OS 64-bit
python predict.py lesion.jpg                # one JSON line per image
```

## Phone

Android: add `com.microsoft.onnxruntime:onnxruntime-android` (or `onnxruntime-mobile`) to the app, load
`{model_file}` with `OrtEnvironment.createSession`, and port `model_input` and `answer` of `predict.py`
(about 60 lines). iOS: the `onnxruntime-objc` pod, the same two functions in Swift. Feed float32 NCHW RGB.

Not on the device: the server's out-of-domain check (an image unlike the training images gets no answer
there) and the image-quality warnings. A device answer for a photo of the wrong organ or a blurred image
is therefore not checked: use it only for the images the model card describes.
"""
