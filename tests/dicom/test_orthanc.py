"""Issue 43's floors against a real PACS: Orthanc (Debian `orthanc`, `orthanc-dicomweb`) on loopback,
configured in the test's folder. A 3-instance ultrasound study sent from Orthanc comes back into the
same study in Orthanc as one SR and three Secondary Captures within STABLE_SECONDS + 10 s, both pass
dciodvfy, and the SR's P(malignant) equals the API's for the same files; the answers also reach
Orthanc by STOW-RS; `oncolens dicom pull` has Orthanc move a study and prints its case."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from oncolens.app import create_app
from oncolens.cli.main import app
from oncolens.dicom.listener import Listener
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login
from tests.api.test_dicom_reports import dciodvfy_errors, p_values
from tests.dicom.test_listener import free_port, study_of

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
STABLE_S = 1.0
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"

pytestmark = pytest.mark.skipif(not ORTHANC.exists() or not DICOMWEB.exists(), reason="Orthanc is not installed")


def encode(ds: Any) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("orthanc")
    http, dicom, listener_port = free_port(), free_port(), free_port()
    config = {
        "Name": "TestPACS",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": {"oncolens": ["ONCOLENS", "127.0.0.1", listener_port]},
        "Plugins": [str(DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    process = subprocess.Popen([str(ORTHANC), str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/system", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "Orthanc did not start"
            time.sleep(0.2)
        yield {"base": base, "dicom": dicom, "listener_port": listener_port}
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def node(pacs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("node")
    routes = folder / "routes.toml"
    routes.write_text('[[route]]\nmodality = "US"\nbody_part = "BREAST"\nmodel = "breast-us"\n')
    settings = db_settings(
        folder,
        f"sqlite:///{folder / 'db.sqlite'}",
        dicom_port=pacs["listener_port"],
        dicom_host="127.0.0.1",
        dicom_allowed_aes=["ORTHANC@127.0.0.1"],
        dicom_stable_seconds=STABLE_S,
        dicom_routes=routes,
        dicom_destinations=[f"ORTHANC@127.0.0.1:{pacs['dicom']}"],
        dicomweb_url=f"{pacs['base']}/dicom-web",
    )
    with TestClient(create_app(settings)) as client:
        add_user(client, "admin@clinic.org", "admin")
        listener = Listener(settings)
        listener.start()
        try:
            yield {"settings": settings, "client": client}
        finally:
            listener.stop()


def upload(pacs: dict[str, Any], datasets: list[Any]) -> str:
    """Put instances into Orthanc; its id of their study."""
    ids = [httpx.post(f"{pacs['base']}/instances", content=encode(ds)).json() for ds in datasets]
    return str(ids[0]["ParentStudy"])


def instances_of(pacs: dict[str, Any], study: str) -> list[dict[str, Any]]:
    return httpx.get(f"{pacs['base']}/studies/{study}/instances?expand").json()  # type: ignore[no-any-return]


def test_a_study_sent_from_orthanc_comes_back_into_its_study(
    pacs: dict[str, Any], node: dict[str, Any], tmp_path: Path
) -> None:
    datasets = study_of(3)
    study = upload(pacs, datasets)
    start = time.monotonic()
    job = httpx.post(f"{pacs['base']}/modalities/oncolens/store", content=study, timeout=60)
    assert job.status_code == 200, job.text
    deadline = start + STABLE_S + 10
    while time.monotonic() < deadline and len(instances_of(pacs, study)) < 7:
        time.sleep(0.2)
    took = time.monotonic() - start
    found = instances_of(pacs, study)
    classes = [httpx.get(f"{pacs['base']}/instances/{i['ID']}/content/0008-0016").text.strip("\x00 \n") for i in found]
    assert len(found) == 7 and classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == 3, (took, classes)
    assert took <= STABLE_S + 10
    sr_id = found[classes.index(SR_CLASS)]["ID"]
    sc_id = found[classes.index(SC_CLASS)]["ID"]
    sr_bytes = httpx.get(f"{pacs['base']}/instances/{sr_id}/file").content
    sc_bytes = httpx.get(f"{pacs['base']}/instances/{sc_id}/file").content
    assert dciodvfy_errors(sr_bytes, tmp_path) == [] and dciodvfy_errors(sc_bytes, tmp_path) == []
    client = node["client"]
    files = [("files", (f"{i}.dcm", encode(ds), "application/dicom")) for i, ds in enumerate(datasets)]
    form = {"model_id": "breast-us", "patient_ref": "X"}
    api = client.post("/api/v1/cases", data=form, files=files, headers=login(client, "admin@clinic.org")).json()
    expected = [image["result"]["p_malignant"] for image in api["images"]] + [api["result"]["p_malignant"]]
    assert np.allclose(p_values(pydicom.dcmread(io.BytesIO(sr_bytes))), expected, atol=1e-6)
    studies = CliRunner().invoke(app, ["dicom", "studies", "--json"], env=env_of(node))
    row = next(json.loads(line) for line in studies.output.splitlines() if datasets[0].StudyInstanceUID in line)
    assert row["state"] == "sent" and "4 of 4 stored" in row["detail"] and "STOW-RS: HTTP 200" in row["detail"]


def env_of(node: dict[str, Any]) -> dict[str, str]:
    settings = node["settings"]
    return {
        "ONCOLENS_DATA_DIR": str(settings.data_dir),
        "ONCOLENS_DATABASE_URL": settings.resolved_database_url,
        "ONCOLENS_SECRET_KEY": "test-secret-key-that-is-long-enough-for-hs256",
        "ONCOLENS_DICOM_AE_TITLE": "ONCOLENS",
    }


def test_pull_has_orthanc_move_a_study_and_prints_its_case(pacs: dict[str, Any], node: dict[str, Any]) -> None:
    datasets = study_of(2)
    upload(pacs, datasets)
    uid = datasets[0].StudyInstanceUID
    runner = CliRunner()
    done = runner.invoke(
        app,
        ["dicom", "pull", "--from", f"ORTHANC@127.0.0.1:{pacs['dicom']}", "--study", uid, "--wait", "60"],
        env=env_of(node),
    )
    assert done.exit_code == 0, done.output
    case_id = done.output.strip().splitlines()[-1]
    answer = node["client"].get(f"/api/v1/cases/{case_id}", headers=login(node["client"], "admin@clinic.org"))
    assert answer.status_code == 200 and answer.json()["dicom_study_uid"] == uid and len(answer.json()["images"]) == 2
    missing = runner.invoke(
        app, ["dicom", "pull", "--from", f"ORTHANC@127.0.0.1:{pacs['dicom']}", "--study", "1.2.3.999"], env=env_of(node)
    )
    assert missing.exit_code == 2 and "has no study 1.2.3.999" in missing.output
