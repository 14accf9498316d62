"""Stored image files of cases: one directory, files named by random ids (never the client's name).

Files are written durably (temp file, fsync, rename, fsync of the directory) before the rows that
refer to them are committed; a crash in between leaves only unreferenced files, which
``CaseStore.sweep_orphans`` removes.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from sqlmodel import Session, select

from oncolens.db.models import CaseImage

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
