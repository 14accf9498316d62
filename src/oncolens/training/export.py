"""ONNX export of a trained classifier, with test-time flips and rotations folded into the graph."""

from __future__ import annotations

import base64
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from oncolens.training.backbones import Classifier


def _rot90(x: torch.Tensor) -> torch.Tensor:
    """torch.rot90(x, 1, (2, 3)) in ops ONNX has (aten::rot90 does not export)."""
    return x.flip(3).transpose(2, 3)


def _rot270(x: torch.Tensor) -> torch.Tensor:
    """torch.rot90(x, -1, (2, 3))."""
    return x.transpose(2, 3).flip(3)


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(2, 3)


def _antitranspose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(2, 3).flip(2, 3)


ViewFn = Callable[[torch.Tensor], torch.Tensor]

# Each test-time view of an [N, C, H, W] tensor and its inverse: the symmetries of the square (the
# dihedral group D4). Rotations and transposes need a square input, which every model has.
VIEWS: dict[str, tuple[ViewFn, ViewFn]] = {
    "identity": (lambda x: x, lambda x: x),
    "hflip": (lambda x: x.flip(3), lambda x: x.flip(3)),
    "vflip": (lambda x: x.flip(2), lambda x: x.flip(2)),
    "rot180": (lambda x: x.flip(2, 3), lambda x: x.flip(2, 3)),
    "rot90": (_rot90, _rot270),
    "rot270": (_rot270, _rot90),
    "transpose": (_transpose, _transpose),
    "antitranspose": (_antitranspose, _antitranspose),
}
TTA_VIEWS = tuple(VIEWS)


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """``views`` as a tuple, or a ValueError naming the unknown ones."""
    unknown = sorted(set(views) - set(VIEWS))
    if unknown or not views:
        raise ValueError(f"unknown test-time views {unknown}; choose from {list(TTA_VIEWS)}")
    return tuple(views)


def view_offset_sign(view: str) -> tuple[int, int]:
    """Where a feature cell's up-left offset (-1, -1) in the view's frame lands in the image's frame."""
    probe = torch.zeros(1, 1, 3, 3)
    probe[0, 0, 0, 0] = 1.0
    back = VIEWS[view][1](probe)[0, 0]
    y, x = divmod(int(back.argmax()), 3)
    return y - 1, x - 1


class ExportModel(nn.Module):
    """image [N,3,H,W] -> (logits [N,C], features [N,K,h,w]) averaged over test-time views.

    Each view's feature map is mapped back (flipped or rotated) before averaging, so ``features``
    stays aligned with the input and logits == head(mean over h,w of features): the
    class-activation map from ``features`` and the head weights is exact.
    """

    def __init__(self, classifier: Classifier, views: Sequence[str] = ("identity",)) -> None:
        super().__init__()
        self.backbone = classifier.backbone
        self.head = classifier.head
        self.views = check_views(views)

    def feature_offset(self, image_size: int) -> tuple[float, float]:
        """(dy, dx) in input pixels from the evenly spaced grid to the centres of the feature cells.

        Each stride-2 layer with symmetric padding centres output i on input index 2i, so a cell of
        an untransformed view is centred (stride/2 - 0.5) px up-left of its grid point; a flipped or
        rotated view moves that offset with it, and the views' maps are averaged, so are their
        offsets. (Measured on the trained 192 px model with |d feature / d input| this came out at
        -16.0 / -18.2 px against -15.5 predicted; the gradient estimate is too noisy to ship, the
        geometry is exact.)
        """
        with torch.no_grad():
            cells = int(self.eval()(torch.zeros(1, 3, image_size, image_size))[1].shape[-1])
        shift = image_size / cells / 2 - 0.5
        signs = [view_offset_sign(view) for view in self.views]
        dy = sum(sy for sy, _ in signs) * shift / len(signs)
        dx = sum(sx for _, sx in signs) * shift / len(signs)
        return float(dy), float(dx)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = []
        for view in self.views:
            forward, inverse = VIEWS[view]
            maps.append(inverse(self.backbone(forward(image))))
        features = maps[0] if len(maps) == 1 else torch.stack(maps).mean(dim=0)
        return self.head(features.mean(dim=(2, 3))), features


