"""Shared fixtures: generated datasets, a tiny recipe, and a tiny model package trained in-test."""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Iterator
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
exclude_labels = ["rare"]
report_by = ["site"]

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
balance_by = "site"
seed = 0

[export]
tta = ["identity", "hflip"]
"""


def make_dataset(root: Path, per_class: int = 10, with_split: bool = True) -> Path:
    """A 3-class dataset of small coloured images: class k has a blob in channel k.

    Each row has a ``site`` (A or B) metadata column, and two extra rows (one train, one test) carry
    the label ``rare``, which the tiny recipe excludes.
    """
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
            site = "AB"[i % 2]
            rows.append({"file": name, "label": label, "group_id": f"{label}{i}", "split": split, "site": site})
    for i, split in enumerate(("train", "test")):
        name = f"images/rare_{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / name)
        rows.append({"file": name, "label": "rare", "group_id": f"rare{i}", "split": split, "site": "A"})
    fields = ["file", "label", "group_id", "site"] + (["split"] if with_split else [])
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
    from oncolens.evaluation.datasets import read_manifest
    from oncolens.training.pipeline import finalize
    from oncolens.training.recipe import load_recipe
    from oncolens.training.train import fit

    recipe = load_recipe(tiny_recipe)
    samples = read_manifest(tiny_dataset)
    work = tmp_path_factory.mktemp("tiny-run")
    fit(recipe, samples, work / "run", "pytest")
    zoo = work / "zoo"
    return finalize(recipe, samples, work / "run", zoo / "tiny", "tiny")


@pytest.fixture()
def package(tiny_package: Path, tmp_path: Path) -> Path:
    """A copy of the tiny package that a test may change (its card, an int8 copy beside it)."""
    import shutil

    copy = tmp_path / "zoo" / "tiny"
    shutil.copytree(tiny_package, copy)
    return copy


def write_package(directory: Path, module: object, classes: list[dict[str, object]], size: int) -> Path:
    """Export a torch module returning (logits, features) as a minimal, valid model package."""
    import base64
    import hashlib
    import json

    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,  # type: ignore[arg-type]
        (torch.zeros(1, 3, size, size),),
        str(directory / "model.onnx"),
        input_names=["image"],
        output_names=["logits", "features"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    head = module.head  # type: ignore[attr-defined]
    weight = head.weight.detach().numpy().astype("<f4")
    card = {
        "id": directory.name,
        "version": "0.0.1",
        "title": "test model",
        "modality": "synthetic",
        "organ": "none",
        "intended_use": "Tests only.",
        "limitations": ["Made in a test; it has seen no real image."],
        "disclaimer": "Decision support only, not a diagnosis.",
        "classes": classes,
        "input": {"size": size, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "resize": "squash"},
        "calibration": {"method": "none", "temperature": 1.0},
        "metrics": {},
        "dataset": {"name": "generated"},
        "risk_policy": {
            "levels": [
                {"level": "low", "min": 0.0, "recommendation": "routine"},
                {"level": "borderline", "min": 0.25, "recommendation": "follow up"},
                {"level": "moderate", "min": 0.5, "recommendation": "review"},
                {"level": "high", "min": 0.75, "recommendation": "refer"},
            ]
        },
        "aggregation": {"rule": "mean"},
        "head": {
            "weight_shape": list(weight.shape),
            "weight_f32_b64": base64.b64encode(weight.tobytes()).decode(),
            "bias_f32_b64": base64.b64encode(head.bias.detach().numpy().astype("<f4").tobytes()).decode(),
        },
        "sha256": hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest(),
    }
    (directory / "card.json").write_text(json.dumps(card))
    return directory


@pytest.fixture(scope="session")
def blob_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made model whose features are the red channel pooled 8x8: its CAM follows red blobs."""
    torch = pytest.importorskip("torch")

    class RedBlob(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 2)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
                self.head.bias.zero_()

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = torch.nn.functional.avg_pool2d(image[:, :1], 8).repeat(1, 4, 1, 1)
            return self.head(features.mean(dim=(2, 3))), features

    classes = [
        {"id": "blob", "name": "Red blob", "description": "", "malignant": True},
        {"id": "plain", "name": "Plain", "description": "", "malignant": False},
    ]
    root = tmp_path_factory.mktemp("blob-zoo")
    return write_package(root / "blob", RedBlob().eval(), classes, 64)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Each database test module runs on SQLite, and on PostgreSQL when ONCOLENS_TEST_DATABASE_URL is set.

    PostgreSQL gets a fresh schema per module (dropped afterwards), so runs never see old data.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'oncolens.db'}"
        return
    base = os.environ.get("ONCOLENS_TEST_DATABASE_URL")
    if not base:
        pytest.skip("ONCOLENS_TEST_DATABASE_URL is not set")
    from sqlalchemy import create_engine, text

    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
