"""Model versions at run time: install a package where every replica finds it, run a version in shadow,
promote one, roll back one step; and the loop that makes each server process serve what the
database says, within ``ONCOLENS_MODEL_POLL_S`` seconds, without a restart.

Every step is an admin's, with a reason, and is audited. A site version whose acceptance gate failed
cannot be promoted (it may run in shadow, where no clinician sees it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from oncolens.errors import InvalidInput, NotFound, PermissionDenied
from oncolens.services.audit import Actor, audit_by
from oncolens.store import packages
from oncolens.store.db.models import Case, ModelDeployment, ModelVersion, Role
from oncolens.store.packages import VersionError
from oncolens.zoo import ModelNotFound, PackageError, Zoo

log = logging.getLogger("oncolens.versions")

WHY_MAX = 1000


@dataclass(frozen=True)
class Agreement:
    """How often a shadow version named the same class and the same risk level as the version that answered."""

    cases: int
    same_class: int
    same_level: int


@dataclass(frozen=True)
class VersionInfo:
    model_id: str
    version: str
    source: str  # "shipped" (the package folders) or "installed" (the database)
    live: bool
    shadow: bool
    gate_passed: bool | None
    installed_by: str
    installed_at: str | None
    sha256: str
    agreement: Agreement | None

    def to_dict(self) -> dict[str, object]:
        data = self.__dict__ | {"agreement": self.agreement.__dict__ if self.agreement else None}
        return dict(data)


def require_admin(actor: Actor) -> None:
    if actor.user.role != Role.admin.value:
        raise PermissionDenied(f"managing model versions needs the admin role; you are {actor.user.role}")


def _why(why: str) -> str:
    why = why.strip()
    if not why:
        raise InvalidInput("why: say why (it goes into the audit trail with the step)")
    if len(why) > WHY_MAX:
        raise InvalidInput(f"why: at most {WHY_MAX} characters")
    return why


class VersionService:
    """The versions of the zoo's models in one database session."""

    def __init__(self, session: Session, zoo: Zoo) -> None:
        self.session, self.zoo = session, zoo

    def _model(self, model_id: str) -> str:
        if model_id not in self.zoo.shipped:
            raise NotFound(f"no model {model_id!r}; available: {', '.join(sorted(self.zoo.shipped)) or 'none'}")
        return self.zoo.shipped_version(model_id)

    def install(self, actor: Actor, directory: Path) -> tuple[ModelVersion, bool]:
        """Verify and store a package (audited ``model_install``); its model must be one this server has."""
        require_admin(actor)
        try:
            row, new = packages.install(self.session, directory, actor.user.email)
        except VersionError as exc:
            raise InvalidInput(str(exc)) from exc
        shipped = self._model(row.model_id)
        if row.version == shipped:
            self.session.rollback()
            raise InvalidInput(f"{row.model_id} {row.version} is the shipped version; give the package its own version")
        if new:
            gate = {True: "gate passed", False: "gate FAILED (cannot be promoted)", None: "no gate"}[row.gate_passed]
            audit_by(self.session, actor, "model_install", None, f"{row.model_id} {row.version} ({gate})")
            self.session.commit()
        return row, new

    def versions(self, model_id: str) -> list[VersionInfo]:
        """The shipped version and every installed one, with which serves, which runs in shadow, and the
        shadow's agreement with the version that answered."""
        shipped = self._model(model_id)
        state = packages.state(self.session, model_id)
        live = state.live or shipped
        rows: list[VersionInfo] = [
            VersionInfo(
                model_id, shipped, "shipped", live == shipped, state.shadow == shipped, None, "", None, "", None
            )
        ]
        for row in packages.versions(self.session, model_id):
            rows.append(
                VersionInfo(
                    model_id,
                    row.version,
                    "installed",
                    live == row.version,
                    state.shadow == row.version,
                    row.gate_passed,
                    row.installed_by,
                    row.installed_at.isoformat() if row.installed_at else None,
                    row.sha256,
                    None,
                )
            )
        return [r if r.live else _with_agreement(r, self.agreement(model_id, r.version)) for r in rows]

    def agreement(self, model_id: str, version: str) -> Agreement | None:
        stored = self.session.exec(
            select(Case.top_class, Case.risk_level, Case.shadow_result_json).where(
                Case.model_id == model_id, Case.shadow_version == version
            )
        ).all()
        if not stored:
            return None
        same_class = same_level = 0
        for top_class, risk_level, shadow_json in stored:
            shadow = json.loads(shadow_json or "{}")
            same_class += shadow.get("top_class") == top_class
            same_level += shadow.get("risk_level") == risk_level
        return Agreement(len(stored), same_class, same_level)

    def _known(self, model_id: str, version: str) -> tuple[str, ModelVersion | None]:
        shipped = self._model(model_id)
        if version == shipped:
            return shipped, None
        row = packages.find(self.session, model_id, version)
        if row is None:
            known = [shipped] + [r.version for r in packages.versions(self.session, model_id)]
            raise NotFound(f"{model_id} has no version {version!r}; known: {', '.join(known)}")
        return shipped, row

    def _step(self, actor: Actor, model_id: str, action: str, live: str, shadow: str | None, why: str) -> None:
        self.session.add(
            ModelDeployment(
                model_id=model_id, action=action, live_version=live, shadow_version=shadow, by=actor.user.email, why=why
            )
        )
        words = {"promote": f"{live} serves", "rollback": f"back to {live}", "shadow": f"{shadow} in shadow"}
        detail = f"{model_id}: {words.get(action, 'shadow stopped')}; why: {why}"
        audit_by(self.session, actor, f"model_{action}", None, detail)
        self.session.commit()

    def shadow(self, actor: Actor, model_id: str, version: str, why: str) -> None:
        """Run ``version`` on every new case of the model as well (stored beside the case, never shown)."""
        require_admin(actor)
        why = _why(why)
        shipped, _ = self._known(model_id, version)
        state = packages.state(self.session, model_id)
        live = state.live or shipped
        if version == live:
            raise InvalidInput(f"{model_id} {version} is the version that serves; a shadow must be another one")
        self._step(actor, model_id, "shadow", live, version, why)

    def unshadow(self, actor: Actor, model_id: str, why: str) -> None:
        require_admin(actor)
        why = _why(why)
        shipped = self._model(model_id)
        state = packages.state(self.session, model_id)
        if state.shadow is None:
            raise InvalidInput(f"{model_id} runs no version in shadow")
        self._step(actor, model_id, "unshadow", state.live or shipped, None, why)

    def promote(self, actor: Actor, model_id: str, version: str, why: str) -> None:
        """Serve ``version`` from now on (every replica within ONCOLENS_MODEL_POLL_S seconds)."""
        require_admin(actor)
        why = _why(why)
        shipped, row = self._known(model_id, version)
        if row is not None and row.gate_passed is False:
            raise InvalidInput(
                f"{model_id} {version} failed its acceptance gate (its card's lineage says which criterion); "
                "it cannot be promoted"
            )
        state = packages.state(self.session, model_id)
        if version == (state.live or shipped):
            raise InvalidInput(f"{model_id} {version} serves already")
        shadow = None if state.shadow == version else state.shadow
        self._step(actor, model_id, "promote", version, shadow, why)

    def rollback(self, actor: Actor, model_id: str, why: str) -> str:
        """Serve the version that served before the newest promotion still in force; returns it."""
        require_admin(actor)
        why = _why(why)
        shipped = self._model(model_id)
        try:
            previous = packages.previous_live(self.session, model_id, shipped)
        except VersionError as exc:
            raise InvalidInput(str(exc)) from exc
        state = packages.state(self.session, model_id)
        shadow = None if state.shadow == previous else state.shadow
        self._step(actor, model_id, "rollback", previous, shadow, why)
        return previous

    def history(self, model_id: str) -> list[ModelDeployment]:
        self._model(model_id)
        return packages.history(self.session, model_id)


