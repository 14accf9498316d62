"""Model packages installed into the database, where every replica finds them, and which version serves.

A package's files are stored once by content (``package_blobs``: a site version made by ``oncolens
adapt`` shares its parent's ``model.onnx``), its card and file list in ``model_versions``. Each
replica writes an installed version out to its own cache folder before loading it (checked again by
``ModelPackage.load``: sha256 and shapes). ``model_deployments`` is the serving history, one row per
step: the newest row of a model says which version serves (``live_version``) and which runs in shadow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from oncolens.store.db import insert_if_missing
from oncolens.store.db.models import ModelDeployment, ModelVersion, PackageBlob
from oncolens.zoo import ONE_NETWORK
from oncolens.zoo.package import CARD, ModelPackage, PackageError

READY = ".complete"  # written last into a cache folder: a folder without it is an interrupted write-out


class VersionError(ValueError):
    """An install or a serving step that cannot be done; the message says why."""


@dataclass(frozen=True)
class Deployment:
    """A model's serving state: the version that answers (None: the shipped package) and the shadow."""

    live: str | None
    shadow: str | None
    step: int  # the newest model_deployments row's id (0: none)


def package_files(directory: Path) -> list[Path]:
    """The files of a package, relative, sorted; an ensemble's kept one-network build is left out."""
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and relative.parts[0] != ONE_NETWORK and not relative.name.startswith("."):
            files.append(relative)
    return files


def install(session: Session, directory: Path, installed_by: str) -> tuple[ModelVersion, bool]:
    """Verify the package in ``directory`` (card, sha256, shapes) and store it; (row, newly installed).

    The same id and version again is accepted when it is the same package (nothing changes) and
    refused when it differs: a version names one package for good.
    """
    try:
        package = ModelPackage.load(directory, precision="fp32")
    except PackageError as exc:
        raise VersionError(f"not a valid model package: {exc}") from exc
    card = package.card
    card_text = (directory / CARD).read_text(encoding="utf-8")
    existing = find(session, card.id, card.version)
    if existing is not None:
        if existing.sha256 == card.sha256 and existing.card_json == card_text:
            return existing, False
        raise VersionError(
            f"{card.id} {card.version} is installed already as a different package; give the new one its own version"
        )
    files: dict[str, str] = {}
    for relative in package_files(directory):
        data = (directory / relative).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        insert_if_missing(session, PackageBlob.__table__, sha256=digest, size_bytes=len(data), data=data)  # type: ignore[attr-defined]
        files[relative.as_posix()] = digest
    row = ModelVersion(
        model_id=card.id,
        version=card.version,
        sha256=card.sha256,
        card_json=card_text,
        files_json=json.dumps(files, sort_keys=True),
        gate_passed=card.gate_passed,
        installed_by=installed_by,
    )
    session.add(row)
    return row, True


def find(session: Session, model_id: str, version: str) -> ModelVersion | None:
    return session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.version == version)
    ).first()


def versions(session: Session, model_id: str) -> list[ModelVersion]:
    """The versions of a model installed into the database, oldest first."""
    return list(
        session.exec(select(ModelVersion).where(ModelVersion.model_id == model_id).order_by(col(ModelVersion.id)))
    )


def state(session: Session, model_id: str) -> Deployment:
    row = session.exec(
        select(ModelDeployment).where(ModelDeployment.model_id == model_id).order_by(col(ModelDeployment.id).desc())
    ).first()
    if row is None:
        return Deployment(None, None, 0)
    return Deployment(row.live_version, row.shadow_version, row.id or 0)


def history(session: Session, model_id: str) -> list[ModelDeployment]:
    return list(
        session.exec(
            select(ModelDeployment).where(ModelDeployment.model_id == model_id).order_by(col(ModelDeployment.id))
        )
    )


def newest_step(session: Session) -> int:
    """The id of the newest serving step of any model (0: none): a replica re-reads the states when it changes."""
    return int(session.exec(select(func.coalesce(func.max(col(ModelDeployment.id)), 0))).one() or 0)


def deployed_models(session: Session) -> list[str]:
    return sorted(set(session.exec(select(ModelDeployment.model_id)).all()))


def previous_live(session: Session, model_id: str, shipped: str) -> str:
    """The version a rollback returns to: each ``promote`` pushed the version it replaced, each
    ``rollback`` popped one; the shipped version is at the bottom."""
    stack: list[str] = []
    live = shipped
    for row in history(session, model_id):
        if row.action == "promote" and row.live_version != live:
            stack.append(live)
        elif row.action == "rollback" and stack:
            stack.pop()
        live = row.live_version
    if not stack:
        raise VersionError(f"{model_id} has nothing to roll back to: {live} serves and no promotion came before it")
    return stack[-1]


def write_out(session: Session, row: ModelVersion, cache_dir: Path) -> Path:
    """The installed version as a package folder in ``cache_dir`` (written once, atomically, then reused)."""
    digest = hashlib.sha256(row.card_json.encode("utf-8")).hexdigest()[:12]
    target = cache_dir / row.model_id / f"{row.version}-{digest}"
    if (target / READY).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = json.loads(row.files_json)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent))
    try:
        for relative, blob_sha in files.items():
            blob = session.get(PackageBlob, blob_sha)
            if blob is None:
                raise VersionError(f"{row.model_id} {row.version}: the stored file {relative} is missing")
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob.data)
        (staging / READY).write_text(row.version + "\n")
        if target.exists() and not (target / READY).is_file():  # an interrupted earlier write-out
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / READY).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another worker wrote it out first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
