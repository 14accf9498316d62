"""Fitting a package's out-of-domain model: which images of the other datasets teach it, which measure it."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import oncolens.training.domain_fit as domain_fit
from oncolens.evaluation.datasets import read_manifest, select_split
from oncolens.zoo.package import ModelPackage
from tests.conftest import make_dataset


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another domain: images like the tiny dataset's, their colours inverted."""
    root = make_dataset(tmp_path_factory.mktemp("other") / "other-organ")
    for path in (root / "images").iterdir():
        pixels = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(255 - pixels).save(path)
    return root


def test_the_detector_learns_from_the_other_train_and_val_splits_and_is_measured_on_their_test_split(
    tiny_package: Path, tiny_dataset: Path, other_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[tuple[set[str], bool]] = []
    real_extract = domain_fit.extract

    def spy(package: ModelPackage, files: object, batch: int = 32, check: bool = False) -> domain_fit.Extracted:
        chosen = list(files)  # type: ignore[call-overload]
        read.append(({str(p) for p in chosen}, check))
        return real_extract(package, chosen, batch, check)

    monkeypatch.setattr(domain_fit, "extract", spy)
    package = ModelPackage.load(tiny_package, precision="fp32")
    fit = domain_fit.fit_domain(package, read_manifest(tiny_dataset), [other_dataset], log=lambda *_: None)

    other_rows = read_manifest(other_dataset)
    by_split = {split: {str(s.file) for s in select_split(other_rows, split)} for split in ("train", "val", "test")}
    other_reads = [files for files, _ in read if files & set().union(*by_split.values())]
    learnt, measured = other_reads  # the detector's images first, then the test split, once
    assert learnt == by_split["train"] | by_split["val"], "every train and val image of the other dataset"
    assert measured == by_split["test"], "its test split is read only to measure"
    assert not learnt & by_split["test"]

    section = fit.card_section
    assert "train and val images of other-organ" in section["method"]
    assert section["fitted_on"]["other_train"] == len(learnt)
    flagged = section["flagged"]["other_datasets_test"]["other-organ"]
    assert flagged["n"] == len(by_split["test"]) and 0.0 <= flagged["flagged"] <= 1.0
