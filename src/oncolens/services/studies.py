"""Studies the DICOM listener received: their state, and a complete study analysed once into a case.

The listener (``dicom/``, an edge) writes each instance to its inbox and calls ``received``; once a
study has been quiet for ``ONCOLENS_DICOM_STABLE_SECONDS`` it routes it and calls ``analyse``, which
makes the case (owned by ``ONCOLENS_DICOM_OWNER``, the first admin by default; audited on channel
``dicom``) and builds the answers to send back: the TID 1500 SR and a heat-map Secondary Capture per
image, in the study.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from PIL import Image
from sqlmodel import Session, col, select

from oncolens.config import Settings
from oncolens.errors import InvalidInput
from oncolens.services.audit import Actor
from oncolens.services.cases import CaseService
from oncolens.store.db.models import Case, CaseImage, DicomStudy, Role, User, utcnow
from oncolens.store.images import ImageStore
from oncolens.vision.prepare import RawImage
from oncolens.zoo import Zoo

CHANNEL = "dicom"
Frames = str | tuple[int, ...]  # which frames of a multi-frame instance: all, first, middle, or numbers from 1
FRAME_WORDS = ("all", "first", "middle")
SEXES = {"M": "male", "F": "female", "O": "other"}


@dataclass(frozen=True)
class StudyAnswer:
    case: Case
    sr: bytes
    captures: list[bytes]


def received(session: Session, study_uid: str, calling_ae: str, new: bool) -> bool:
    """Note an instance of a study (``new``: not had before); False when the study was analysed
    already (an instance sent again changes nothing)."""
    study = session.get(DicomStudy, study_uid)
    now = utcnow()
    if study is None:
        study = DicomStudy(study_uid=study_uid, calling_ae=calling_ae[:16], first_received_at=now)
    elif study.state != "receiving":
        return False
    study.instances += 1 if new else 0
    study.last_received_at = now
    session.add(study)
    session.commit()
    return True


def has_instance(session: Session, study: DicomStudy, sop_uid: str) -> bool:
    """Whether the study's case holds the instance (an image named after its SOP instance UID)."""
    if study.case_id is None:
        return False
    names = session.exec(select(CaseImage.original_filename).where(CaseImage.case_id == study.case_id)).all()
    return any(name == f"{sop_uid}.dcm" or name.startswith(f"{sop_uid}#") for name in names)


def recover(session: Session, inbox: dict[str, int]) -> int:
    """Studies with instances in the inbox (study UID -> how many) but no row, or a row that counts
    fewer (a listener killed between the file and the row): receiving again, counted from the files."""
    fixed = 0
    for uid, files in inbox.items():
        study = session.get(DicomStudy, uid)
        if study is None:
            study = DicomStudy(study_uid=uid, detail="found in the inbox after a restart")
        elif study.state != "receiving" or study.instances >= files:
            continue
        study.instances = files
        session.add(study)
        fixed += 1
    session.commit()
    return fixed


def due(session: Session, stable_s: float) -> list[DicomStudy]:
    """Studies nothing arrived for in ``stable_s`` seconds, oldest first."""
    quiet = utcnow() - timedelta(seconds=stable_s)
    query = select(DicomStudy).where(DicomStudy.state == "receiving", col(DicomStudy.last_received_at) <= quiet)
    return list(session.exec(query.order_by(col(DicomStudy.last_received_at))).all())


def mark(session: Session, study_uid: str, state: str, detail: str, model_id: str | None = None) -> None:
    study = session.get(DicomStudy, study_uid)
    if study is not None:
        study.state, study.detail = state, detail[:2000]
        study.model_id = model_id or study.model_id
        session.add(study)
        session.commit()


def listed(session: Session, state: str | None = None) -> list[DicomStudy]:
    query = select(DicomStudy)
    if state:
        query = query.where(DicomStudy.state == state)
    return list(session.exec(query.order_by(col(DicomStudy.last_received_at).desc())).all())


def owner(session: Session, settings: Settings) -> User:
    """The account the listener's cases belong to: ``ONCOLENS_DICOM_OWNER``, else the first admin."""
    if settings.dicom_owner:
        user = session.exec(select(User).where(User.email == settings.dicom_owner)).first()
        if user is None or not user.is_active or user.role not in (Role.admin.value, Role.clinician.value):
            raise InvalidInput(f"ONCOLENS_DICOM_OWNER={settings.dicom_owner}: no active admin or clinician account")
        return user
    first = session.exec(
        select(User).where(User.role == Role.admin.value, col(User.is_active)).order_by(col(User.id))
    ).first()
    if first is None:
        raise InvalidInput("no admin account owns the DICOM cases: make one, or set ONCOLENS_DICOM_OWNER")
    return first


