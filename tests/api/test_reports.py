"""PDF case report and FHIR export of a stored case (SQLite and PostgreSQL)."""

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oncolens.app import create_app
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login

SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"
MEL, BCC = "ISIC_0025316.jpg", "ISIC_0026213.jpg"


@pytest.fixture(scope="module")
def client(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("data"), database_url, clinic_name="Hillside Dermatology Clinic")
    with TestClient(create_app(settings)) as test_client:
        add_user(test_client, "admin@clinic.org", "admin")
        add_user(test_client, "ana@clinic.org", "clinician")
        add_user(test_client, "ben@clinic.org", "clinician")
        add_user(test_client, "vic@clinic.org", "viewer")
        yield test_client


@pytest.fixture(scope="module")
def case(client: TestClient) -> dict:  # type: ignore[type-arg]
    ana = login(client, "ana@clinic.org")
    files = [("files", (name, (SAMPLES / name).read_bytes(), "image/jpeg")) for name in (MEL, BCC)]
    form = {
        "model_id": "skin-ham10000",
        "patient_ref": "PT-4471",
        "patient_name": "Maria Lopez",
        "patient_age": "61",
        "patient_sex": "female",
        "clinical_notes": "Changing lesion on the left shoulder.",
    }
    response = client.post("/api/v1/cases", data=form, files=files, headers=ana)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


needs_poppler = pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils not installed")


@needs_poppler
def test_the_report_holds_the_case_the_review_and_the_model(client: TestClient, case: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    ana = login(client, "ana@clinic.org")
    review = {"status": "reviewed", "confirmed_diagnosis": "melanoma in situ", "review_notes": "Excised 2026-11-20."}
    assert client.patch(f"/api/v1/cases/{case['id']}", json=review, headers=ana).status_code == 200
    response = client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=ana)
    assert response.status_code == 200 and response.headers["content-type"] == "application/pdf"
    assert response.headers["content-disposition"] == f'attachment; filename="oncolens-case-{case["id"]}.pdf"'
    assert response.content.startswith(b"%PDF")
    text = " ".join(pdf_text(response.content, tmp_path).split())
    for expected in (
        "Hillside Dermatology Clinic",
        "Image screening report",
        "PT-4471",
        "Maria Lopez",
        "61",
        "Changing lesion on the left shoulder.",
        f"skin-ham10000 version {case['model_version']}",
        f"Risk level: {case['result']['risk_level'].upper()}",
        case["result"]["recommendation"][:40],
        MEL,
        BCC,
        "melanoma in situ",
        "Excised 2026-11-20.",
        "reviewed",
        "balanced accuracy",
        "Intended use",
        "Decision support only, not a diagnosis",
        "Generated",
    ):
        assert expected in text, expected
    assert f"P(malignant) {case['result']['p_malignant']:.3f}" in text


@needs_poppler
def test_the_report_renders_with_images_and_heatmaps(client: TestClient, case: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    pdf = client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=login(client, "vic@clinic.org")).content
    (tmp_path / "r.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "60", "-png", str(tmp_path / "r.pdf"), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert 1 <= len(pages) <= 4
    first = np.asarray(Image.open(pages[0]).convert("RGB")).astype(int)
    colourful = (first.max(axis=2) - first.min(axis=2)) > 60
    assert colourful.mean() > 0.02, "the page shows the lesion photos and the heat-map overlays"


def test_reports_respect_who_may_see_the_case(client: TestClient, case: dict) -> None:  # type: ignore[type-arg]
    ben = login(client, "ben@clinic.org")
    assert client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=ben).status_code == 404
    assert client.get(f"/api/v1/cases/{case['id']}/fhir", headers=ben).status_code == 404
    assert client.get(f"/api/v1/cases/{case['id']}/report.pdf").status_code == 401
    client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=login(client, "ana@clinic.org"))
    client.get(f"/api/v1/cases/{case['id']}/fhir", headers=login(client, "ana@clinic.org"))
    audit = client.get("/api/v1/audit", params={"case_id": case["id"]}, headers=login(client, "admin@clinic.org"))
    assert {"report", "fhir_export"} <= {e["action"] for e in audit.json()["items"]}


def test_fhir_bundle_validates_as_r4_and_carries_the_results(client: TestClient, case: dict) -> None:  # type: ignore[type-arg]
    from fhir.resources.R4B.bundle import Bundle

    response = client.get(f"/api/v1/cases/{case['id']}/fhir", headers=login(client, "vic@clinic.org"))
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    bundle = Bundle.model_validate(body)
    assert bundle.type == "collection"
    resources = [entry["resource"] for entry in body["entry"]]
    kinds = [r["resourceType"] for r in resources]
    assert kinds.count("DiagnosticReport") == 1 and kinds.count("Patient") == 1 and kinds.count("Media") == 2
    report = resources[0]
    assert report["resourceType"] == "DiagnosticReport"
    urls = {entry["fullUrl"] for entry in body["entry"]}
    assert {ref["reference"] for ref in report["result"]} <= urls
    assert {m["link"]["reference"] for m in report["media"]} <= urls
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    assert patient["identifier"][0]["value"] == "PT-4471" and patient["gender"] == "female"
    assert patient["name"] == [{"text": "Maria Lopez"}] and "birthDate" not in patient
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    for class_id, p in case["result"]["probabilities"].items():
        assert by_code[class_id]["valueQuantity"]["value"] == pytest.approx(p, abs=1e-6)
    assert by_code["p_malignant"]["valueQuantity"]["value"] == pytest.approx(case["result"]["p_malignant"], abs=1e-6)
    assert by_code["risk_level"]["valueCodeableConcept"]["text"] == case["result"]["risk_level"]
    assert by_code["30525-0"]["valueQuantity"] == {
        "value": 61,
        "unit": "years",
        "system": "http://unitsofmeasure.org",
        "code": "a",
    }
    media = [r for r in resources if r["resourceType"] == "Media"]
    assert media[0]["content"]["url"].endswith(case["images"][0]["url"])
    assert "not a diagnosis" in report["conclusion"]
    # reviewed by the first test -> final; the ids are stable between exports
    again = client.get(f"/api/v1/cases/{case['id']}/fhir", headers=login(client, "vic@clinic.org")).json()
    assert [e["fullUrl"] for e in again["entry"]] == [e["fullUrl"] for e in body["entry"]]
    status = client.get(f"/api/v1/cases/{case['id']}", headers=login(client, "vic@clinic.org")).json()["review"][
        "status"
    ]
    assert report["status"] == ("preliminary" if status == "pending_review" else "final")
