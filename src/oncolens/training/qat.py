"""Quantization-aware distillation: tune an int8 copy's weights so that it answers like its fp32 model.

ONNX Runtime's static quantization (``quantize.quantize``) rounds every weight and every activation
once, and on these networks that moved golden-sample probabilities by up to 0.13-0.28 (the card's
``int8.gate``). Here the int8 file it wrote (QDQ format) is rebuilt as a PyTorch graph that computes
exactly what the int8 file computes, up to float rounding:

- every QuantizeLinear/DequantizeLinear pair on an activation is a fake quantizer at its calibrated
  scale and zero point (round half to even, clamp to uint8), with a straight-through gradient;
- every quantized weight is a learnable fp32 tensor (started from the fp32 model's), quantized on the
  fly per output channel with the same symmetric range ONNX Runtime uses (scale = max|w| / qmax);
- every int32 bias is a learnable fp32 tensor quantized at input scale x weight scale.

The weights are then tuned for a few hundred steps so that the int8 graph's logits and last feature
maps (the heat-map's source) match the fp32 model's on train images: KL divergence of the class
probabilities plus the feature maps' squared error relative to their mean square. The activation
ranges stay as calibrated. The tuned weights are written back into the int8 file as its integers and
scales; nothing else in the file changes. The fp32 model is the teacher and stays as it is, so the
accuracy gate (``quantize.gate``) compares the tuned copy with the same fp32 file as before.

A GPU makes the steps cheap (``python -m oncolens.training.qat BUNDLE --device cuda``): ``oncolens
quantize --qat-export DIR`` writes a bundle (the calibrated int8 file, the fp32 graph with its weights
stored in fp16 to travel, the chosen train images' model pixels) that this module tunes with nothing
but numpy, onnx and torch, and ``oncolens quantize --qat-tuned DIR`` gates the tuned copy on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

_UINT8 = (0, 255)


class QatError(ValueError):
    """The int8 file holds something this rebuild does not know how to run."""


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear to uint8, with a straight-through gradient inside the range."""
    q = torch.clamp(_round_ste(x / scale) + zero_point, *_UINT8)
    return (q - zero_point) * scale


_INT32_RANGE = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)


@dataclass
class _Bias:
    """An int32 bias: its learnable index, initializer names, and the scale of the activation it is added to."""

    index: int
    quantized: str
    scale: str
    initial_scale: np.ndarray
    weight: str = ""  # the weight tensor (DQ output) of the node that adds it
    input_scale: float = 0.0  # its scale is input scale x weight scale


@dataclass
class _Weight:
    """A quantized weight: its learnable index, quantization axis, integer range and ONNX Runtime's scales."""

    index: int
    axis: int
    quantized: str  # initializer names in the int8 file
    scale: str
    initial_scale: np.ndarray
    qmax: int = 0
    biases: list[_Bias] = field(default_factory=list)  # beside it in each node using it: may widen its scale


def _slice(x: torch.Tensor, args: list[torch.Tensor | None]) -> torch.Tensor:
    """ONNX Slice (opset 10+): starts, ends, optional axes and steps, negative steps included."""
    starts, ends = (a.tolist() for a in args[:2] if a is not None)
    axes = args[2].tolist() if len(args) > 2 and args[2] is not None else list(range(len(starts)))
    steps = args[3].tolist() if len(args) > 3 and args[3] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = x.shape[axis]
        keep = list(range(size))[slice(max(min(start, size), -size - 1), max(min(end, size), -size - 1), step)]
        x = x.index_select(axis, torch.tensor(keep, dtype=torch.long, device=x.device))
    return x


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _per_channel(values: torch.Tensor, axis: int) -> torch.Tensor:
    dims = [d for d in range(values.dim()) if d != axis]
    shape = [1] * values.dim()
    shape[axis] = -1
    return values.abs().amax(dim=dims).reshape(shape) if dims else values.abs()


