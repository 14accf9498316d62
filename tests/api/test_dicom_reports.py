"""Issue 43, results as DICOM: `GET /api/v1/cases/{id}/dicom-sr` gives a TID 1500 Comprehensive 3D SR
that dciodvfy passes, in the study of the case's DICOM images (referencing each) with the API's own
P(malignant), or in a study of the case's own for photos; the heat-map Secondary Capture likewise
(SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from oncolens.app import create_app
from oncolens.reports.dicom import heatmap_sc
from oncolens.store.db.models import AuditEvent
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login
from tests.dicom.test_listener import instance

pytest.importorskip("highdicom")

BREAST = Path(__file__).parents[2] / "samples" / "breast-us"
SKIN = Path(__file__).parents[2] / "samples" / "skin-ham10000" / "ISIC_0025316.jpg"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY = generate_uid()


def ultrasound(name: str, number: int, series: str) -> bytes:
    """One RGB ultrasound instance of the study (the listener tests' instance, in this module's study)."""
    buffer = io.BytesIO()
    instance(STUDY, series, name, number).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def p_values(sr: Dataset) -> list[float]:
    """The numbers of an SR, in order: each image's P(malignant), then the case's."""
    return [float(i.MeasuredValueSequence[0].NumericValue) for i in content(sr) if i.get("ValueType") == "NUM"]


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    path = tmp_path / "check.dcm"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def client(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("data"), database_url)
    with TestClient(create_app(settings)) as test_client:
        add_user(test_client, "ana@clinic.org", "clinician")
        add_user(test_client, "ben@clinic.org", "clinician")
        yield test_client


def content(sr: Dataset) -> list[Dataset]:
    """Every content item of an SR, depth first."""
    out: list[Dataset] = []
    for item in sr.get("ContentSequence", []):
        out += [item, *content(item)]
    return out


def test_a_dicom_case_gets_an_sr_in_its_study_with_the_apis_numbers(client: TestClient, tmp_path: Path) -> None:
    ana = login(client, "ana@clinic.org")
    series = generate_uid()
    frames = [
        ultrasound(name, i + 1, series)
        for i, name in enumerate(["malignant_016.jpg", "benign_009.jpg", "normal_002.jpg"])
    ]
    files = [("files", (f"us{i}.dcm", frame, "application/dicom")) for i, frame in enumerate(frames)]
    made = client.post(
        "/api/v1/cases", data={"model_id": "breast-us", "patient_ref": "PT-PACS-1"}, files=files, headers=ana
    )
    assert made.status_code == 201, made.text
    case = made.json()
    answer = client.get(f"/api/v1/cases/{case['id']}/dicom-sr", headers=ana)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
    assert dciodvfy_errors(answer.content, tmp_path) == []
    sr = pydicom.dcmread(io.BytesIO(answer.content))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.StudyInstanceUID == STUDY and sr.PatientID == "PT-PACS-1"
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED"
    items = content(sr)
    numbers = p_values(sr)
    expected = [image["result"]["p_malignant"] for image in case["images"]] + [case["result"]["p_malignant"]]
    assert len(numbers) == 4 and all(abs(n - e) <= 1e-6 for n, e in zip(numbers, expected, strict=True))
    texts = {
        (i.ConceptNameCodeSequence[0].CodeMeaning, i.get("TextValue")) for i in items if i.get("ValueType") == "TEXT"
    }
    assert ("Algorithm Name", "breast-us") in texts and ("Algorithm Version", case["model_version"]) in texts
    findings = [
        i.ConceptCodeSequence[0].CodeValue for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    ]
    assert findings[:3] == [image["result"]["top_class"] for image in case["images"]]
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.get("ValueType") == "IMAGE"}
    assert referenced == {pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in frames}
    assert (
        client.get(f"/api/v1/cases/{case['id']}/dicom-sr", headers=login(client, "ben@clinic.org")).status_code == 404
    )
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        events = session.exec(
            select(AuditEvent).where(AuditEvent.case_id == case["id"], AuditEvent.action == "dicom_sr")
        )
        assert len(events.all()) == 1

    source = pydicom.dcmread(io.BytesIO(frames[0]))
    sc = heatmap_sc(case["id"], 0, case["model_version"], Image.open(BREAST / "malignant_016.jpg"), source)
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    assert dciodvfy_errors(buffer.getvalue(), tmp_path) == []
    assert sc.StudyInstanceUID == STUDY and sc.SeriesInstanceUID != series and sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSIS" in sc.ImageComments and sc.pixel_array[:8, :40].mean() < 200  # the burned-in band


def test_a_photo_case_gets_an_sr_in_a_study_of_its_own(client: TestClient, tmp_path: Path) -> None:
    ana = login(client, "ana@clinic.org")
    form = {"model_id": "skin-ham10000", "patient_ref": "PT-9", "patient_name": "Ana Ruiz", "patient_sex": "female"}
    made = client.post(
        "/api/v1/cases", data=form, files=[("files", ("a.jpg", SKIN.read_bytes(), "image/jpeg"))], headers=ana
    )
    case = made.json()
    first = client.get(f"/api/v1/cases/{case['id']}/dicom-sr", headers=ana)
    again = client.get(f"/api/v1/cases/{case['id']}/dicom-sr", headers=ana)
    assert first.status_code == 200 and dciodvfy_errors(first.content, tmp_path) == []
    sr, sr_again = (pydicom.dcmread(io.BytesIO(a.content)) for a in (first, again))
    assert (sr.StudyInstanceUID, sr.SOPInstanceUID) == (sr_again.StudyInstanceUID, sr_again.SOPInstanceUID)
    assert sr.PatientID == "PT-9" and str(sr.PatientName) == "Ana Ruiz^" and sr.PatientSex == "F"
    numbers = p_values(sr)
    assert len(numbers) == 1 and abs(numbers[0] - case["images"][0]["result"]["p_malignant"]) <= 1e-6
    assert client.get("/api/v1/cases/0123456789abcdef0123456789abcdef/dicom-sr", headers=ana).status_code == 404
