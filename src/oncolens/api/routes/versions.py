"""Model versions and monitoring (admins only): install a package, run a version in shadow, promote,
roll back, and the monitoring of a model in use. Every step is audited with who and why."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, File, Query, UploadFile
from pydantic import BaseModel, Field

from oncolens.errors import InvalidInput
from oncolens.http.deps import ActorDep, AdminUser, SessionDep, SettingsDep, ZooDep
from oncolens.services.monitoring import monitoring
from oncolens.services.versions import WHY_MAX, VersionService, require_admin

router = APIRouter(prefix="/models", tags=["model versions"])

MAX_PACKAGE_FILES = 64
MAX_PACKAGE_BYTES = 256 * 2**20  # a package's files unpacked (model files are at most 25 MiB each)


class Step(BaseModel):
    why: str = Field(min_length=1, max_length=WHY_MAX, description="Why (kept in the audit trail with the step).")


class AgreementPublic(BaseModel):
    cases: int = Field(description="New cases this version answered in shadow.")
    same_class: int = Field(description="... of which it named the class the serving version named.")
    same_level: int = Field(description="... of which it gave the same risk level.")


class VersionPublic(BaseModel):
    version: str
    source: Literal["shipped", "installed"]
    live: bool = Field(description="This version answers the model's cases.")
    shadow: bool = Field(description="This version also runs on every new case; its answer is never shown.")
    gate_passed: bool | None = Field(description="A site version's acceptance gate (None: not a site version).")
    installed_by: str
    installed_at: str | None
    sha256: str
    agreement: AgreementPublic | None


class DeploymentPublic(BaseModel):
    at: str
    action: str
    live_version: str
    shadow_version: str | None
    by: str
    why: str


class VersionsPublic(BaseModel):
    model_id: str
    serving: str
    shadow: str | None
    versions: list[VersionPublic]
    history: list[DeploymentPublic]


def _versions(service: VersionService, model_id: str) -> VersionsPublic:
    rows = service.versions(model_id)
    return VersionsPublic(
        model_id=model_id,
        serving=next(r.version for r in rows if r.live),
        shadow=next((r.version for r in rows if r.shadow), None),
        versions=[VersionPublic(**r.to_dict()) for r in rows],
        history=[
            DeploymentPublic(
                at=step.at.isoformat(),
                action=step.action,
                live_version=step.live_version,
                shadow_version=step.shadow_version,
                by=step.by,
                why=step.why,
            )
            for step in service.history(model_id)
        ],
    )


@router.get("/{model_id}/versions", response_model=VersionsPublic)
def list_versions(model_id: str, _: AdminUser, session: SessionDep, zoo: ZooDep) -> VersionsPublic:
    """The shipped version and every installed one: which serves, which runs in shadow (with its
    agreement with the serving version), each site version's gate, and the serving history."""
    return _versions(VersionService(session, zoo), model_id)


