"""Where received instances wait: ``<data>/dicom/inbox/<study UID>/<SOP instance UID>.dcm``, each
written durably (a temporary file, fsync, rename, fsync of the folder) before the C-STORE answers
success, so a listener killed at any moment loses no instance it acknowledged. Instances that cannot
be used go to ``<data>/dicom/quarantine`` with a note saying why."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Quarantined:
    path: Path
    reason: str
    at: datetime


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and UID.match(value) is not None


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)
    _fsync_folder(path.parent)


class Inbox:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "dicom" / "inbox"
        self.quarantine_dir = data_dir / "dicom" / "quarantine"
        for folder in (self.root, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def keep(self, study_uid: str, sop_uid: str, data: bytes) -> bool:
        """Write one instance durably; False when the study had it already (sent again)."""
        folder = self.root / study_uid
        folder.mkdir(exist_ok=True, mode=0o700)
        path = folder / f"{sop_uid}.dcm"
        if path.exists():
            return False
        _write(path, data)
        return True

    def files(self, study_uid: str) -> list[Path]:
        folder = self.root / study_uid
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def clear(self, study_uid: str) -> None:
        shutil.rmtree(self.root / study_uid, ignore_errors=True)

    def quarantine(self, data: bytes, reason: str) -> Path:
        """Keep an instance that cannot be used, with a note saying why."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = self.quarantine_dir / f"{stamp}-{uuid.uuid4().hex[:12]}.dcm"
        _write(path, data)
        _write(path.with_suffix(".txt"), reason.encode("utf-8"))
        return path

    def quarantined(self) -> list[Quarantined]:
        out = []
        for path in sorted(self.quarantine_dir.glob("*.dcm")):
            note = path.with_suffix(".txt")
            reason = note.read_text(encoding="utf-8") if note.exists() else ""
            out.append(Quarantined(path, reason, datetime.fromtimestamp(path.stat().st_mtime, UTC)))
        return out
