"""Which model a study goes to: ``[[route]]`` tables of a TOML file (``ONCOLENS_DICOM_ROUTES``), each
with any of ``modality``, ``body_part`` (BodyPartExamined, case-insensitive), ``study_description``
(a substring, case-insensitive) and ``calling_ae``, and the ``model`` id. The first route whose given
keys all match wins; a study no route matches is kept and listed, not analysed. ``frames`` says which
frames of a multi-frame instance (a cine loop) are analysed: ``"all"`` (the default), ``"first"``,
``"middle"``, or a list of frame numbers from 1."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from oncolens.services.studies import FRAME_WORDS, Frames

KEYS = ("modality", "body_part", "study_description", "calling_ae")


@dataclass(frozen=True)
class StudyHeaders:
    modality: str
    body_part: str
    study_description: str
    calling_ae: str


@dataclass(frozen=True)
class Route:
    model: str
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    calling_ae: str | None = None
    frames: Frames = "all"

    def matches(self, study: StudyHeaders) -> bool:
        if self.modality is not None and study.modality.strip().upper() != self.modality.upper():
            return False
        if self.body_part is not None and study.body_part.strip().upper() != self.body_part.upper():
            return False
        if self.study_description is not None and self.study_description.lower() not in study.study_description.lower():
            return False
        return self.calling_ae is None or study.calling_ae.strip() == self.calling_ae

    def describe(self) -> str:
        given = [f"{key}={getattr(self, key)!r}" for key in KEYS if getattr(self, key) is not None]
        return f"{' '.join(given) or 'any study'} -> {self.model}"


def load_routes(path: Path | None, models: list[str]) -> list[Route]:
    """The routes of a TOML file, checked: ValueError naming the file, the route and what is wrong."""
    if path is None:
        return []
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8")).get("route", [])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the routes: {exc}") from None
    if not isinstance(tables, list):
        raise ValueError(f"{path}: routes are [[route]] tables")
    routes = []
    for number, table in enumerate(tables, start=1):
        unknown = sorted(set(table) - {*KEYS, "model", "frames"})
        if unknown:
            raise ValueError(
                f"{path}: route {number} has unknown keys {', '.join(unknown)}; known: model, {', '.join(KEYS)}"
            )
        model = table.get("model")
        if model not in models:
            raise ValueError(f"{path}: route {number} names model {model!r}, not one of {', '.join(models)}")
        if not all(isinstance(table.get(key, ""), str) for key in KEYS):
            raise ValueError(f"{path}: route {number}: {', '.join(KEYS)} are strings")
        frames = table.get("frames", "all")
        if isinstance(frames, list) and frames and all(isinstance(f, int) and f >= 1 for f in frames):
            frames = tuple(frames)
        elif frames not in FRAME_WORDS:
            raise ValueError(f"{path}: route {number}: frames is all, first, middle or a list of frame numbers from 1")
        routes.append(Route(model=model, frames=frames, **{key: table[key] for key in KEYS if key in table}))
    return routes


def route(routes: list[Route], study: StudyHeaders) -> Route | None:
    return next((r for r in routes if r.matches(study)), None)