def _unpack(data: bytes, folder: Path) -> Path:
    """A zip of one package (its files at the top, or in one folder) unpacked safely into ``folder``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidInput("the upload is not a zip archive of a model package") from None
    members = [m for m in archive.infolist() if not m.is_dir()]
    if not members or len(members) > MAX_PACKAGE_FILES:
        raise InvalidInput(f"a package archive holds 1 to {MAX_PACKAGE_FILES} files; this one holds {len(members)}")
    if sum(m.file_size for m in members) > MAX_PACKAGE_BYTES:
        raise InvalidInput(f"the package unpacks to more than {MAX_PACKAGE_BYTES // 2**20} MB")
    written = 0
    for member in members:
        path = PurePosixPath(member.filename)
        if path.is_absolute() or ".." in path.parts or (member.external_attr >> 28) == 0xA:
            raise InvalidInput(f"the archive member {member.filename!r} points outside the package")
        target = folder.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as source, target.open("wb") as sink:
            while chunk := source.read(1 << 20):  # the sizes in the archive's index are not trusted
                written += len(chunk)
                if written > MAX_PACKAGE_BYTES:
                    raise InvalidInput(f"the package unpacks to more than {MAX_PACKAGE_BYTES // 2**20} MB")
                sink.write(chunk)
    roots = [p for p in folder.iterdir()]
    return roots[0] if len(roots) == 1 and roots[0].is_dir() else folder


@router.post("/{model_id}/versions", response_model=VersionsPublic, status_code=201)
async def install_version(
    model_id: str,
    actor: ActorDep,
    session: SessionDep,
    zoo: ZooDep,
    file: Annotated[UploadFile, File(description="A zip of the package folder (card.json, model.onnx, ...).")],
) -> VersionsPublic:
    """Install a package (e.g. one written by ``oncolens adapt``) into the database, where every replica
    finds it; verified first (card, sha256, shapes). It serves only once promoted."""
    require_admin(actor)  # before anything is unpacked
    data = await file.read()

    def install() -> VersionsPublic:
        service = VersionService(session, zoo)
        with tempfile.TemporaryDirectory(prefix="oncolens-package-") as tmp:
            folder = _unpack(data, Path(tmp))
            try:
                card_id = json.loads((folder / "card.json").read_text(encoding="utf-8")).get("id")
            except (OSError, ValueError, AttributeError):
                raise InvalidInput("the archive holds no readable card.json") from None
            if card_id != model_id:
                raise InvalidInput(f"the package is a version of {card_id!r}, not of {model_id}")
            service.install(actor, folder)
        return _versions(service, model_id)

    return await anyio.to_thread.run_sync(install)


@router.post("/{model_id}/versions/{version}/shadow", response_model=VersionsPublic)
def shadow_version(
    model_id: str, version: str, body: Step, actor: ActorDep, session: SessionDep, zoo: ZooDep
) -> VersionsPublic:
    """Run ``version`` on every new case as well: its answer is stored beside the case, never shown."""
    service = VersionService(session, zoo)
    service.shadow(actor, model_id, version, body.why)
    return _versions(service, model_id)


@router.post("/{model_id}/shadow/stop", response_model=VersionsPublic)
def stop_shadow(model_id: str, body: Step, actor: ActorDep, session: SessionDep, zoo: ZooDep) -> VersionsPublic:
    """Stop running the shadow version."""
    service = VersionService(session, zoo)
    service.unshadow(actor, model_id, body.why)
    return _versions(service, model_id)


@router.post("/{model_id}/versions/{version}/promote", response_model=VersionsPublic)
def promote_version(
    model_id: str, version: str, body: Step, actor: ActorDep, session: SessionDep, zoo: ZooDep
) -> VersionsPublic:
    """Serve ``version`` from now on: every server process and replica within ONCOLENS_MODEL_POLL_S
    seconds, without a restart. A site version whose acceptance gate failed is refused."""
    service = VersionService(session, zoo)
    service.promote(actor, model_id, version, body.why)
    return _versions(service, model_id)


@router.post("/{model_id}/rollback", response_model=VersionsPublic)
def rollback_version(model_id: str, body: Step, actor: ActorDep, session: SessionDep, zoo: ZooDep) -> VersionsPublic:
    """Serve the version that served before the newest promotion (one step back)."""
    service = VersionService(session, zoo)
    service.rollback(actor, model_id, body.why)
    return _versions(service, model_id)


@router.get("/{model_id}/monitoring")
def model_monitoring(
    model_id: str,
    _: AdminUser,
    session: SessionDep,
    zoo: ZooDep,
    settings: SettingsDep,
    period: Literal["week", "month"] = "month",
    start: Annotated[date | None, Query(description="First day (UTC) of the cases counted.")] = None,
    end: Annotated[date | None, Query(description="Last day (UTC) of the cases counted, inclusive.")] = None,
) -> dict[str, Any]:
    """Per week or month and over the whole range: cases, reviewed cases, sensitivity / specificity /
    AUROC on the cases with a reference class (95 % intervals), a reliability table, out-of-domain and
    quality-warning rates, and the drift of P(malignant) against the card's test distribution
    (``drift``: flag, PSI, KS p-value)."""
    card = zoo.get(model_id).card
    return monitoring(session, card, settings, period, start, end)
