"""Prometheus /metrics: counts follow the requests that were made, by route template, model and risk."""

import time
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.runtime.memory import resident_bytes

SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_inference_and_images_by_risk(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, preload_models=False)
    images = sorted(SAMPLES.glob("*.jpg"))[:3]
    with TestClient(create_app(settings)) as client:
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
        result = client.post("/api/v1/models/skin-ham10000/predict", files=files).json()
        client.post("/api/v1/models/skin-ham10000/predict", files={"file": ("x.txt", b"not an image")})
        client.get("/api/v1/cases/abc123")
        client.get("/no/such/path")
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    found = samples_of(response.text)
    predict = "/api/v1/models/{model_id}/predict"
    assert found[("oncolens_http_requests_total", (("method", "POST"), ("route", predict), ("status", "200")))] == 1
    assert found[("oncolens_http_requests_total", (("method", "POST"), ("route", predict), ("status", "415")))] == 1
    cases = "/api/v1/cases/{case_id}"
    assert found[("oncolens_http_requests_total", (("method", "GET"), ("route", cases), ("status", "401")))] == 1
    assert found[("oncolens_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    # one inference (three images batched in one request); the failed upload never reached the model
    assert found[("oncolens_inference_duration_seconds_count", (("model", "skin-ham10000"),))] == 1
    risks: dict[str, int] = {}
    for image in result["images"]:
        risks[image["risk_level"]] = risks.get(image["risk_level"], 0) + 1
    for level, count in risks.items():
        key = ("oncolens_images_analysed_total", (("model", "skin-ham10000"), ("risk_level", level)))
        assert found[key] == count
    assert sum(v for (name, _), v in found.items() if name == "oncolens_images_analysed_total") == 3


def test_an_idle_server_gives_back_the_memory_a_case_of_several_images_grew(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, preload_models=False, release_memory_idle_s=0.3)
    images = sorted(SAMPLES.glob("*.jpg"))[:3]
    released = "oncolens_memory_releases_total", ()
    with TestClient(create_app(settings)) as client:
        one = {"file": (images[0].name, images[0].read_bytes(), "image/jpeg")}
        assert client.post("/api/v1/models/skin-ham10000/predict", files=one).status_code == 200
        time.sleep(0.8)
        after_one = samples_of(client.get("/metrics").text)[released]
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
        first = client.post("/api/v1/models/skin-ham10000/predict", files=files).json()
        time.sleep(0.8)
        after_three = samples_of(client.get("/metrics").text)[released]
        again = client.post("/api/v1/models/skin-ham10000/predict", files=files).json()
    assert (after_one, after_three) == (0, 1)
    assert [i["probabilities"] for i in again["images"]] == [i["probabilities"] for i in first["images"]]


def test_metrics_give_the_servers_resident_memory(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path, preload_models=False))) as client:
        scraped = samples_of(client.get("/metrics").text)[("oncolens_resident_memory_bytes", ())]
        now = resident_bytes()
    assert now is not None and scraped > 30 * 2**20
    assert abs(scraped - now) < 64 * 2**20  # read at the scrape (the app runs in this process)