def _with_agreement(info: VersionInfo, agreement: Agreement | None) -> VersionInfo:
    return VersionInfo(**(info.__dict__ | {"agreement": agreement}))


class VersionSync:
    """Makes one process's zoo serve what the database says (run at start-up and every few seconds)."""

    def __init__(self, engine: Engine, zoo: Zoo, cache_dir: Path) -> None:
        self.engine, self.zoo, self.cache_dir = engine, zoo, cache_dir
        self.step = -1

    def run(self) -> bool:
        """Apply the serving states if any changed since the last run; True if it looked at them."""
        with Session(self.engine) as session:
            step = packages.newest_step(session)
            if step == self.step:
                return False
            for model_id in packages.deployed_models(session):
                if model_id in self.zoo.shipped:
                    self._apply(session, model_id)
            self.step = step
        return True

    def _folder(self, session: Session, model_id: str, version: str | None) -> Path | None:
        if version is None or version == self.zoo.shipped_version(model_id):
            return None
        row = packages.find(session, model_id, version)
        if row is None:
            raise VersionError(f"{model_id} {version} is not installed")
        return packages.write_out(session, row, self.cache_dir)

    def _apply(self, session: Session, model_id: str) -> None:
        state = packages.state(session, model_id)
        try:
            served = self.zoo.serve(model_id, self._folder(session, model_id, state.live))
            if state.shadow is None:
                self.zoo.set_shadow(model_id, None)
            else:
                current = self.zoo.shadow_of(model_id)
                if current is None or current.version != state.shadow:
                    folder = self._folder(session, model_id, state.shadow)
                    shadow = self.zoo.load_folder(folder if folder is not None else self.zoo.shipped[model_id])
                    self.zoo.set_shadow(model_id, shadow)
        except (VersionError, PackageError, ModelNotFound, OSError) as exc:
            log.error("model %s: cannot serve the database's state (%s); it keeps what it served", model_id, exc)
            return
        log.info(
            "model %s: %s serves%s",
            model_id,
            served.version,
            f", {state.shadow} in shadow" if state.shadow else "",
        )