def export_onnx(model: ExportModel, path: Path, image_size: int) -> None:
    """Write ``model`` as ONNX: input ``image``, outputs ``logits`` and ``features``, dynamic batch."""
    model = model.eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    dummy = torch.zeros(2, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["logits", "features"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def head_to_card(head: nn.Linear) -> dict[str, Any]:
    """The linear head as base64 little-endian float32 (exact, compact), for the class-activation map."""
    weight = head.weight.detach().float().numpy().astype("<f4")
    bias = head.bias.detach().float().numpy().astype("<f4")
    return {
        "weight_shape": list(weight.shape),
        "weight_f32_b64": base64.b64encode(weight.tobytes()).decode("ascii"),
        "bias_f32_b64": base64.b64encode(bias.tobytes()).decode("ascii"),
    }


@torch.no_grad()
def max_logit_difference(model: ExportModel, onnx_logits: np.ndarray, inputs: np.ndarray) -> float:
    """Largest |logit| difference between PyTorch and ONNX Runtime on the same inputs [N,3,H,W]."""
    torch_logits = model.eval()(torch.from_numpy(inputs))[0].numpy()
    return float(np.abs(torch_logits - onnx_logits).max())


class OnnxWeightsError(ValueError):
    """An ONNX file whose weights do not fit the network they are loaded into."""


def _conv_bn_pairs(model: Classifier, size: int) -> list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]]:
    """Every convolution of the backbone with the BatchNorm that follows it, in the order they run."""
    order: list[torch.nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.backbone.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    pairs = []
    for conv, norm in zip(order[0::2], order[1::2], strict=False):
        if not isinstance(conv, torch.nn.Conv2d) or not isinstance(norm, torch.nn.BatchNorm2d):
            break
        pairs.append((conv, norm))
    if 2 * len(pairs) != len(order):
        raise OnnxWeightsError("the backbone does not run each convolution followed by its BatchNorm")
    return pairs


def load_onnx_weights(model: Classifier, onnx_path: Path, size: int) -> Classifier:
    """``model`` (the package's network, freshly built) with the weights of its exported ONNX file.

    The export folded each BatchNorm into its convolution; here the folded weight goes back into the
    convolution and the folded bias into a BatchNorm left at mean 0, variance 1 - eps and scale 1,
    so in eval mode the network computes what the file computes (to float rounding). Its BatchNorm
    statistics are not the trained ones: train it only in eval mode (weights move, statistics stay).
    """
    graph = onnx.load(str(onnx_path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # the export shares the views' weights through Constant and Identity nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            weights[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    folded: list[tuple[np.ndarray, np.ndarray]] = []
    for node in graph.node:  # every view's convolutions in the order they run
        if node.op_type == "Conv":
            if len(node.input) < 3 or node.input[1] not in weights or node.input[2] not in weights:
                raise OnnxWeightsError(f"{onnx_path}: convolution {node.name} has no stored weight and bias")
            folded.append((weights[node.input[1]], weights[node.input[2]]))
    pairs = _conv_bn_pairs(model, size)
    if not folded or len(folded) % len(pairs):
        raise OnnxWeightsError(
            f"{onnx_path} has {len(folded)} convolutions, not a multiple of the network's {len(pairs)}"
        )
    folded = folded[: len(pairs)]  # the first view's; the others run the same weights
    with torch.no_grad():
        for (conv, norm), (weight, bias) in zip(pairs, folded, strict=True):
            if tuple(conv.weight.shape) != weight.shape:
                raise OnnxWeightsError(f"{onnx_path}: weight {weight.shape} where the network has {conv.weight.shape}")
            conv.weight.copy_(torch.from_numpy(np.array(weight)))
            norm.weight.fill_(1.0)
            norm.bias.copy_(torch.from_numpy(np.array(bias)))
            norm.reset_running_stats()  # mean 0, variance 1
            norm.running_var.fill_(1.0 - norm.eps)  # type: ignore[union-attr]
        for name in ("head.weight", "head.bias"):
            if name not in weights:
                raise OnnxWeightsError(f"{onnx_path} has no {name}")
        model.head.weight.copy_(torch.from_numpy(np.array(weights["head.weight"])))
        model.head.bias.copy_(torch.from_numpy(np.array(weights["head.bias"])))
    return model.eval()
