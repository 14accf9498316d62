"""Batched image augmentation on uint8 tensors: flips, rotation, scale, shift, colour jitter and cast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oncolens.training.recipe import AugmentConfig
from oncolens.zoo.preprocess import InputSpec


def _standardize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> (x - mean) / std, the same arithmetic as preprocess.normalize."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def to_input(pixels: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32 normalized model input."""
    return _standardize(pixels.permute(0, 3, 1, 2).float() / 255.0, spec)


def augment(pixels: torch.Tensor, cfg: AugmentConfig, spec: InputSpec, gen: torch.Generator) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] normalized float32 with random geometry and colour."""
    n = pixels.shape[0]
    x = pixels.permute(0, 3, 1, 2).float() / 255.0

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (high - low) + low

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180.0
    zoom = uniform(cfg.scale_min, cfg.scale_max)
    flip_x = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)
    flip_y = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if cfg.vflip else torch.ones(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    theta[:, 0, 2] = uniform(-cfg.translate, cfg.translate) * 2
    theta[:, 1, 2] = uniform(-cfg.translate, cfg.translate) * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    view = (n, 1, 1, 1)
    x = x * uniform(1 - cfg.brightness, 1 + cfg.brightness).view(view)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(1 - cfg.contrast, 1 + cfg.contrast).view(view) + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    x = (x - gray) * uniform(1 - cfg.saturation, 1 + cfg.saturation).view(view) + gray
    if cfg.colour_cast > 0:  # drawn only when asked, so recipes without it keep their random stream
        gains = torch.rand(n, 3, 1, 1, generator=gen) * 2 * cfg.colour_cast + 1 - cfg.colour_cast
        x = x * gains
    return _standardize(x.clamp(0.0, 1.0), spec)
