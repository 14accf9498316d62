"""``oncolens dicom pull --from AE@host:port --study UID``: ask a PACS for a study (C-FIND, to check it
is there), have it sent to the running listener (C-MOVE to ``ONCOLENS_DICOM_AE_TITLE``), and wait
until the listener has analysed it."""

from __future__ import annotations

import time

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy.engine import Engine
from sqlmodel import Session

from oncolens.dicom.inbox import valid_uid
from oncolens.dicom.listener import Destination
from oncolens.store.db.models import DicomStudy

PENDING = (0xFF00, 0xFF01)
DONE = ("sent", "send_failed", "unrouted", "failed")


class PullFailed(Exception):
    """The PACS would not find, move or give the study; the message says which and why."""


def find(source: Destination, own_title: str, study_uid: str) -> int:
    """How many instances the PACS has of the study (C-FIND at STUDY level); PullFailed when none."""
    ae = AE(ae_title=own_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedInstances = ""
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise PullFailed(f"{source} refused the association (is {own_title} known to it?)")
    matches = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in PENDING and identifier is not None:
                matches.append(identifier)
    finally:
        assoc.release()
    if not matches:
        raise PullFailed(f"{source} has no study {study_uid}")
    return int(matches[0].get("NumberOfStudyRelatedInstances", 0) or 0)


def move(source: Destination, own_title: str, destination_title: str, study_uid: str) -> int:
    """C-MOVE the study to ``destination_title``; how many instances the PACS says it sent."""
    ae = AE(ae_title=own_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise PullFailed(f"{source} refused the association")
    sent, failed, final = 0, 0, None
    try:
        for status, _ in assoc.send_c_move(query, destination_title, StudyRootQueryRetrieveInformationModelMove):
            if status:
                final = status
                sent = int(status.get("NumberOfCompletedSuboperations", sent) or sent)
                failed = int(status.get("NumberOfFailedSuboperations", failed) or failed)
    finally:
        assoc.release()
    if final is None or final.Status not in (0x0000, 0xB000) or (failed and not sent):
        code = f"0x{final.Status:04X}" if final is not None else "no answer"
        raise PullFailed(f"{source} did not move study {study_uid} to {destination_title}: status {code}")
    return sent


def wait_for_case(engine: Engine, study_uid: str, within_s: float) -> DicomStudy:
    """The study's record once the listener has finished with it; PullFailed after ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with Session(engine) as session:
            study = session.get(DicomStudy, study_uid)
            if study is not None and study.state in DONE:
                return study
        time.sleep(0.5)
    raise PullFailed(f"study {study_uid} was not analysed within {within_s:.0f} s: is `oncolens dicom listen` running?")


def pull(engine: Engine, source_text: str, study_uid: str, own_title: str, within_s: float) -> DicomStudy:
    """Find, move and wait: the study's record when the listener has made its case."""
    if not valid_uid(study_uid):
        raise PullFailed(f"--study {study_uid!r} is not a DICOM UID")
    source = Destination.parse(source_text)
    find(source, own_title, study_uid)
    move(source, own_title, own_title, study_uid)
    return wait_for_case(engine, study_uid, within_s)
