"""Out-of-domain images and quality warnings through every edge: API, cases, web, PDF, FHIR, compat,
batch, CLI and metrics. Uses the committed samples: a cervical cell or an oral photo is not a skin
lesion, and the shipped skin models know it."""

import csv
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from oncolens.app import create_app
from oncolens.cli.main import app as cli
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login
from tests.web.test_pages import web_login

SAMPLES = Path(__file__).parents[2] / "samples"
SKIN = SAMPLES / "skin-ham10000" / "ISIC_0025316.jpg"
CELL = next((SAMPLES / "cervical-herlev").glob("*.jpg"))
MOUTH = next((SAMPLES / "oral-photo").glob("*.jpg"))
PREDICT = "/api/v1/models/skin-ham10000/predict"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("data"), f"sqlite:///{tmp_path_factory.mktemp('db')}/o.db")
    with TestClient(create_app(settings)) as test_client:
        add_user(test_client, "doc@clinic.org", "clinician")
        yield test_client


def files(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_an_image_of_another_kind_gets_no_risk_level(client: TestClient) -> None:
    body = client.post(PREDICT, files=files(CELL)).json()
    image = body["images"][0]
    assert image["domain"]["in_domain"] is False
    assert image["domain"]["score"] > image["domain"]["threshold"] > 0
    assert image["risk_level"] == body["risk_level"] == "indeterminate"
    assert body["is_malignant"] is False
    # A cervical cell is another kind of image: the advice is to choose the right model, not to retake it.
    assert image["domain"]["reason"] == "other_kind"
    assert image["recommendation"] == (
        "Indeterminate: this does not look like dermoscopy images of the skin, the kind this model reads, so it "
        "gives no class and no risk level. Choose the model for this kind of image."
    )
    assert image["statement"] == body["statement"] == image["recommendation"]
    assert "Most likely" not in body["statement"] and body["also_consider"] is None
    assert body["note"] == "all 1 image(s) are out of the model's domain"


def test_a_skin_lesion_is_in_domain_with_a_real_risk_level(client: TestClient) -> None:
    body = client.post(PREDICT, files=files(SKIN)).json()
    image = body["images"][0]
    assert image["domain"]["in_domain"] is True and image["domain"]["score"] <= image["domain"]["threshold"]
    assert body["risk_level"] in {"low", "borderline", "moderate", "high"}
    assert image["quality"] == [] and body["note"] == ""


def test_the_out_of_domain_image_is_left_out_of_the_case_result(client: TestClient) -> None:
    alone = client.post(PREDICT, files=files(SKIN)).json()
    mixed = client.post(PREDICT, files=files(SKIN, MOUTH)).json()
    assert [i["domain"]["in_domain"] for i in mixed["images"]] == [True, False]
    assert mixed["note"] == "image(s) 2 out of the model's domain: left out of the combined result"
    assert mixed["probabilities"] == pytest.approx(alone["probabilities"])
    assert mixed["risk_level"] == alone["risk_level"]


def test_a_thumbnail_is_answered_with_a_quality_warning(client: TestClient) -> None:
    small = io.BytesIO()
    Image.open(SKIN).resize((120, 90)).save(small, "PNG")
    body = client.post(PREDICT, files={"file": ("small.png", small.getvalue(), "image/png")}).json()
    codes = [issue["code"] for issue in body["images"][0]["quality"]]
    assert "too_small" in codes
    assert "120x90 px" in next(i["message"] for i in body["images"][0]["quality"] if i["code"] == "too_small")


def test_an_indeterminate_case_is_stored_shown_reported_and_exported_as_such(client: TestClient) -> None:
    headers = login(client, "doc@clinic.org")
    data = {"model_id": "skin-ham10000", "patient_ref": "OOD-1"}
    case = client.post("/api/v1/cases", data=data, files=files(CELL), headers=headers).json()
    assert case["result"]["risk_level"] == "indeterminate"
    assert case["images"][0]["result"]["domain"]["in_domain"] is False
    listed = client.get("/api/v1/cases", params={"risk_level": "indeterminate"}, headers=headers).json()
    assert [c["id"] for c in listed["items"]] == [case["id"]]
    page = web_login(client, "doc@clinic.org").get(f"/cases/{case['id']}")
    assert 'data-testid="ood-notice"' in page.text and "No answer: this is not the kind of image" in page.text
    # No class in large type: the probabilities sit behind "show anyway", and no statement names a class.
    assert 'data-testid="show-anyway"' in page.text and "Most likely class" not in page.text
    fhir = client.get(f"/api/v1/cases/{case['id']}/fhir", headers=headers).json()
    report = fhir["entry"][0]["resource"]
    assert "Note: all 1 image(s) are out of the model's domain." in report["conclusion"]
    if shutil.which("pdftotext"):
        pdf = client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=headers).content
        text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
        text = " ".join(text.split())
        assert "No class and no risk level." in text and "indeterminate: no class, no risk level" in text
        assert case["result"]["statement"] in text and "Most likely class" not in text


def test_the_skin_9_class_app_answers_its_unknown_class(client: TestClient) -> None:
    body = client.post("/predict", files={"file": ("m.jpg", MOUTH.read_bytes(), "image/jpeg")}).json()
    assert body["success"] is True
    assert body["prediction"]["class_name"] == "Unknown" and body["prediction"]["is_cancerous"] is False
    assert body["oncolens"]["risk_level"] == "indeterminate"
    assert body["oncolens"]["images"][0]["domain"]["in_domain"] is False


def test_out_of_domain_images_are_counted_in_the_metrics(client: TestClient) -> None:
    def count() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('oncolens_images_out_of_domain_total{model="skin-ham10000"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    client.post(PREDICT, files=files(CELL))
    assert count() == before + 1


def test_batch_and_predict_report_domain_and_quality(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(SKIN, folder / "skin.jpg")
    shutil.copy(CELL, folder / "cell.jpg")
    out = tmp_path / "rows.csv"
    result = CliRunner().invoke(cli, ["batch", str(folder), "--model", "skin-ham10000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["file"]: row for row in csv.DictReader(out.open())}
    assert rows["cell.jpg"]["in_domain"] == "False" and rows["cell.jpg"]["risk_level"] == "indeterminate"
    assert rows["skin.jpg"]["in_domain"] == "True" and float(rows["skin.jpg"]["ood_score"]) > 0
    jsonl = tmp_path / "rows.jsonl"
    CliRunner().invoke(cli, ["batch", str(folder), "--model", "skin-ham10000", "--out", str(jsonl)])
    first = {json.loads(line)["file"]: json.loads(line) for line in jsonl.read_text().splitlines()}
    assert first["cell.jpg"]["in_domain"] is False and isinstance(first["cell.jpg"]["quality"], list)
    printed = CliRunner().invoke(cli, ["predict", str(CELL), "--model", "skin-ham10000"])
    assert "out of the model's domain, another kind of image" in printed.output
    assert "Choose the model for this kind of image." in printed.output and "Most likely" not in printed.output
