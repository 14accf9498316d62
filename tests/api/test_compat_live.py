"""The apps' documented curl and Python-client examples, replayed over real HTTP against a live server."""

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from oncolens.config import Settings
from tests.live import PASSWORD, live_server

SAMPLES = Path(__file__).parents[2] / "samples"
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("compat-live"))
    with live_server(settings, {"doc@clinic.org": "clinician"}) as (url, _):
        yield url


def curl(*args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["curl", "-s", "-S", *args], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_skin9_readme_curl(server: str) -> None:
    image = SAMPLES / "skin-isic9" / "ISIC_0000004.jpg"
    body = curl("-X", "POST", "-F", f"file=@{image}", f"{server}/predict")
    assert body["success"] is True
    assert set(body["prediction"]) == {"class_name", "is_cancerous", "confidence", "all_predictions"}
    assert curl(f"{server}/health") == {"status": "healthy", "model_loaded": True}


def test_cervical_readme_curl(server: str) -> None:
    image = SAMPLES / "cervical-herlev" / "149181904-149181927-001.jpg"
    # the root /predict imitates the skin app by default; the cervical app lives under its prefix
    body = curl("-X", "POST", "-F", f"file=@{image}", f"{server}/compat/cervical/predict")
    assert body["class_id"] in body["oncolens"]["probabilities"] and isinstance(body["is_abnormal"], bool)


def test_thyroid_python_client(server: str) -> None:
    def encode_image(image_path: Path) -> str:
        with open(image_path, "rb") as img_file:
            return base64.b64encode(img_file.read()).decode("utf-8")

    api_url = f"{server}/api/v1"
    image_base64 = encode_image(SAMPLES / "thyroid-us" / "ddti_10_1.jpg")
    response = httpx.post(
        f"{api_url}/predict", json={"image": image_base64, "filename": "thyroid_scan.jpg"}, timeout=60
    )
    result = response.json()
    assert result["prediction"]["label"].startswith("TI-RADS")
    assert 0 <= result["prediction"]["confidence_percentage"] <= 100
    assert result["risk_assessment"] in {"Low Risk", "Borderline", "Moderate", "High Risk"} and result["recommendation"]
    response = httpx.post(
        f"{api_url}/analyze",
        json={"image": image_base64, "filename": "thyroid_scan.jpg", "include_gradcam": True},
        timeout=60,
    )
    result = response.json()
    assert result["gradcam"] and base64.b64decode(result["gradcam"]["images"]["overlay"]).startswith(b"\x89PNG")
    assert curl(f"{api_url}/health")["status"] == "ok", "OncoLens keeps /api/v1/health unless COMPAT_ROOT=thyroid"
    assert curl(f"{server}/compat/thyroid/api/v1/health")["status"] == "healthy"


def test_oral_readme_curl(server: str) -> None:
    token = curl("-d", f"username=doc@clinic.org&password={PASSWORD}", f"{server}/api/v1/auth/token")["access_token"]
    cancer, benign = (
        SAMPLES / "oral-photo" / "mendeley_malignant_104.jpg",
        SAMPLES / "oral-photo" / "mendeley_benign_103.jpg",
    )
    body = curl(
        "-X", "POST", f"{server}/api/v1/result/results/",
        "-H", f"Authorization: Bearer {token}",
        "-F", "email=user@example.com", "-F", "name=John Doe", "-F", "age=45", "-F", "gender=Male",
        "-F", f"files=@{cancer}", "-F", f"files=@{benign}",
    )  # fmt: skip
    assert body["result"] in {"CANCER", "NON CANCER"} and isinstance(body["confidence"], float)
    assert len(body["images"]) == 2
    unauthorised = curl("-X", "POST", f"{server}/api/v1/result/results/", "-F", f"files=@{cancer}", "-F", "name=A")
    assert unauthorised["detail"] == "Not authenticated"
