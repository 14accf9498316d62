"""Issue 43: the DICOM listener (pynetdicom on loopback). C-ECHO; unknown AE titles rejected at
association; a 3-instance ultrasound study routed to breast-us becomes one case whose SR (P(malignant)
equal to the API's for the same files) and three heat-map Secondary Captures come back to the
destination in the same study; a study sent again makes no second case; malformed and image-less
instances get failure statuses and are quarantined; an unrouted study is kept and listed; a study
interrupted by a restart completes."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlmodel import Session, select

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from oncolens.app import create_app
from oncolens.dicom.listener import Listener
from oncolens.store.db import make_engine
from oncolens.store.db.models import AuditEvent, Case, CaseImage, DicomStudy
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login
from tests.web.test_pages import web_login

BREAST = Path(__file__).parents[2] / "samples" / "breast-us"
NAMES = ["malignant_016.jpg", "benign_009.jpg", "normal_002.jpg"]
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
STABLE_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def instance(
    study: str, series: str, name: str, number: int, body_part: str = "BREAST", modality: str = "US"
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = US_IMAGE_STORAGE, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientAge = "PT-PACS-1", "Roe^Alma", "F", "052Y"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
        "20261201",
        "0930",
        "1",
        "",
        "",
    )
    ds.SeriesNumber, ds.InstanceNumber, ds.BodyPartExamined = 1, number, body_part
    ds.StudyDescription = "US BREAST LEFT"
    ds.set_pixel_data(np.asarray(Image.open(BREAST / name).convert("RGB")), "RGB", 8)
    return ds


def study_of(n: int = 3, **tags: str) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [instance(study, series, NAMES[i % 3], i + 1, **tags) for i in range(n)]


class Collector:
    """A PACS stand-in: a Storage SCP on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[Dataset] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax))
        ae.add_supported_context(COMPREHENSIVE_3D_SR)

        def keep(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return 0

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])

    def wait_for(self, count: int, within_s: float) -> list[Dataset]:
        deadline = time.monotonic() + within_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return list(self.received)


