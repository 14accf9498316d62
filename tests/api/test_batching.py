"""The server's batcher: large requests run in slices of BATCH_MAX backbone passes, sessions share one arena,
and an idle server gives the arena's unused memory back."""

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.http.batching import IdleRelease, InferenceBatcher
from oncolens.http.metrics import ServerMetrics
from oncolens.runtime.memory import resident_bytes, return_large_allocations
from oncolens.services.analysis import DirectRunner
from oncolens.zoo import BUILTIN_DIR, ModelPackage

SAMPLES = Path(__file__).parents[2] / "samples"


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(BUILTIN_DIR / "skin-ham10000", threads=1)


def session_batch_sizes(package: ModelPackage, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images of each ONNX session run from here on (the session still runs)."""
    sizes: list[int] = []
    original = package.session.run

    def recording(names: list[str], feeds: dict[str, np.ndarray], *options: object) -> list[np.ndarray]:
        sizes.append(len(feeds["image"]))
        return original(names, feeds, *options)

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


def test_batch_max_counts_backbone_passes_so_a_four_view_model_runs_fewer_images_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(data_dir=tmp_path, preload_models=False, batch_max=8))
    with TestClient(app) as client:
        models = {name: app.state.zoo.get(name) for name in ("cervical-herlev", "skin-ham10000")}
        assert [len(m.card.input.test_time_views) for m in models.values()] == [4, 1]
        assert [m.images_per_run(8) for m in models.values()] == [2, 8]
        assert models["cervical-herlev"].images_per_run(3) == 1  # never less than one image
        sizes = {name: session_batch_sizes(model, monkeypatch) for name, model in models.items()}
        for name in models:
            image = sorted((SAMPLES / name).glob("*.jpg"))[0]
            files = [("files", (f"{i}.jpg", image.read_bytes(), "image/jpeg")) for i in range(5)]
            response = client.post(f"/api/v1/models/{name}/predict", files=files)
            assert response.status_code == 200 and len(response.json()["images"]) == 5
    # cervical-herlev: 2 images x 4 flips = 8 passes a run; skin-ham10000: all 5 in one run
    assert sizes == {"cervical-herlev": [2, 2, 1], "skin-ham10000": [5]}


def resident_mb() -> float:
    rss = resident_bytes()
    assert rss is not None
    return rss / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_releasing_memory_unmaps_what_a_large_batch_grew_and_changes_no_answer(package: ModelPackage) -> None:
    return_large_allocations()  # as the server does: glibc maps large blocks apart, so freeing them shows
    images = np.random.default_rng(3).normal(size=(16, 3, 224, 224)).astype(np.float32)
    first, _ = package.run(images[:2], with_features=True)
    package.run(images, with_features=True)  # the shared arena grows to what 16 images need
    grown = resident_mb()
    package.release_memory()
    released = resident_mb()
    assert grown - released > 50, (grown, released)
    again, _ = package.run(images[:2], with_features=True)
    np.testing.assert_array_equal(again, first)


class Releases:
    """Counts ``release_memory`` calls on a package (the release still runs)."""

    def __init__(self, package: ModelPackage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = package.release_memory

        def counting() -> None:
            self.count += 1
            original()

        monkeypatch.setattr(package, "release_memory", counting)


def test_the_idle_server_releases_memory_once_after_a_batch_of_several_images(
    package: ModelPackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    releases = Releases(package, monkeypatch)
    one, three = (np.random.default_rng(4).normal(size=(n, 3, 224, 224)).astype(np.float32) for n in (1, 3))
    metrics = ServerMetrics()

    async def scenario() -> list[int]:
        counts = []
        with ThreadPoolExecutor(1) as executor:
            release = IdleRelease(idle_s=0.4)
            batcher = InferenceBatcher(package, executor, max_batch=16, wait_ms=0, metrics=metrics, release=release)
            try:
                await batcher.run(one)
                await asyncio.sleep(0.8)
                counts.append(releases.count)  # one image at a time never grows the arena: nothing to release
                await batcher.run(three)
                counts.append(releases.count)  # busy: not yet
                for _ in range(8):  # traffic every 0.1 s keeps it from falling due
                    await asyncio.sleep(0.1)
                    await batcher.run(one)
                counts.append(releases.count)
                await asyncio.sleep(1.0)
                counts.append(releases.count)  # idle for 0.4 s: released once, and only once
                logits, _ = await batcher.run(one)
                assert logits.shape == (1, len(package.class_ids))
            finally:
                await batcher.stop()
        return counts

    assert asyncio.run(scenario()) == [0, 0, 0, 1]
    assert metrics.memory_releases._value.get() == 1


def test_a_failed_release_is_logged_and_the_batcher_serves_on(
    package: ModelPackage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing() -> None:
        raise RuntimeError("arena says no")

    monkeypatch.setattr(package, "release_memory", failing)
    three = np.random.default_rng(5).normal(size=(3, 3, 224, 224)).astype(np.float32)

    async def scenario() -> np.ndarray:
        with ThreadPoolExecutor(1) as executor:
            batcher = InferenceBatcher(package, executor, max_batch=16, wait_ms=0, release=IdleRelease(idle_s=0.05))
            try:
                await batcher.run(three)
                await asyncio.sleep(0.3)
                logits, _ = await batcher.run(three)
                return logits
            finally:
                await batcher.stop()

    logits = asyncio.run(scenario())
    assert logits.shape == (3, len(package.class_ids))
    assert "releasing ONNX Runtime's unused memory failed" in caplog.text
    assert "arena says no" in caplog.text


def test_a_release_idle_time_of_zero_never_releases(package: ModelPackage) -> None:
    release = IdleRelease(idle_s=0)
    release.ran(16)
    assert release.due_in() is None
    assert release.release_if_idle(package) is False
