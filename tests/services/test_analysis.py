"""The predict path's worker threads: how many decode at once, and that the event loop never decodes."""

import threading
import time
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient

import oncolens.config as config
import oncolens.services.analysis as analysis
from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.vision.prepare import PreparedImages, RawImage
from oncolens.zoo import ModelPackage

SAMPLE = Path(__file__).parents[2] / "samples" / "skin-ham10000" / "ISIC_0025316.jpg"


@pytest.mark.parametrize(("cores", "setting", "expected"), [(2, 0, 1), (8, 0, 7), (1, 0, 1), (2, 5, 5)])
def test_decode_threads_leave_a_core_to_the_event_loop_unless_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cores: int, setting: int, expected: int
) -> None:
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert Settings(data_dir=tmp_path, decode_threads=setting).resolved_decode_threads == expected


def test_prepare_off_loop_decodes_at_most_decode_threads_at_once_and_never_on_the_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lock = threading.Lock()
    running, most, threads = 0, 0, set()

    def slow_prepare(raw: list[RawImage], model: ModelPackage, settings: Settings) -> PreparedImages:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.get_ident())
        time.sleep(0.05)
        with lock:
            running -= 1
        return PreparedImages([], [None], None, 0.0, [])  # type: ignore[arg-type]

    monkeypatch.setattr(analysis, "prepare", slow_prepare)

    async def six_at_once(settings: Settings) -> int:
        loop_thread = threading.get_ident()
        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(analysis.prepare_off_loop, [RawImage(b"", None)], None, settings)  # type: ignore[arg-type]
        return loop_thread

    for limit in (1, 2, 3):
        running, most, threads = 0, 0, set()
        loop_thread = anyio.run(six_at_once, Settings(data_dir=tmp_path, decode_threads=limit))
        assert most == limit
        assert loop_thread not in threads


def test_a_model_loaded_on_first_use_answers_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    """With ``preload_models`` off the first request loads the package (on a worker thread)."""
    with TestClient(create_app(Settings(data_dir=tmp_path, preload_models=False))) as client:
        zoo = client.app.state.zoo  # type: ignore[attr-defined]
        assert zoo.loaded("skin-ham10000") is None
        files = {"file": ("lesion.jpg", SAMPLE.read_bytes(), "image/jpeg")}
        answer = client.post("/api/v1/models/skin-ham10000/predict", files=files)
        assert answer.status_code == 200
        assert answer.json()["model_id"] == "skin-ham10000"
        assert zoo.loaded("skin-ham10000") is not None
        assert zoo.loaded_ids() == ["skin-ham10000"]
        missing = client.post("/api/v1/models/lungs/predict", files=files)
        assert missing.status_code == 404
        assert "no model 'lungs'" in missing.json()["detail"]
