"""Processes that run ONNX Runtime keep NumPy's BLAS to one thread (oncolens.runtime.cpu)."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from oncolens.app import create_app
from oncolens.batch.local import run_batch
from oncolens.config import Settings
from oncolens.runtime.cpu import blas_threads, single_threaded_blas
from oncolens.zoo import ModelPackage


@pytest.fixture()
def two_blas_threads() -> Iterator[None]:
    """BLAS as NumPy starts it on a machine of two or more cores, restored afterwards."""
    if not blas_threads():
        pytest.skip("this NumPy loads no BLAS library threadpoolctl can see")
    with threadpool_limits(limits=2, user_api="blas"):
        if set(blas_threads()) != {2}:
            pytest.skip("BLAS does not run two threads on this machine")
        yield


def test_single_threaded_blas_limits_every_loaded_blas(two_blas_threads: None) -> None:
    assert single_threaded_blas() == [1] * len(blas_threads())
    a = np.ones((64, 1280))
    assert float((a @ a.T)[0, 0]) == 1280.0  # still computes, on one thread
    assert set(blas_threads()) == {1}


def test_the_server_app_runs_blas_on_one_thread(two_blas_threads: None, tmp_path: Path) -> None:
    create_app(Settings(data_dir=tmp_path / "data"))
    assert set(blas_threads()) == {1}


def test_a_local_batch_runs_blas_on_one_thread(two_blas_threads: None, blob_package: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    summary = run_batch(ModelPackage.load(blob_package), tmp_path / "in", tmp_path / "out.csv")
    assert summary.analysed == 0
    assert set(blas_threads()) == {1}
