"""The server's batcher: large requests run in slices of BATCH_MAX images, sessions share one arena."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from oncolens.api.batching import InferenceBatcher
from oncolens.services.analysis import DirectRunner
from oncolens.zoo import BUILTIN_DIR, ModelPackage


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(BUILTIN_DIR / "skin-ham10000", threads=1)


def session_batch_sizes(package: ModelPackage, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images of each ONNX session run from here on (the session still runs)."""
    sizes: list[int] = []
    original = package.session.run

    def recording(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sizes.append(len(feeds["image"]))
        return original(names, feeds)

    monkeypatch.setattr(package.session, "run", recording)
    return sizes


def test_a_request_of_more_images_than_batch_max_runs_in_slices_with_the_same_answers(
    package: ModelPackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = np.random.default_rng(0).normal(size=(5, 3, 224, 224)).astype(np.float32)
    whole_logits, whole_features = package.run(images, with_features=True)
    sizes = session_batch_sizes(package, monkeypatch)

    async def through_the_batcher() -> tuple[np.ndarray, np.ndarray]:
        with ThreadPoolExecutor(1) as executor:
            batcher = InferenceBatcher(package, executor, max_batch=2, wait_ms=0)
            try:
                return await batcher.run(images)
            finally:
                await batcher.stop()

    logits, features = asyncio.run(through_the_batcher())
    assert sizes == [2, 2, 1]
    assert logits.shape == whole_logits.shape and features.shape == whole_features.shape  # type: ignore[union-attr]
    np.testing.assert_allclose(logits, whole_logits, atol=1e-4)
    np.testing.assert_allclose(features, whole_features, atol=1e-4)  # type: ignore[arg-type]


def test_every_session_takes_its_working_memory_from_the_one_shared_arena(package: ModelPackage) -> None:
    other = ModelPackage.load(BUILTIN_DIR / "breast-us", threads=1)
    for loaded in (package, other):
        options = loaded.session.get_session_options()
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
    # alternating between models on the shared arena changes no answer
    rng = np.random.default_rng(1)
    first, second = (rng.normal(size=(3, 3, 224, 224)).astype(np.float32) for _ in range(2))
    before = package.run(first)[0], other.run(second)[0]
    for _ in range(2):
        other.run(first[:1])
        package.run(second)
    np.testing.assert_array_equal(package.run(first)[0], before[0])
    np.testing.assert_array_equal(other.run(second)[0], before[1])


def test_the_cli_path_slices_a_case_by_batch_max_too(package: ModelPackage, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DirectRunner`` (``oncolens predict``) passes the same limit to ``ModelPackage.run``."""
    images = np.random.default_rng(2).normal(size=(3, 3, 224, 224)).astype(np.float32)
    whole = package.run(images)[0]
    sizes = session_batch_sizes(package, monkeypatch)
    logits, _ = asyncio.run(DirectRunner(package, max_batch=2).run(images))
    assert sizes == [2, 1]
    np.testing.assert_allclose(logits, whole, atol=1e-4)