@pytest.fixture(scope="module")
def node(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("dicom-node")
    routes = folder / "routes.toml"
    routes.write_text(
        '[[route]]\nstudy_description = "cine"\nframes = [1, 3]\nmodel = "breast-us"\n\n'
        '[[route]]\nmodality = "US"\nbody_part = "breast"\nmodel = "breast-us"\n'
    )
    collector = Collector()
    settings = db_settings(
        folder,
        database_url,
        dicom_port=free_port(),
        dicom_host="127.0.0.1",
        dicom_allowed_aes=["SCANNER", "ROOM2@127.0.0.1", "ROOM3@10.9.9.9"],
        dicom_stable_seconds=STABLE_S,
        dicom_routes=routes,
        dicom_destinations=[f"PACS@127.0.0.1:{collector.port}"],
        dicom_viewer_url="https://pacs.example/viewer?StudyInstanceUIDs={study_uid}",
    )
    with TestClient(create_app(settings)) as client:
        add_user(client, "admin@clinic.org", "admin")
        add_user(client, "cli@clinic.org", "clinician")
        listener = Listener(settings)
        listener.start()
        running = {"settings": settings, "client": client, "collector": collector, "listener": listener}
        try:
            yield running
        finally:
            running["listener"].stop()  # the one a restart test left running
            collector.server.shutdown()


def associate(node: dict[str, Any], title: str = "SCANNER") -> Any:
    ae = AE(ae_title=title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(US_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(COMPREHENSIVE_3D_SR, ExplicitVRLittleEndian)
    ae.add_requested_context(US_MULTIFRAME, ExplicitVRLittleEndian)
    settings = node["settings"]
    return ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.dicom_ae_title)


def send(node: dict[str, Any], datasets: list[Dataset], title: str = "SCANNER") -> list[int]:
    assoc = associate(node, title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def wait_state(node: dict[str, Any], study_uid: str, within_s: float = STABLE_S + 20) -> DicomStudy:
    deadline = time.monotonic() + within_s
    engine = node["client"].app.state.engine
    while time.monotonic() < deadline:
        with Session(engine) as session:
            study = session.get(DicomStudy, study_uid)
            if study is not None and study.state not in ("receiving", "analysed"):
                return study
        time.sleep(0.2)
    raise AssertionError(f"study {study_uid} still receiving after {within_s} s")


def test_echo_and_unknown_ae_titles_are_rejected_at_association(node: dict[str, Any]) -> None:
    assoc = associate(node)
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()
    for title in ("STRANGER", "ROOM3"):  # unknown, and known only from another host
        refused = associate(node, title)
        assert refused.is_rejected and not refused.is_established
    room2 = associate(node, "ROOM2")
    assert room2.is_established
    room2.release()


def test_a_study_comes_back_as_one_sr_and_three_captures_in_its_study(node: dict[str, Any]) -> None:
    collector, client = node["collector"], node["client"]
    before = len(collector.received)
    datasets = study_of(3)
    start = time.monotonic()
    assert send(node, datasets) == [0, 0, 0]
    study = wait_state(node, datasets[0].StudyInstanceUID)
    received = collector.wait_for(before + 4, STABLE_S + 10)[before:]
    assert time.monotonic() - start <= STABLE_S + 10 + 5  # sent, quiet for STABLE_S, analysed and back
    assert study.state == "sent" and study.instances == 3 and study.model_id == "breast-us", study.detail
    assert "PACS@127.0.0.1" in study.detail and "4 of 4 stored" in study.detail
    kinds = [ds.SOPClassUID for ds in received]
    assert kinds.count(COMPREHENSIVE_3D_SR) == 1 and kinds.count(SECONDARY_CAPTURE) == 3
    assert {ds.StudyInstanceUID for ds in received} == {datasets[0].StudyInstanceUID}
    sr = next(ds for ds in received if ds.SOPClassUID == COMPREHENSIVE_3D_SR)
    with Session(client.app.state.engine) as session:
        case = session.get(Case, study.case_id)
        assert case is not None and case.dicom_study_uid == datasets[0].StudyInstanceUID
        assert (case.patient_ref, case.patient_age, case.patient_sex) == ("PT-PACS-1", 52, "female")
        events = session.exec(select(AuditEvent).where(AuditEvent.case_id == case.id)).all()
        assert any(e.action == "create" and e.detail.startswith("dicom:") for e in events)

    files = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(("files", (f"{ds.InstanceNumber}.dcm", buffer.getvalue(), "application/dicom")))
    api = client.post(
        "/api/v1/cases",
        data={"model_id": "breast-us", "patient_ref": "X"},
        files=files,
        headers=login(client, "admin@clinic.org"),
    )
    expected = [image["result"]["p_malignant"] for image in api.json()["images"]] + [
        api.json()["result"]["p_malignant"]
    ]
    from tests.api.test_dicom_reports import p_values  # imports this module's instance()

    assert np.allclose(p_values(sr), expected, atol=1e-6)
    seen = client.get(f"/api/v1/cases/{case.id}", headers=login(client, "cli@clinic.org"))
    assert seen.status_code == 200 and seen.json()["dicom_study_uid"] == datasets[0].StudyInstanceUID
    browser = web_login(client, "cli@clinic.org")  # a department case: every clinician sees it
    page = browser.get(f"/cases/{case.id}").text
    assert datasets[0].StudyInstanceUID in page
    assert f"https://pacs.example/viewer?StudyInstanceUIDs={datasets[0].StudyInstanceUID}" in page
    download = browser.get(f"/cases/{case.id}/sr.dcm")
    assert download.status_code == 200 and pydicom.dcmread(io.BytesIO(download.content)).Modality == "SR"

    quarantined = len(node["listener"].inbox.quarantined())
    assert send(node, datasets) == [0, 0, 0]  # sent again: acknowledged, nothing new
    late = instance(datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, NAMES[0], 9)
    assert send(node, [late]) == [0]  # new, but its study was answered: kept aside, listed
    time.sleep(STABLE_S + 1.5)
    with Session(client.app.state.engine) as session:
        made = session.exec(select(Case).where(Case.dicom_study_uid == datasets[0].StudyInstanceUID)).all()
        assert len(made) == 1
    reasons = [q.reason for q in node["listener"].inbox.quarantined()]
    assert len(reasons) == quarantined + 1
    assert any(f"study {datasets[0].StudyInstanceUID} was sent already" in reason for reason in reasons)


def test_malformed_and_imageless_instances_fail_and_are_quarantined(node: dict[str, Any]) -> None:
    good = study_of(1)[0]
    no_uid = study_of(1)[0]
    del no_uid.StudyInstanceUID
    no_pixels = study_of(1)[0]
    del no_pixels.PixelData
    statuses = send(node, [no_uid, no_pixels, good])
    assert statuses[0] == 0xC000 and statuses[1] == 0xA900 and statuses[2] == 0
    reasons = [q.reason for q in node["listener"].inbox.quarantined()]
    assert any("no valid StudyInstanceUID" in r for r in reasons) and any("no image" in r for r in reasons)
    assert wait_state(node, good.StudyInstanceUID).state == "sent"


def test_an_unrouted_study_is_kept_and_listed(node: dict[str, Any]) -> None:
    datasets = study_of(2, body_part="ABDOMEN")
    assert send(node, datasets) == [0, 0]
    study = wait_state(node, datasets[0].StudyInstanceUID)
    assert study.state == "unrouted" and "no route matches" in study.detail and "ABDOMEN" in study.detail
    assert len(node["listener"].inbox.files(datasets[0].StudyInstanceUID)) == 2


def test_a_study_cut_by_a_restart_completes_after_it(node: dict[str, Any]) -> None:
    listener: Listener = node["listener"]
    datasets = study_of(3)
    listener.lock.acquire()  # the worker is held: the study cannot complete before the "crash"
    try:
        assert send(node, datasets[:2]) == [0, 0]
        with Session(node["client"].app.state.engine) as session:  # the crash lost the database's note
            row = session.get(DicomStudy, datasets[0].StudyInstanceUID)
            assert row is not None
            session.delete(row)
            session.commit()
    finally:
        listener.lock.release()
    listener.stop()
    restarted = Listener(node["settings"])
    restarted.start()
    node["listener"] = restarted
    assert send(node, datasets[2:]) == [0]
    study = wait_state(node, datasets[0].StudyInstanceUID)
    assert study.state == "sent" and study.instances == 3
    with Session(node["client"].app.state.engine) as session:
        case = session.get(Case, study.case_id)
        assert (
            case is not None
            and len(
                node["client"]
                .get(f"/api/v1/cases/{case.id}", headers=login(node["client"], "admin@clinic.org"))
                .json()["images"]
            )
            == 3
        )


def test_parallel_associations_with_malformed_instances_lose_nothing(node: dict[str, Any]) -> None:
    studies = [study_of(2) for _ in range(8)]
    broken = []
    for _ in range(4):
        bad = study_of(1)[0]
        del bad.StudyInstanceUID
        broken.append(bad)
    statuses: list[list[int]] = []

    def one(k: int) -> None:  # four associations, each two studies and one malformed instance
        statuses.append(send(node, [*studies[2 * k], broken[k], *studies[2 * k + 1]]))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [[0, 0, 0xC000, 0, 0]] * 4
    states = [wait_state(node, s[0].StudyInstanceUID) for s in studies]
    assert [s.state for s in states] == ["sent"] * 8 and all(s.instances == 2 for s in states)
    assert len({s.case_id for s in states}) == 8


def test_dcmtk_talks_to_the_listener_and_reads_its_sr(node: dict[str, Any], tmp_path: Path) -> None:
    if shutil.which("echoscu") is None:
        pytest.skip("DCMTK is not installed")
    port, title = str(node["settings"].dicom_port), node["settings"].dicom_ae_title
    echo = subprocess.run(["echoscu", "-aet", "SCANNER", "-aec", title, "127.0.0.1", port], capture_output=True)
    assert echo.returncode == 0, echo.stderr
    refused = subprocess.run(["echoscu", "-aet", "NOBODY", "-aec", title, "127.0.0.1", port], capture_output=True)
    assert refused.returncode != 0 and b"Rejected" in refused.stderr + refused.stdout
    datasets = study_of(1)
    path = tmp_path / "us.dcm"
    datasets[0].save_as(path, enforce_file_format=True)
    stored = subprocess.run(
        ["storescu", "-aet", "SCANNER", "-aec", title, "127.0.0.1", port, str(path)], capture_output=True
    )
    assert stored.returncode == 0, stored.stderr
    study = wait_state(node, datasets[0].StudyInstanceUID)
    assert study.state == "sent"
    client = node["client"]
    sr = client.get(f"/api/v1/cases/{study.case_id}/dicom-sr", headers=login(client, "admin@clinic.org"))
    (tmp_path / "sr.dcm").write_bytes(sr.content)
    dump = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True, text=True)
    assert dump.returncode == 0 and "Probability of malignancy" in dump.stdout and "breast-us" in dump.stdout


def test_kill_9_during_a_study_loses_nothing(tmp_path: Path) -> None:
    """A real `oncolens dicom listen` process killed with SIGKILL between a study's instances; restarted,
    it finishes the study with every instance."""
    port = free_port()
    env = os.environ | {
        "ONCOLENS_DATA_DIR": str(tmp_path),
        "ONCOLENS_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "ONCOLENS_SECRET_KEY": "test-secret-key-that-is-long-enough-for-hs256",
        "ONCOLENS_DICOM_PORT": str(port),
        "ONCOLENS_DICOM_HOST": "127.0.0.1",
        "ONCOLENS_DICOM_ALLOWED_AES": "SCANNER",
        "ONCOLENS_DICOM_STABLE_SECONDS": "3",
    }
    routes = tmp_path / "routes.toml"
    routes.write_text('[[route]]\nmodality = "US"\nmodel = "breast-us"\n')
    env["ONCOLENS_DICOM_ROUTES"] = str(routes)
    command = [sys.executable, "-m", "oncolens.cli.main"]
    made = subprocess.run([*command, "users", "create", "--admin", "--email", "a@b.org", "--password-stdin"],
                          input=b"a long enough password 123\n", env=env, capture_output=True)  # fmt: skip
    assert made.returncode == 0, made.stderr

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [*command, "dicom", "listen"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        line = process.stdout.readline()  # the "DICOM listener ... on ..." line once it listens
        assert b"DICOM listener" in line, line
        return process

    target = {"settings": db_settings(tmp_path, env["ONCOLENS_DATABASE_URL"], dicom_port=port)}
    datasets = study_of(3)
    first = start()
    try:
        assert send(target, datasets[:2]) == [0, 0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    second = start()
    try:
        assert send(target, datasets[2:]) == [0]
        engine = make_engine(env["ONCOLENS_DATABASE_URL"])
        deadline = time.monotonic() + 60
        study = None
        while time.monotonic() < deadline:
            with Session(engine) as session:
                study = session.get(DicomStudy, datasets[0].StudyInstanceUID)
                if study is not None and study.state not in ("receiving", "analysed"):
                    break
            time.sleep(0.3)
        assert study is not None and study.state == "sent" and study.instances == 3, study
        with Session(engine) as session:
            case = session.get(Case, study.case_id)
            images = session.exec(select(CaseImage).where(CaseImage.case_id == study.case_id)).all()
            assert case is not None and len(images) == 3
        engine.dispose()
    finally:
        second.terminate()
        second.wait(30)


def certificate(folder: Path, name: str, issuer: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1 (openssl): self-signed, or signed by ``issuer``."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subject = ["-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"]
    if issuer is None:
        command = [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
        subprocess.run([*command, *subject], check=True, capture_output=True)
    else:
        request = folder / f"{name}.csr"
        subprocess.run(
            [
                "openssl",
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(request),
                *subject[:2],
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(request),
                "-CA",
                str(issuer[1]),
                "-CAkey",
                str(issuer[0]),
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
    return key, cert


def test_tls_associations_and_mutual_tls(tmp_path: Path) -> None:
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    server_key, server_cert = certificate(tmp_path, "node")
    ca = certificate(tmp_path, "clinic-ca")
    client_key, client_cert = certificate(tmp_path, "scanner", issuer=ca)
    stranger_key, stranger_cert = certificate(tmp_path, "stranger")
    port = free_port()
    settings = db_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        dicom_port=port,
        dicom_host="127.0.0.1",
        dicom_allowed_aes=["SCANNER"],
        dicom_tls_cert=server_cert,
        dicom_tls_key=server_key,
        dicom_tls_ca=ca[1],
    )
    listener = Listener(settings)
    listener.start()

    def echo(key: Path | None, cert: Path | None, tls: bool = True) -> bool:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        tls_args = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
            if key is not None and cert is not None:
                context.load_cert_chain(cert, key)
            tls_args = (context, "127.0.0.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="ONCOLENS", tls_args=tls_args)
        if not assoc.is_established:
            return False
        ok = int(assoc.send_c_echo().Status) == 0
        assoc.release()
        return ok

    try:
        assert echo(client_key, client_cert)  # a certificate the clinic's CA signed
        assert not echo(stranger_key, stranger_cert)  # one it did not
        assert not echo(None, None)  # none at all
        assert not echo(None, None, tls=False)  # plain TCP
    finally:
        listener.stop()
    with pytest.raises(ValueError, match="needs both"):
        Listener(db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", dicom_tls_cert=server_cert))


def test_a_cine_loop_is_analysed_at_the_routes_frames(node: dict[str, Any]) -> None:
    ds = study_of(1)[0]
    frames = np.stack(
        [np.asarray(Image.open(BREAST / NAMES[i % 3]).convert("RGB").resize((160, 120))) for i in range(4)]
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME
    ds.StudyDescription = "US BREAST CINE"
    ds.set_pixel_data(frames, "RGB", 8)
    assert ds.NumberOfFrames == 4
    assert send(node, [ds]) == [0]
    study = wait_state(node, ds.StudyInstanceUID)
    assert study.state == "sent", study.detail
    client = node["client"]
    admin = login(client, "admin@clinic.org")
    case = client.get(f"/api/v1/cases/{study.case_id}", headers=admin).json()
    assert [image["filename"].split("#")[1] for image in case["images"]] == ["frame1.dcm", "frame3.dcm"]
    sr = pydicom.dcmread(io.BytesIO(client.get(f"/api/v1/cases/{study.case_id}/dicom-sr", headers=admin).content))

    def references(item: Dataset) -> list[tuple[str, list[int]]]:
        out = []
        for child in item.get("ContentSequence", []):
            if child.get("ValueType") == "IMAGE":
                sop = child.ReferencedSOPSequence[0]
                numbers = sop.ReferencedFrameNumber  # one value reads as a number, several as a list
                values = list(numbers) if isinstance(numbers, MultiValue) else [numbers]
                out.append((sop.ReferencedSOPInstanceUID, [int(n) for n in values]))
            out += references(child)
        return out

    assert sorted(references(sr), key=lambda r: r[1]) == [(ds.SOPInstanceUID, [1]), (ds.SOPInstanceUID, [3])]
