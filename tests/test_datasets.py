from pathlib import Path

import pytest

from oncolens.evaluation.datasets import ManifestError, drop_labels, encode_labels, read_manifest, select_split
from tests.conftest import make_dataset


def test_manifest_rows_keep_the_given_split_and_metadata(tmp_path: Path) -> None:
    root = make_dataset(tmp_path)
    samples = read_manifest(root)
    assert len(samples) == 32
    assert {s.split for s in samples} == {"train", "val", "test"}
    assert len(select_split(samples, "test")) == 10
    assert len(select_split(samples, "all")) == 32
    assert samples[0].file.is_file()
    assert samples[0].metadata == {"site": "A"} and samples[1].metadata == {"site": "B"}


def test_drop_labels_leaves_out_the_named_labels_and_counts_them(tmp_path: Path) -> None:
    samples = read_manifest(make_dataset(tmp_path))
    kept, dropped = drop_labels(samples, ["rare", "not-there"])
    assert dropped == 2 and len(kept) == 30
    assert "rare" not in {s.label for s in kept}


def test_manifest_without_split_column_reads_as_all(tmp_path: Path) -> None:
    samples = read_manifest(make_dataset(tmp_path, with_split=False))
    assert {s.split for s in samples} == {"all"}
    with pytest.raises(ManifestError, match="no rows in split 'test'"):
        select_split(samples, "test")


def test_missing_manifest_and_missing_columns_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"needs a manifest\.csv"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,diagnosis\na.png,x\n")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['file', 'label'\]"):
        read_manifest(tmp_path)


def test_any_split_name_is_read_and_selected_by_name(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("file,label,split\na.png,x,train\nb.png,y,holdout\nc.png,x,holdout\n")
    samples = read_manifest(tmp_path)
    assert [s.file.name for s in select_split(samples, "holdout")] == ["b.png", "c.png"]
    assert len(select_split(samples, "all")) == 3
    with pytest.raises(ManifestError, match=r"no rows in split 'test'; the manifest has \['holdout', 'train'\]"):
        select_split(samples, "test")


@pytest.mark.parametrize("bad", ["all", "has space", "", "../x"])
def test_bad_split_value_names_the_line(tmp_path: Path, bad: str) -> None:
    (tmp_path / "manifest.csv").write_text(f"file,label,split\na.png,x,train\nb.png,y,{bad}\n")
    with pytest.raises(ManifestError, match=r"manifest.csv:3: split '.*' is not a split name"):
        read_manifest(tmp_path)


def test_unknown_labels_are_an_error_naming_them(tmp_path: Path) -> None:
    samples = read_manifest(make_dataset(tmp_path))
    with pytest.raises(ManifestError, match=r"labels not known to the model: \['cancer'\]"):
        encode_labels(samples, ["benign_a", "benign_b", "rare"])