def _age(header: Any) -> int | None:
    """Whole years from PatientAge (045Y; months, weeks and days are under a year), else from the
    birth and study dates."""
    age = str(header.get("PatientAge", "") or "")
    if len(age) == 4 and age[:3].isdigit():
        return int(age[:3]) if age[3] == "Y" else 0
    try:
        born = datetime.strptime(str(header.get("PatientBirthDate", "")), "%Y%m%d").date()
        seen = datetime.strptime(str(header.get("StudyDate", "")), "%Y%m%d").date()
    except ValueError:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return years if 0 <= years <= 130 else None


def patient_fields(header: Any) -> dict[str, Any]:
    """The case's patient fields from an instance's header."""
    name = str(header.get("PatientName", "") or "").replace("^", " ").strip()
    return {
        "patient_ref": str(header.get("PatientID", "") or "")[:64],
        "patient_name": " ".join(name.split())[:200],
        "patient_age": _age(header),
        "patient_sex": SEXES.get(str(header.get("PatientSex", "") or "").upper(), ""),
        "clinical_notes": f"DICOM study {header.get('StudyDescription', '') or ''}".strip()[:500],
    }


def chosen_frames(frames: Frames, count: int) -> list[int]:
    """The 0-based frames of a ``count``-frame instance that ``frames`` selects (those that exist)."""
    if frames == "all":
        return list(range(count))
    if frames == "first":
        return [0]
    if frames == "middle":
        return [count // 2]
    if isinstance(frames, str):
        raise InvalidInput(f"frames: all, first, middle or frame numbers, not {frames!r}")
    return [f - 1 for f in frames if f <= count]


def _frames(data: bytes, header: Any, frames: Frames) -> list[RawImage]:
    """An instance as the images it gives: itself, or for a multi-frame instance each chosen frame as a
    single-frame copy (same instance UID; the frame number in its name, ``<SOP UID>#frame<n>.dcm``, so
    the SR points at that frame)."""
    import pydicom

    count = int(header.get("NumberOfFrames", 1) or 1)
    if count <= 1:
        return [RawImage(data, f"{header.SOPInstanceUID}.dcm")]
    ds = pydicom.dcmread(io.BytesIO(data))
    pixels = ds.pixel_array  # every frame, colour as RGB
    photometric = "RGB" if pixels.ndim == 4 else str(ds.PhotometricInterpretation)
    out = []
    for index in chosen_frames(frames, count):
        frame = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for name in ("NumberOfFrames", "FrameIncrementPointer", "FrameTime", "PlanarConfiguration"):
            if name in frame:
                delattr(frame, name)
        frame.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        frame.set_pixel_data(pixels[index], photometric, int(ds.BitsStored), generate_instance_uid=False)
        buffer = io.BytesIO()
        frame.save_as(buffer, enforce_file_format=True)
        out.append(RawImage(buffer.getvalue(), f"{header.SOPInstanceUID}#frame{index + 1}.dcm"))
    return out


def _order(header: Any) -> tuple[int, int, str]:
    def number(name: str) -> int:
        try:
            return int(header.get(name, 0) or 0)
        except (TypeError, ValueError):
            return 0

    return number("SeriesNumber"), number("InstanceNumber"), str(header.get("SOPInstanceUID", ""))


def analyse(
    session: Session,
    store: ImageStore,
    zoo: Zoo,
    settings: Settings,
    study_uid: str,
    instances: list[bytes],
    model_id: str,
    frames: Frames = "all",
) -> StudyAnswer:
    """A complete study as a case of ``model_id`` (each instance one image; each chosen frame of a
    multi-frame instance one image), and its DICOM answers."""
    import pydicom

    from oncolens.reports.dicom import heatmap_sc

    if not instances:
        raise InvalidInput(f"study {study_uid} has no instances")
    read = [(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True), data) for data in instances]
    read.sort(key=lambda pair: _order(pair[0]))  # the study's order: series, then instance number
    headers, instances = [h for h, _ in read], [d for _, d in read]
    cases = CaseService(session, store, zoo, settings)
    actor = Actor(owner(session, settings), channel=CHANNEL)
    raw = []
    for data, header in zip(instances, headers, strict=True):
        raw += _frames(data, header, frames)
    case = cases.create_now(actor, zoo.get(model_id), raw, patient_fields(headers[0]), study_uid)
    study = session.get(DicomStudy, study_uid)
    if study is not None:  # the case is made: the study says so whatever happens to its answers
        study.case_id, study.model_id = case.id, model_id
        session.add(study)
        session.commit()
    sr = cases.dicom_sr(actor, case.id)
    captures = []
    for index, row in enumerate(cases.images_of(case)):
        _, found = cases.explain_stored(case, row)
        if found is None:
            continue
        source = cases.dicom_source(row)
        if source is None:
            continue
        sc = heatmap_sc(case.id, index, case.model_version, Image.open(io.BytesIO(found.overlay_png)), source)
        buffer = io.BytesIO()
        sc.save_as(buffer, enforce_file_format=True)
        captures.append(buffer.getvalue())
    mark(session, study_uid, "analysed", f"case {case.id}: risk {case.risk_level}", model_id)
    return StudyAnswer(case, sr, captures)