class QdqGraph(torch.nn.Module):
    """The int8 QDQ graph as a differentiable PyTorch module (see the module docstring)."""

    def __init__(self, qdq: onnx.ModelProto, fp32: onnx.ModelProto | None) -> None:
        """``fp32``: the model each weight starts from (its tensor of the same values); ``None`` starts every
        weight from the int8 file's own integers (the graph then computes what the file computes: a warm start
        from a tuned copy)."""
        super().__init__()
        inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
        originals = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer} if fp32 is not None else {}
        self.params = torch.nn.ParameterList()
        self.weights: dict[str, _Weight] = {}  # DQ output name -> weight
        self.biases: dict[str, _Bias] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.steps: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        consumers: dict[str, onnx.NodeProto] = {}
        for node in qdq.graph.node:
            for name in node.input:
                consumers[name] = node

        # a weight used by several nodes (the views of a multi-view graph) is quantized once per node, each copy
        # under a new name ("W" and "W0", its bias likewise): such a copy starts from the fp32 tensor of its shape
        # that its integers reproduce (to 0.1% of the largest value)
        def original_of(name: str, data: np.ndarray, scale: np.ndarray, axis: int) -> str | None:
            base = name.removesuffix("_quantized")
            if base in originals:
                return base
            values = self._dequantized(data, scale, axis)
            errors = {
                candidate: float(np.max(np.abs(original - values)) / max(float(np.max(np.abs(original))), 1e-12))
                for candidate, original in originals.items()
                if original.shape == data.shape
            }
            best = min(errors, key=errors.__getitem__, default=None)
            return best if best is not None and errors[best] <= 1e-3 else None

        for node in qdq.graph.node:
            attrs = _attrs(node)
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                data = inits[node.input[0]]
                scale = inits[node.input[1]]
                base = original_of(node.input[0], data, scale, int(attrs.get("axis", 1))) or ""
                start = originals.get(base)
                if start is None:  # not in the fp32 file under the same name: start from the integers
                    start = self._dequantized(data, scale, int(attrs.get("axis", 1)))
                self.params.append(torch.nn.Parameter(torch.tensor(np.asarray(start, dtype=np.float32))))
                if data.dtype == np.int8:
                    self.weights[node.output[0]] = _Weight(
                        len(self.params) - 1, int(attrs.get("axis", 1)), node.input[0], node.input[1], scale
                    )
                elif data.dtype == np.int32:
                    self.biases[node.output[0]] = _Bias(len(self.params) - 1, node.input[0], node.input[1], scale)
                else:
                    raise QatError(f"a {data.dtype} initializer behind {node.output[0]!r} is not a weight or a bias")
                continue
            if node.op_type == "Constant":
                self.constants[node.output[0]] = torch.tensor(numpy_helper.to_array(attrs["value"]))
                continue
            self.steps.append((node.op_type, list(node.input), list(node.output), attrs))
        for name, bias in self.biases.items():
            user = consumers.get(name)
            if user is None or user.op_type not in ("Conv", "Gemm") or user.input[1] not in self.weights:
                raise QatError(f"the bias {name!r} is not beside a quantized weight")
            bias.weight = user.input[1]
            weight = self.weights[bias.weight]
            weight.biases.append(bias)
            ratio = np.asarray(bias.initial_scale, np.float64).reshape(-1) / np.asarray(weight.initial_scale).reshape(
                -1
            )
            bias.input_scale = float(np.median(ratio))
        for name, value in inits.items():
            if value.dtype in (np.float32, np.int64, np.uint8, np.int8) and name not in self.constants:
                self.constants[name] = torch.tensor(value)
        self.outputs = [o.name for o in qdq.graph.output]
        self.input = qdq.graph.input[0].name
        for weight in self.weights.values():
            weight.qmax = self._integer_range(weight)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QdqGraph:
        """``.to(device)`` moves the constants (a plain dict) along with the parameters."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self.constants = {name: fn(value) for name, value in self.constants.items()}
        return self

    def _integer_range(self, weight: _Weight) -> int:
        """ONNX Runtime's symmetric range (64 for 7-bit, 127 for 8-bit): max|w| / scale where the scale was not
        widened for the bias."""
        values = self.params[weight.index].detach()
        absmax = _per_channel(values, weight.axis).reshape(-1).cpu().numpy()
        scale = np.asarray(weight.initial_scale, np.float64).reshape(-1)
        ratios = absmax[scale > 0] / scale[scale > 0]
        # the median channel: a channel of near-zero weights carries little precision (in fp16 least of all)
        qmax = round(float(np.median(ratios))) if ratios.size else 0
        if qmax not in (64, 127):
            raise QatError(f"{weight.quantized!r}: weight range ±{qmax} is not int8 7- or 8-bit symmetric")
        return qmax

    @staticmethod
    def _dequantized(data: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
        shape = [1] * data.ndim
        if np.ndim(scale):
            shape[axis] = -1
        out: np.ndarray = data.astype(np.float32) * np.reshape(scale, shape)
        return out

    def weight_scale(self, weight: _Weight) -> torch.Tensor:
        """ONNX Runtime's per-channel scale: max|w| / qmax (1 for an all-zero channel), widened where the bias
        would overflow int32."""
        values = self.params[weight.index].detach()
        absmax = _per_channel(values, weight.axis)
        scale = torch.where(absmax > 0, absmax / weight.qmax, torch.ones_like(absmax))  # an all-zero channel: 1
        for bias in weight.biases:
            if bias.input_scale > 0:
                values = self.params[bias.index].detach().abs().reshape(scale.shape)
                scale = torch.maximum(scale, 1.0001 * 2.0 * values / _INT32_RANGE / bias.input_scale)
        return scale

    def quantized_weight(self, weight: _Weight) -> torch.Tensor:
        values = self.params[weight.index]
        scale = self.weight_scale(weight)
        return torch.clamp(_round_ste(values / scale), -weight.qmax, weight.qmax) * scale

    def bias_scale(self, bias: _Bias) -> torch.Tensor:
        return bias.input_scale * self.weight_scale(self.weights[bias.weight]).reshape(-1)

    def quantized_bias(self, bias: _Bias) -> torch.Tensor:
        scale = self.bias_scale(bias)
        return _round_ste(self.params[bias.index] / scale) * scale

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {self.input: image}
        for name, weight in self.weights.items():
            values[name] = self.quantized_weight(weight)
        for name, bias in self.biases.items():
            values[name] = self.quantized_bias(bias)

        def get(name: str) -> torch.Tensor:
            return values[name] if name in values else self.constants[name]

        for op, inputs, outputs, attrs in self.steps:
            values[outputs[0]] = self._run(op, [get(n) if n else None for n in inputs], attrs)
        return {name: values[name] for name in self.outputs}

    @staticmethod
    def _run(op: str, args: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
        x = args[0]
        assert x is not None
        if op == "QuantizeLinear":
            scale, zero = args[1], args[2]
            assert scale is not None and zero is not None
            return torch.clamp(_round_ste(x / scale) + zero.float(), *_UINT8)
        if op == "DequantizeLinear":
            scale, zero = args[1], args[2]
            assert scale is not None and zero is not None
            return (x - zero.float()) * scale
        if op == "Conv":
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            if pads[:2] != pads[2:]:
                x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
                pads = [0, 0, 0, 0]
            return F.conv2d(
                x,
                args[1],  # type: ignore[arg-type]
                args[2] if len(args) > 2 else None,
                stride=tuple(attrs.get("strides", [1, 1])),
                padding=tuple(pads[:2]),
                dilation=tuple(attrs.get("dilations", [1, 1])),
                groups=int(attrs.get("group", 1)),
            )
        if op == "Add":
            assert args[1] is not None
            return x + args[1]
        if op == "ReduceMean":
            axes = attrs.get("axes")
            if axes is None and len(args) > 1 and args[1] is not None:
                axes = [int(a) for a in args[1].tolist()]
            return x.mean(dim=tuple(axes) if axes else None, keepdim=bool(attrs.get("keepdims", 1)))
        if op == "Gemm":
            a = x.t() if attrs.get("transA", 0) else x
            b = args[1]
            assert b is not None
            b = b.t() if attrs.get("transB", 0) else b
            out = float(attrs.get("alpha", 1.0)) * (a @ b)
            if len(args) > 2 and args[2] is not None:
                out = out + float(attrs.get("beta", 1.0)) * args[2]
            return out
        if op == "Clip":
            low = args[1] if len(args) > 1 else None
            high = args[2] if len(args) > 2 else None
            return torch.clamp(x, None if low is None else float(low), None if high is None else float(high))
        if op == "Relu":
            return torch.relu(x)
        if op == "Identity":
            return x
        if op == "Unsqueeze":
            axes = attrs.get("axes") or [int(a) for a in args[1].tolist()]  # type: ignore[union-attr]
            for axis in sorted(a % (x.dim() + len(axes)) for a in axes):
                x = x.unsqueeze(axis)
            return x
        if op == "Concat":
            return torch.cat([a for a in args if a is not None], dim=int(attrs["axis"]))
        if op == "Slice":
            return _slice(x, args[1:])
        if op == "Flatten":
            return torch.flatten(x, int(attrs.get("axis", 1)))
        raise QatError(f"the int8 file has a {op} node, which quantization-aware tuning cannot run")

    def write_back(self, qdq: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``qdq`` whose weight and bias integers and scales are the tuned ones."""
        new: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for weight in self.weights.values():
                scale = self.weight_scale(weight)
                values = torch.clamp(torch.round(self.params[weight.index] / scale), -weight.qmax, weight.qmax)
                new[weight.quantized] = values.cpu().numpy().astype(np.int8)
                new[weight.scale] = scale.reshape(-1).cpu().numpy().astype(np.float32)
            for bias in self.biases.values():
                scale = self.bias_scale(bias)
                values = torch.round(self.params[bias.index] / scale).clamp(-(2**31) + 1, 2**31 - 1)
                new[bias.quantized] = values.double().cpu().numpy().astype(np.int32)
                new[bias.scale] = scale.cpu().numpy().astype(np.float32)
        out = onnx.ModelProto()
        out.CopyFrom(qdq)
        for index, init in enumerate(out.graph.initializer):
            if init.name in new:
                old = numpy_helper.to_array(init)
                value = new[init.name].reshape(old.shape)
                out.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, init.name))
        return out


