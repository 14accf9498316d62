"""Cases: one or more images of a patient, their stored files and their results in the database.

A case is written atomically from the client's point of view: image files are written and fsynced
first, then the rows are committed in one transaction; if anything fails before the commit the
files are removed again. A crash between the two leaves only unreferenced files, which
``CaseStore.sweep_orphans`` removes at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete
from sqlmodel import Session, col, select

from oncolens.analysis import CaseResult
from oncolens.db.models import AuditEvent, Case, CaseImage, User
from oncolens.imaging import DecodedImage

# Every format decode_image accepts (the test pins this), keyed by the format sniffed from the bytes.
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "DICOM": "application/dicom",
}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "DICOM": ".dcm"}
BROWSER_IMAGE_TYPES = frozenset(t for t in MEDIA_TYPES.values() if t not in ("image/tiff", "application/dicom"))


@dataclass(frozen=True)
class PatientFields:
    patient_ref: str = ""
    patient_name: str = ""
    patient_age: int | None = None
    patient_sex: str = ""
    patient_email: str = ""
    clinical_notes: str = ""


@dataclass(frozen=True)
class UploadedImage:
    data: bytes
    decoded: DecodedImage
    filename: str | None


class CaseStore:
    """Image files of cases under one directory, named by random ids (never the client's name)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, stored_name: str) -> Path:
        return self.root / stored_name[:2] / stored_name

    def write(self, data: bytes, image_format: str) -> str:
        """Write bytes durably (temp file, fsync, rename, fsync dir); return the stored name."""
        name = uuid.uuid4().hex + EXTENSIONS[image_format]
        final = self.path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".part")
        # Patient images: readable by the server's user only.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(final)
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return name

    def remove(self, names: list[str]) -> None:
        for name in names:
            self.path(name).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return [p for p in self.root.glob("*/*") if p.is_file()] if self.root.is_dir() else []

    def sweep_orphans(self, session: Session, older_than_s: float = 600.0, partial_older_than_s: float = 60.0) -> int:
        """Delete files no case refers to (left by a crash before commit); returns how many.

        A finished file waits ``older_than_s`` (its case may be committing); a ``.part`` file is a
        write that never finished (a write takes well under a second), so it goes after
        ``partial_older_than_s``. The names are read before the files are listed, so a file whose
        case commits in between is younger than the grace period and stays.
        """
        now = time.time()
        known = set(session.exec(select(CaseImage.stored_name)).all())
        removed = 0
        for path in self.files():
            partial = path.name.endswith(".part")
            grace = partial_older_than_s if partial else older_than_s
            try:
                old = path.stat().st_mtime < now - grace
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
            if old and (partial or path.name not in known):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def audit(
    session: Session, user: User | None, action: str, case_id: str | None = None, detail: str = "", client: str = ""
) -> None:
    """Add an audit event to the session (committed with the change it records)."""
    session.add(
        AuditEvent(
            user_id=user.id if user else None,
            actor=user.email if user else "",
            action=action,
            case_id=case_id,
            detail=detail,
            client=client[:64],
        )
    )


def create_case(
    session: Session,
    store: CaseStore,
    owner: User,
    result: CaseResult,
    images: list[UploadedImage],
    patient: PatientFields,
    client: str = "",
) -> Case:
    """Store the images and the case with its per-image and aggregated results, all or nothing."""
    written: list[str] = []
    try:
        for image in images:
            written.append(store.write(image.data, image.decoded.format))
        agg = result.aggregate
        case = Case(
            owner_id=owner.id,  # type: ignore[arg-type]
            model_id=result.model_id,
            model_version=result.model_version,
            top_class=agg.top_class,
            p_malignant=agg.p_malignant,
            risk_level=agg.risk_level,
            recommendation=agg.recommendation,
            aggregation_rule=result.aggregation_rule,
            result_json=json.dumps(agg.to_dict()),
            **patient.__dict__,
        )
        session.add(case)
        for image, stored, image_result in zip(images, written, result.images, strict=True):
            session.add(
                CaseImage(
                    case_id=case.id,
                    position=image_result.index,
                    original_filename=(image.filename or "")[:255],
                    stored_name=stored,
                    media_type=MEDIA_TYPES[image.decoded.format],
                    width=image.decoded.width,
                    height=image.decoded.height,
                    size_bytes=len(image.data),
                    sha256=hashlib.sha256(image.data).hexdigest(),
                    result_json=json.dumps(image_result.assessment.to_dict()),
                )
            )
        audit(
            session,
            owner,
            "create",
            case.id,
            f"{result.model_id}: {len(images)} image(s), risk {agg.risk_level}",
            client,
        )
        session.commit()
    except BaseException:
        session.rollback()
        store.remove(written)
        raise
    return case


def delete_case(session: Session, store: CaseStore, case: Case, user: User, client: str = "") -> None:
    """Delete a case, its image rows and then its files (files go only once the rows are gone)."""
    names = list(session.exec(select(CaseImage.stored_name).where(CaseImage.case_id == case.id)))
    session.exec(delete(CaseImage).where(col(CaseImage.case_id) == case.id))
    audit(session, user, "delete", case.id, f"{case.model_id} case of patient ref {case.patient_ref!r}", client)
    session.delete(case)
    session.commit()
    store.remove(names)
