"""``oncolens dicom listen``: a DICOM Storage SCP beside ``oncolens serve``, sharing its database and
image store (pynetdicom).

- Associations: only the calling AE titles of ``ONCOLENS_DICOM_ALLOWED_AES`` (``AE`` or ``AE@host``);
  others get A-ASSOCIATE-RJ "calling AE title not recognised". C-ECHO is answered.
- C-STORE: every storage SOP class in every transfer syntax pydicom reads. Each instance is written
  durably to the inbox before the success status; one that cannot be read, has no study or instance
  UID, or holds no pixel data is quarantined and answered with a failure status.
- A study nothing arrived for in ``ONCOLENS_DICOM_STABLE_SECONDS`` is routed (``ONCOLENS_DICOM_ROUTES``)
  and analysed once into a case; its SR and heat-map Secondary Captures go back to every
  ``ONCOLENS_DICOM_DESTINATIONS`` by C-STORE and to ``ONCOLENS_DICOMWEB_URL`` by STOW-RS.
- A restart finishes the studies it was receiving: their instances are in the inbox.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlmodel import Session

from oncolens.config import Settings
from oncolens.dicom.inbox import Inbox, valid_uid
from oncolens.dicom.routes import Route, StudyHeaders, load_routes, route
from oncolens.services import studies
from oncolens.store.db import make_engine
from oncolens.store.db.models import DicomStudy
from oncolens.store.images import open_store
from oncolens.zoo import Zoo

log = logging.getLogger("oncolens.dicom")

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000  # the instance could not be read
DOES_NOT_MATCH = 0xA900  # the instance holds no image to analyse
OUT_OF_RESOURCES = 0xA700  # the inbox could not keep it
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognised


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            title, address = text.strip().split("@", 1)
            host, port = address.rsplit(":", 1)
            return cls(title, host, int(port))
        except ValueError:
            raise ValueError(f"ONCOLENS_DICOM_DESTINATIONS: {text!r} is not AE@host:port") from None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS (``ONCOLENS_DICOM_TLS_CERT`` and ``_KEY``; with ``_CA``, callers must present
    a certificate it signed); None for plain TCP. ValueError names a file that cannot be used."""
    if settings.dicom_tls_cert is None and settings.dicom_tls_key is None:
        if settings.dicom_tls_ca is not None:
            raise ValueError("ONCOLENS_DICOM_TLS_CA needs ONCOLENS_DICOM_TLS_CERT and ONCOLENS_DICOM_TLS_KEY")
        return None
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        raise ValueError("TLS needs both ONCOLENS_DICOM_TLS_CERT and ONCOLENS_DICOM_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
        if settings.dicom_tls_ca is not None:
            context.load_verify_locations(settings.dicom_tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"the DICOM TLS certificate, key or CA cannot be used: {exc}") from None
    return context


def allowed(entries: list[str], calling_ae: str, host: str) -> bool:
    """Whether a calling AE title (from ``host``) may associate: an entry ``AE`` or ``AE@host``."""
    for entry in entries:
        title, _, only = entry.strip().partition("@")
        if title == calling_ae.strip() and (not only or only == host):
            return True
    return False


def encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class Listener:
    settings: Settings
    zoo: Zoo = field(init=False)
    inbox: Inbox = field(init=False)
    routes: list[Route] = field(init=False)
    destinations: list[Destination] = field(init=False)

    def __post_init__(self) -> None:
        self.zoo = Zoo.from_settings(self.settings)
        self.routes = load_routes(self.settings.dicom_routes, self.zoo.ids())
        self.destinations = [Destination.parse(d) for d in self.settings.dicom_destinations]
        self.tls = tls_context(self.settings)
        self.inbox = Inbox(self.settings.data_dir)
        self.engine = make_engine(self.settings.resolved_database_url)
        self.store = open_store(self.settings)
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # one study analysed at a time
        self.server: Any = None

    # --- the association side --------------------------------------------------------------------

    def on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        request = requestor.primitive  # the A-ASSOCIATE-RQ: its title is copied over only in negotiation
        title = str(request.calling_ae_title if request is not None else "").strip()
        if not allowed(self.settings.dicom_allowed_aes, title, requestor.address):
            log.warning("rejected an association from %r at %s", title, requestor.address)
            event.assoc.acse.send_reject(*REJECT_CALLING_AE)
            event.assoc.kill()  # as pynetdicom's own rejections do: the A-ASSOCIATE-RJ goes out first

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            data = encode(dataset)
        except Exception as exc:  # pydicom raises many kinds on a malformed stream
            request: Any = event.request
            raw = request.DataSet.getvalue() if request.DataSet is not None else b""
            self.inbox.quarantine(raw, f"from {calling}: cannot be read: {exc}")
            return CANNOT_UNDERSTAND
        study_uid, sop_uid = dataset.get("StudyInstanceUID"), dataset.get("SOPInstanceUID")
        if not valid_uid(study_uid) or not valid_uid(sop_uid):
            self.inbox.quarantine(data, f"from {calling}: no valid StudyInstanceUID or SOPInstanceUID")
            return CANNOT_UNDERSTAND
        if "PixelData" not in dataset and "FloatPixelData" not in dataset:
            self.inbox.quarantine(data, f"from {calling}: {dataset.SOPClassUID.name} holds no image to analyse")
            return DOES_NOT_MATCH
        try:
            with Session(self.engine) as session:
                study = session.get(DicomStudy, study_uid)
                if study is not None and study.state != "receiving":
                    if not studies.has_instance(session, study, sop_uid):  # new, but too late for its case
                        self.inbox.quarantine(
                            data, f"from {calling}: study {study_uid} was {study.state} already (case {study.case_id})"
                        )
                    return SUCCESS  # an instance sent again changes nothing
                new = self.inbox.keep(study_uid, sop_uid, data)
                studies.received(session, study_uid, calling, new)
        except OSError as exc:
            log.error("cannot keep instance %s of study %s: %s", sop_uid, study_uid, exc)
            return OUT_OF_RESOURCES
        return SUCCESS

    def start(self) -> None:
        """Bind the port and start the study worker; returns at once."""
        ae = AE(ae_title=self.settings.dicom_ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]
        with Session(self.engine) as session:
            waiting = {p.name: len(self.inbox.files(p.name)) for p in self.inbox.root.iterdir() if p.is_dir()}
            found = studies.recover(session, waiting)
        if found:
            log.info("%d study folder(s) in the inbox had no record: receiving them again", found)
        address = (self.settings.dicom_host, self.settings.dicom_port)
        self.server = ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=self.tls)
        self.worker = threading.Thread(target=self._work, name="dicom-studies", daemon=True)
        self.worker.start()
        log.info("DICOM listener %s on %s:%d", self.settings.dicom_ae_title, *address)

    def stop(self) -> None:
        """Close the port and let the worker finish the study in hand; once (later calls do nothing)."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.worker.join(timeout=60)
        self.engine.dispose()

    # --- the study side --------------------------------------------------------------------------

    def _work(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                self.run_due()
            except Exception:  # one bad study must not end the worker
                log.exception("the study worker failed; it goes on")

    def run_due(self) -> int:
        """Route and analyse every complete study; returns how many were handled."""
        with self.lock, Session(self.engine) as session:
            due = studies.due(session, self.settings.dicom_stable_seconds)
            for study in due:
                self.handle(session, study.study_uid, study.calling_ae)
            return len(due)

    def handle(self, session: Session, study_uid: str, calling_ae: str) -> None:
        files = self.inbox.files(study_uid)
        if not files:
            studies.mark(session, study_uid, "failed", "no instances in the inbox")
            return
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        headers = StudyHeaders(
            str(header.get("Modality", "") or ""),
            str(header.get("BodyPartExamined", "") or ""),
            str(header.get("StudyDescription", "") or ""),
            calling_ae,
        )
        chosen = route(self.routes, headers)
        if chosen is None:
            studies.mark(
                session,
                study_uid,
                "unrouted",
                f"no route matches modality {headers.modality!r}, body part {headers.body_part!r}, "
                f"description {headers.study_description!r}, calling AE {calling_ae!r}",
            )
            return
        try:
            answer = studies.analyse(
                session,
                self.store,
                self.zoo,
                self.settings,
                study_uid,
                [f.read_bytes() for f in files],
                chosen.model,
                chosen.frames,
            )
        except Exception as exc:
            session.rollback()
            log.exception("study %s could not be analysed", study_uid)
            studies.mark(session, study_uid, "failed", f"{type(exc).__name__}: {exc}", chosen.model)
            return
        for path in files:  # the analysed instances are in the image store now
            path.unlink(missing_ok=True)
        late = self.inbox.files(study_uid)
        for path in late:  # arrived while the study was being analysed: kept, listed, not analysed
            self.inbox.quarantine(path.read_bytes(), f"study {study_uid}: arrived while its case was being made")
        self.inbox.clear(study_uid)
        outcomes = self.send([answer.sr, *answer.captures])
        everywhere = all(ok for _, ok in outcomes)
        said = "; ".join(text for text, _ in outcomes) or "no destination set"
        detail = f"case {answer.case.id}: risk {answer.case.risk_level}; {said}"
        if late:
            detail += f"; {len(late)} late instance(s) quarantined"
        studies.mark(session, study_uid, "sent" if everywhere else "send_failed", detail)
        log.info("study %s -> case %s (%s); %s", study_uid, answer.case.id, chosen.model, said)

    def send(self, instances: list[bytes]) -> list[tuple[str, bool]]:
        """Send the answers to every destination (C-STORE) and to the DICOMweb server (STOW-RS):
        what each said, and whether it took them all."""
        outcomes = []
        for destination in self.destinations:
            stored = store_to(destination, self.settings.dicom_ae_title, instances)
            outcomes.append((f"{destination}: {stored} of {len(instances)} stored", stored == len(instances)))
        if self.settings.dicomweb_url:
            said, ok = stow(self.settings.dicomweb_url, instances)
            outcomes.append((f"STOW-RS: {said}", ok))
        return outcomes


def store_to(destination: Destination, own_title: str, instances: list[bytes]) -> int:
    """C-STORE each instance to a destination; how many it stored (0 when it would not associate)."""
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in instances]
    ae = AE(ae_title=own_title)
    for uid, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(uid, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        log.warning("%s refused the association or did not answer", destination)
        return 0
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            stored += bool(status) and status.Status == SUCCESS
    finally:
        assoc.release()
    return stored


def stow(base_url: str, instances: list[bytes]) -> tuple[str, bool]:
    """STOW-RS of the instances as one multipart/related request (the body Orthanc needs)."""
    boundary = uuid.uuid4().hex
    parts = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for data in instances
    )
    body = parts + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    try:
        answer = httpx.post(f"{base_url.rstrip('/')}/studies", content=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        return f"failed: {exc}", False
    return f"HTTP {answer.status_code}", answer.status_code == 200
