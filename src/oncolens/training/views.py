"""Cached views: the frozen front of the network runs once per image and view, not once per step.

The first ``freeze_blocks`` blocks keep their ImageNet weights and BatchNorm statistics, so what they
make of an image never changes during training. A :class:`ViewCache` holds, for every image, that map
for ``K`` views (view 0 the image itself, the others randomly augmented, or the named test-time views
for evaluation) in float16; training then runs only the tail of the network, epoch after epoch, on
views drawn from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from oncolens.training.augment import augment, to_input
from oncolens.training.backbones import Classifier, frozen_front
from oncolens.training.export import VIEWS, check_views
from oncolens.training.recipe import Recipe


@dataclass
class ViewCache:
    """``maps`` [N, K, C, h, w] float16: the front's output for K views of N images."""

    maps: torch.Tensor
    names: tuple[str, ...] = ()

    @property
    def n_images(self) -> int:
        return int(self.maps.shape[0])

    @property
    def n_views(self) -> int:
        return int(self.maps.shape[1])

    def subset(self, index: np.ndarray) -> ViewCache:
        return ViewCache(self.maps[torch.from_numpy(index)], self.names)

    def nbytes(self) -> int:
        return self.maps.numel() * self.maps.element_size()


def _front_shape(model: Classifier, recipe: Recipe) -> tuple[int, ...]:
    size = recipe.input_spec.size
    with torch.no_grad():
        return tuple(model.backbone.front(torch.zeros(1, 3, size, size), recipe.train.freeze_blocks).shape[1:])


@torch.no_grad()
def _fill(
    model: Classifier,
    recipe: Recipe,
    n_images: int,
    n_views: int,
    make: object,
    desc: str,
    batch: int = 32,
    precision: str = "fp32",
) -> torch.Tensor:
    """Run ``make(start, stop, view) -> normalized input`` through the front for every view and batch."""
    model.eval()
    shape = _front_shape(model, recipe)
    maps = torch.empty((n_images, n_views, *shape), dtype=torch.float16)
    n_frozen = recipe.train.freeze_blocks
    with tqdm(total=n_images * n_views, desc=desc, unit="view") as bar:
        for view in range(n_views):
            for start in range(0, n_images, batch):
                stop = min(n_images, start + batch)
                x = make(start, stop, view)  # type: ignore[operator]
                maps[start:stop, view] = frozen_front(model, x, n_frozen, precision)
                bar.update(stop - start)
    return maps


def augmented_views(
    model: Classifier, pixels: np.ndarray, recipe: Recipe, n_views: int, gen: torch.Generator
) -> ViewCache:
    """View 0: each image as it is; views 1..K-1: the recipe's random augmentation, drawn from ``gen``.

    The front runs at the recipe's ``front_precision`` (these maps only feed training); the test-time
    views below, which evaluation and model choices read, are always computed in fp32.
    """
    source = torch.from_numpy(pixels)
    spec = recipe.input_spec

    def make(start: int, stop: int, view: int) -> torch.Tensor:
        chunk = source[start:stop]
        return to_input(chunk, spec) if view == 0 else augment(chunk, recipe.augment, spec, gen)

    desc, precision = f"caching {n_views} train views", recipe.train.front_precision
    return ViewCache(_fill(model, recipe, len(pixels), n_views, make, desc, precision=precision))


def test_time_views(model: Classifier, pixels: np.ndarray, recipe: Recipe, names: Sequence[str]) -> ViewCache:
    """The named test-time views (flips, rotations) of each image, as the exported model makes them."""
    chosen = check_views(names)
    source = torch.from_numpy(pixels)
    spec = recipe.input_spec

    def make(start: int, stop: int, view: int) -> torch.Tensor:
        return VIEWS[chosen[view]][0](to_input(source[start:stop], spec))

    return ViewCache(_fill(model, recipe, len(pixels), len(chosen), make, "caching test-time views"), chosen)


@torch.no_grad()
def view_logits(model: Classifier, cache: ViewCache, n_frozen: int, batch: int = 64) -> np.ndarray:
    """[N, K, C] logits of every cached view, in eval mode. The mean over K is what the exported
    model (which averages the views' feature maps before its linear head) outputs."""
    model.eval()
    out = []
    for start in range(0, cache.n_images, batch):
        chunk = cache.maps[start : start + batch]
        n, k = chunk.shape[:2]
        flat = chunk.reshape(n * k, *chunk.shape[2:]).float().contiguous(memory_format=torch.channels_last)
        out.append(model.tail_logits(flat, n_frozen).reshape(n, k, -1))
    logits: np.ndarray = torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, cache.n_views, 0))
    return logits


DEFAULT_CANDIDATES = (("identity", "hflip"),)


SINGLE = ("identity",)


def candidate_views(recipe: Recipe) -> list[tuple[str, ...]]:
    """The recipe's candidate test-time view sets (``[export] tta_candidates``, else ``[export] tta``).

    Where the recipe lists candidates, the image alone (one backbone pass) is always one of them:
    the cheapest answer is measured, never assumed to lose (skin-ham10000 1.3.0's candidates lacked
    it, and on val its one view scored above the four flips it served).
    """
    given = recipe.export.get("tta_candidates")
    if given:
        listed = [tuple(str(v) for v in c) for c in given]
        return listed if SINGLE in listed else [SINGLE, *listed]
    return [tuple(recipe.export.get("tta", DEFAULT_CANDIDATES[0]))]


def union_views(candidates: list[tuple[str, ...]]) -> tuple[str, ...]:
    seen: list[str] = []
    for views in candidates:
        seen += [v for v in views if v not in seen]
    return tuple(seen)


def mean_over(logits: np.ndarray, names: tuple[str, ...], chosen: tuple[str, ...]) -> np.ndarray:
    """[N, C] mean of the per-view logits [N, V, C] over the ``chosen`` views."""
    return np.asarray(logits[:, [names.index(v) for v in chosen]].mean(axis=1))


def choose_views(
    recipe: Recipe, val_logits: np.ndarray, names: tuple[str, ...], score: Callable[[np.ndarray], float]
) -> tuple[tuple[str, ...], dict[str, float]]:
    """The cheapest candidate view set whose val ``score`` (of its mean logits [N, C]) is within
    ``[export] tta_tolerance`` of the best candidate's."""
    candidates = candidate_views(recipe)
    tolerance = float(recipe.export.get("tta_tolerance", 0.005))
    scores = {"+".join(views): score(mean_over(val_logits, names, views)) for views in candidates}
    best = max(scores.values())
    ok = [views for views in candidates if scores["+".join(views)] >= best - tolerance]
    return min(ok, key=len), scores


@torch.no_grad()
def named_view_logits(
    model: Classifier, pixels: np.ndarray, recipe: Recipe, names: Sequence[str], batch: int = 64
) -> np.ndarray:
    """[N, K, C] logits of the named test-time views of each image through the whole network, in
    eval mode (no cache: for a model whose front was trained too)."""
    chosen = check_views(names)
    model.eval()
    source = torch.from_numpy(pixels)
    out = []
    for start in tqdm(range(0, len(pixels), batch), desc="test-time views", unit="batch"):
        x = to_input(source[start : start + batch], recipe.input_spec)
        per_view = [model(VIEWS[v][0](x).contiguous(memory_format=torch.channels_last))[0] for v in chosen]
        out.append(torch.stack(per_view, dim=1).float())
    logits: np.ndarray = torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(chosen), 0))
    return logits
