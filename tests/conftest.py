"""Shared fixtures: generated datasets, a tiny recipe, and a tiny model package trained in-test."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_CLASSES = ("benign_a", "benign_b", "cancer")

TINY_RECIPE = """
[model]
title = "Tiny test model"
version = "0.0.1"
modality = "synthetic"
organ = "none"

[dataset]
name = "tiny"
license = "generated in the test"

[[classes]]
id = "benign_a"
name = "Benign A"
malignant = false

[[classes]]
id = "benign_b"
name = "Benign B"
malignant = false

[[classes]]
id = "cancer"
name = "Cancer"
description = "A red blob."
malignant = true

[train]
backbone = "efficientnet-lite0"
image_size = 64
epochs = 1
batch_size = 8
freeze_blocks = 3
seed = 0

[export]
tta = ["identity", "hflip"]
"""


def make_dataset(root: Path, per_class: int = 10, with_split: bool = True) -> Path:
    """A 3-class dataset of small coloured images: class k has a blob in channel k."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, label in enumerate(TINY_CLASSES):
        for i in range(per_class):
            pixels = rng.integers(0, 80, (48, 64, 3), dtype=np.uint8)
            y, x = rng.integers(8, 36), rng.integers(8, 48)
            pixels[y : y + 12, x : x + 12, k] = 230
            name = f"images/{label}_{i}.png"
            Image.fromarray(pixels).save(root / name)
            split = ("train", "train", "train", "train", "train", "val", "val", "test", "test", "test")[i % 10]
            rows.append({"file": name, "label": label, "group_id": f"{label}{i}", "split": split})
    fields = ["file", "label", "group_id"] + (["split"] if with_split else [])
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny-dataset"))


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path, tiny_recipe: Path) -> Path:
    """A real package: 1 epoch (2 steps) of training on the tiny dataset, then the full finalize."""
    pytest.importorskip("torch")
    from oncolens.datasets import read_manifest
    from oncolens.training.pipeline import finalize
    from oncolens.training.recipe import load_recipe
    from oncolens.training.train import fit

    recipe = load_recipe(tiny_recipe)
    samples = read_manifest(tiny_dataset)
    work = tmp_path_factory.mktemp("tiny-run")
    fit(recipe, samples, work / "run", "pytest")
    zoo = work / "zoo"
    return finalize(recipe, samples, work / "run", zoo / "tiny", "tiny")