@dataclass
class QatResult:
    steps: int
    images: int
    seconds: float
    loss_first: float  # mean of the first tenth of the steps
    loss_last: float  # mean of the last tenth
    device: str = "cpu"  # where the steps ran (torch device)


Teacher = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
LR = 5e-5  # Adam, decayed to 0 on a cosine
FEATURE_WEIGHT = 1.0  # of the feature maps' relative error beside the KL


def onnx_teacher(fp32: Path | onnx.ModelProto) -> Teacher:
    """The fp32 file (or model) run by ONNX Runtime on the CPU: (logits, features) of a preprocessed batch."""
    import onnxruntime as ort

    source = str(fp32) if isinstance(fp32, Path) else fp32.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = session.run(["logits", "features"], {session.get_inputs()[0].name: batch})
        return torch.from_numpy(logits), torch.from_numpy(features)

    return run


def graph_teacher(fp32: onnx.ModelProto, device: torch.device) -> Teacher:
    """The fp32 file run as a PyTorch graph on ``device`` (no quantizers in it, so nothing is fake-quantized;
    no gradients): the teacher on a GPU, where ONNX Runtime's CPU session would be the bottleneck."""
    graph = QdqGraph(fp32, fp32)
    graph.requires_grad_(False)
    graph.to(device)

    def run(batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = graph(torch.from_numpy(batch).to(device))
        return out["logits"], out["features"]

    return run


def tune_graph(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto | None,
    teacher: Teacher,
    images: np.ndarray,
    steps: int,
    batch_size: int = 16,
    lr: float = LR,
    feature_weight: float = FEATURE_WEIGHT,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[onnx.ModelProto, QatResult]:
    """Tune the QDQ model ``qdq`` towards ``teacher`` on ``images`` ([N,3,S,S], preprocessed): the tuned model.

    Each step takes ``batch_size`` images at random, mirrored at random, and lowers KL(fp32 || int8)
    of the class probabilities plus ``feature_weight`` x the feature maps' squared error relative to
    their mean square (Adam, learning rate ``lr`` decayed to 0 on a cosine). The weights start from
    ``fp32``'s initializers of the same names, or from ``qdq``'s own integers where ``fp32`` is None.
    """
    if steps < 1:
        raise ValueError("quantization-aware tuning needs at least one step")
    if len(images) == 0:
        raise ValueError("quantization-aware tuning needs images")
    where = torch.device(device)
    graph = QdqGraph(qdq, fp32).to(where)
    optimiser = torch.optim.Adam(graph.params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + np.cos(np.pi * step / steps)))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    parts: list[tuple[float, float]] = []
    tenth = max(1, steps // 10)
    start = time.perf_counter()
    for step in range(steps):
        batch = images[rng.choice(len(images), size=min(batch_size, len(images)), replace=False)]
        flips = rng.random(len(batch)) < 0.5
        batch = np.where(flips[:, None, None, None], batch[..., ::-1], batch).astype(np.float32)
        logits_t, features_t = teacher(batch)
        out = graph(torch.from_numpy(batch).to(where))
        log_p = F.log_softmax(out["logits"], dim=1)
        target = F.softmax(logits_t.to(where), dim=1)
        kl = F.kl_div(log_p, target, reduction="batchmean")
        t = features_t.to(where)
        feature_error = F.mse_loss(out["features"], t) / t.pow(2).mean().clamp(min=1e-12)
        loss = kl + feature_weight * feature_error
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        parts.append((float(kl.detach()), float(feature_error.detach())))
        if (step + 1) % tenth == 0:
            kl_mean, feature_mean = np.mean(parts[-tenth:], axis=0)
            log(f"qat step {step + 1}/{steps}: KL {kl_mean:.5f}, relative feature error {feature_mean:.5f}")
    result = QatResult(
        steps=steps,
        images=len(images),
        seconds=round(time.perf_counter() - start, 1),
        loss_first=round(float(np.mean(losses[:tenth])), 6),
        loss_last=round(float(np.mean(losses[-tenth:])), 6),
        device=device,
    )
    return graph.to(torch.device("cpu")).write_back(qdq), result


def tune_int8(
    int8_file: Path,
    fp32_file: Path,
    images: np.ndarray,
    steps: int,
    batch_size: int = 16,
    log: Callable[[str], None] = print,
) -> QatResult:
    """Tune the int8 file's weights towards the fp32 file's answers on ``images`` (:func:`tune_graph`, on the
    CPU, with ONNX Runtime running the fp32 file as the teacher). The tuned file replaces ``int8_file``."""
    qdq = onnx.load(str(int8_file))
    teacher = onnx_teacher(fp32_file)
    tuned, result = tune_graph(qdq, onnx.load(str(fp32_file)), teacher, images, steps, batch_size, log=log)
    onnx.save(tuned, str(int8_file))
    return result


BUNDLE = "bundle.json"
BUNDLE_INT8 = "model.int8.onnx"
BUNDLE_TEACHER = "teacher.fp16.onnx"
BUNDLE_PIXELS = "pixels.npz"
BUNDLE_JPEG_QUALITY = 95
TUNED = "tuned.int8.onnx"
TUNED_RESULT = "tuned.json"


def _cast_initializers(model: onnx.ModelProto, source: type, target: type) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for index, init in enumerate(out.graph.initializer):
        value = numpy_helper.to_array(init)
        if value.dtype == source:
            out.graph.initializer[index].CopyFrom(numpy_helper.from_array(value.astype(target), init.name))
    return out


def fp16_weights(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``fp32`` with every float32 initializer stored as float16 (half the bytes, to travel)."""
    return _cast_initializers(fp32, np.float32, np.float16)


def fp32_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse of :func:`fp16_weights`: float16 initializers back to float32."""
    return _cast_initializers(model, np.float16, np.float32)


def bundle_images(bundle: Path) -> np.ndarray:
    """The bundle's images as model inputs [N,3,S,S]: its JPEG model pixels, decoded, through its table.

    The table is ``zoo.preprocess``'s and the look-up is ``preprocess.normalize``'s, repeated here because
    importing ``oncolens.zoo`` brings in the server's settings, which a bare GPU machine has no packages for.
    """
    from PIL import Image

    with np.load(bundle / BUNDLE_PIXELS) as data:
        jpeg, ends, table = data["jpeg"].tobytes(), data["ends"], data["table"]
    starts = [0, *ends[:-1].tolist()]
    pixels = np.stack(
        [np.asarray(Image.open(io.BytesIO(jpeg[a:b])).convert("RGB")) for a, b in zip(starts, ends, strict=True)]
    )
    out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[..., channel], out=out[:, channel])
    return out


def _quiet(_: str) -> None:
    pass


def tune_bundle(
    bundle: Path,
    device: str,
    steps: int = 0,
    seconds: float = 0.0,
    batch_size: int = 16,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> QatResult:
    """Tune a bundle's int8 file (``TUNED`` and ``TUNED_RESULT`` beside it), the fp16-stored fp32 graph as the
    teacher (run by ONNX Runtime on the CPU, as a PyTorch graph on ``device`` elsewhere). ``steps``, or as many
    as fit in ``seconds`` (timed on 5 trial steps of a copy).

    ``resume`` goes on from the bundle's tuned copy instead of the calibrated one: its weights start from the
    tuned integers (not from the fp32 values), the steps draw other batches (a seed per run), and the record
    adds up the runs (each run's own record under ``runs``). A run cut off by the end of a session is lost,
    but finished runs add up: several short runs can stand in for one long one.
    """
    fp32 = fp32_weights(onnx.load(str(bundle / BUNDLE_TEACHER)))
    previous: dict[str, Any] = {}
    start_from: onnx.ModelProto | None = fp32  # each weight starts from the fp32 value of its name
    if resume:
        if not (bundle / TUNED).is_file():
            raise QatError(f"nothing to resume in {bundle}: it has no {TUNED} yet")
        qdq = onnx.load(str(bundle / TUNED))
        previous = json.loads((bundle / TUNED_RESULT).read_text())
        start_from = None  # each weight starts from the tuned copy's integers
    else:
        qdq = onnx.load(str(bundle / BUNDLE_INT8))
    # each earlier run's own record: a record of one run is that run, a record of several lists them
    runs: list[dict[str, Any]] = list(previous.get("runs", [previous])) if previous else []
    images = bundle_images(bundle)
    where = torch.device(device)
    # on the CPU ONNX Runtime runs the teacher faster than the graph rebuilt in PyTorch (no autograd bookkeeping,
    # fused kernels); on a GPU the graph is the fast one
    teacher = onnx_teacher(fp32) if where.type == "cpu" else graph_teacher(fp32, where)
    if steps < 1:
        if seconds <= 0:
            raise ValueError("give the steps or the seconds to tune for")
        trial = 5
        tune_graph(qdq, start_from, teacher, images, 2, batch_size, device=device, log=_quiet)  # warm-up
        _, timing = tune_graph(qdq, start_from, teacher, images, trial, batch_size, device=device, log=_quiet)
        steps = max(1, int(seconds * trial / max(timing.seconds, 1e-3)))
        log(f"{bundle.name}: {timing.seconds / trial:.3f} s per step on {device}: {steps} steps")
    tuned, result = tune_graph(
        qdq, start_from, teacher, images, steps, batch_size, seed=len(runs), device=device, log=log
    )
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    runtime = "onnxruntime" if where.type == "cpu" else "torch"
    record: dict[str, Any] = {
        **asdict(result),
        "batch_size": batch_size,
        "lr": LR,
        "feature_weight": FEATURE_WEIGHT,
        "hardware": name,
        "teacher_runtime": runtime,
    }
    if runs:  # the whole tuning (steps and seconds added up, the first run's first loss), and each run's own
        runs.append(dict(record))
        record |= {
            "steps": sum(r["steps"] for r in runs),
            "seconds": round(sum(r["seconds"] for r in runs), 1),
            "loss_first": runs[0]["loss_first"],
            "runs": runs,
        }
    onnx.save(tuned, str(bundle / TUNED))
    (bundle / TUNED_RESULT).write_text(json.dumps(record, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tune int8 bundles written by `oncolens quantize --qat-export`.")
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0, help="time per bundle, when --steps is not given")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resume", action="store_true", help="go on from the bundle's tuned copy")
    args = parser.parse_args(argv)
    # exact fp32 arithmetic on a GPU: TF32 would round the fake-quantized products that int8 reproduces
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for bundle in args.bundles:
        result = tune_bundle(bundle, args.device, args.steps, args.seconds, args.batch_size, resume=args.resume)
        loss = f"loss {result.loss_first} -> {result.loss_last}"
        print(f"{bundle.name}: {result.steps} steps in {result.seconds:.0f} s, {loss}")


if __name__ == "__main__":
    main()
