"""The model card as a typed model: the contract between training and serving.

A package's ``card.json`` is validated when the package loads; a malformed card is refused with a
message naming the field. The risk policy is checked too: its thresholds rise strictly, so every
level it lists can be returned (a level that would be empty is left out of the card, not kept
unreachable). Cards of an older ``schema_version`` are upgraded by ``upgrade_card``.
"""

from __future__ import annotations

import itertools
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from oncolens.zoo.preprocess import InputSpec

SCHEMA_VERSION = 2


class CardError(ValueError):
    """A card that does not follow the contract; the message names the field."""


class RiskLevel(StrEnum):
    """The levels a risk policy may use, from lowest to highest, and ``indeterminate``: the answer for
    an image the model was not made for (out of domain), which no policy may list."""

    low = "low"
    borderline = "borderline"
    moderate = "moderate"
    high = "high"
    indeterminate = "indeterminate"


LEVEL_ORDER: dict[RiskLevel, int] = {
    level: rank for rank, level in enumerate(RiskLevel) if level != RiskLevel.indeterminate
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Open(BaseModel):
    """A section whose known fields are typed and whose further fields are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ClassInfo(_Strict):
    id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1)
    description: str = ""
    malignant: bool


class InputInfo(_Strict):
    size: int = Field(ge=32)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: Literal["squash", "center_crop", "pad"] = "squash"
    grayscale: bool = False
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"
    test_time_views: list[str] = Field(default_factory=lambda: ["identity"])
    feature_offset_px: tuple[float, float] = (0.0, 0.0)

    @field_validator("std")
    @classmethod
    def _positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every std must be positive")
        return value

    def spec(self) -> InputSpec:
        return InputSpec(self.size, self.mean, self.std, self.resize, self.grayscale)


class Calibration(_Open):
    method: str
    temperature: float = Field(gt=0)
    logit_bias: list[float] | None = None
    fitted_on: str = "val"


class LevelTest(_Strict):
    """What a level meant on the test split: shares of its malignant and benign images."""

    malignant_at_or_above: float | None = Field(None, ge=0.0, le=1.0)
    benign_at_or_above: float | None = Field(None, ge=0.0, le=1.0)
    malignant_here: float | None = Field(None, ge=0.0, le=1.0)
    benign_here: float | None = Field(None, ge=0.0, le=1.0)


class RiskLevelRule(_Strict):
    level: RiskLevel
    min: float = Field(ge=0.0, le=1.0)
    recommendation: str = Field(min_length=1)
    basis: str = ""  # the val operating point the level starts at, in words
    test: LevelTest | None = None

    @field_validator("level")
    @classmethod
    def _not_indeterminate(cls, value: RiskLevel) -> RiskLevel:
        if value == RiskLevel.indeterminate:
            raise ValueError("'indeterminate' is the answer for out-of-domain images, not a level of the policy")
        return value


class RiskPolicy(_Open):
    score: Literal["p_malignant"] = "p_malignant"
    levels: list[RiskLevelRule] = Field(min_length=1)
    malignant_threshold: float = Field(0.5, ge=0.0, le=1.0)
    chosen_on: str = "val"
    reasoning: str = ""

    @model_validator(mode="after")
    def _reachable(self) -> RiskPolicy:
        levels = self.levels
        if levels[0].min != 0.0:
            raise ValueError(
                f"the first level ({levels[0].level}) must start at min 0.0, so every P(malignant) has one"
            )
        for lower, upper in itertools.pairwise(levels):
            if LEVEL_ORDER[upper.level] <= LEVEL_ORDER[lower.level]:
                raise ValueError(f"levels out of order: {upper.level} after {lower.level}")
            if upper.min <= lower.min:
                raise ValueError(
                    f"thresholds must rise strictly: {upper.level} starts at {upper.min}, not above "
                    f"{lower.level}'s {lower.min}, so {lower.level} could never be returned"
                )
        return self

    @property
    def borders(self) -> list[float]:
        """Where each level after the first starts."""
        return [level.min for level in self.levels[1:]]

    def plain_words(self) -> list[str]:
        """What each level meant on the test split, in words a clinician reads ("" where not measured)."""
        positives = str(getattr(self, "positives", "") or "malignant cases")
        negatives = str(getattr(self, "negatives", "") or "benign cases")
        out = []
        for index, level in enumerate(self.levels):
            t = level.test
            if t is None or t.malignant_here is None or t.benign_here is None:
                out.append("")
            elif index == 0:
                out.append(
                    f"In the test images, {round(t.malignant_here * 100)} of 100 {positives} and "
                    f"{round(t.benign_here * 100)} of 100 {negatives} were at this level."
                )
            else:
                out.append(
                    f"Of 100 {positives} in the test images, {round((t.malignant_at_or_above or 0) * 100)} were at "
                    f"this level or above; of 100 {negatives}, {round((t.benign_at_or_above or 0) * 100)}."
                )
        return out

    def level_for(self, p: float) -> RiskLevelRule:
        """The highest level whose ``min`` ``p`` reaches."""
        chosen = self.levels[0]
        for level in self.levels:
            if p >= level.min:
                chosen = level
        return chosen


class Decision(_Open):
    """How the top class is chosen from the calibrated probabilities (which stay as they are).

    ``argmax``: the most probable class. ``offsets``: the class with the largest log p + offset, e.g.
    logit adjustment (offset -tau * log prior), which trades accuracy for recall of rare classes, or a
    two-class model's malignant threshold written as offsets so the top class agrees with ``is_malignant``.
    """

    rule: Literal["argmax", "offsets"] = "argmax"
    class_offsets: list[float] | None = None
    objective: str = ""
    chosen_on: str = "val"
    reasoning: str = ""

    @model_validator(mode="after")
    def _offsets_given(self) -> Decision:
        if self.rule == "offsets" and not self.class_offsets:
            raise ValueError("rule 'offsets' needs class_offsets")
        return self

    def top(self, probs: np.ndarray) -> np.ndarray:
        """[N] index of the chosen class of each row of ``probs`` [N, C]."""
        if self.rule == "argmax" or not self.class_offsets:
            return np.asarray(probs.argmax(axis=1))
        scores = np.log(np.clip(probs, 1e-12, None)) + np.asarray(self.class_offsets)
        return np.asarray(scores.argmax(axis=1))


class Aggregation(_Strict):
    rule: Literal["mean", "max_malignant"] = "mean"


class Head(_Strict):
    """The linear head's weights (class-activation maps need them), float32 little-endian, base64."""

    weight_shape: tuple[int, int]
    weight_f32_b64: str
    bias_f32_b64: str | None = None


class DomainInfo(_Open):
    """The out-of-domain model (``file`` in the package) and what it was measured to do."""

    method: str
    file: str = "domain.npz"
    dims: int = Field(ge=1)
    threshold: float = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    flagged: dict[str, Any] = Field(default_factory=dict)


class QualityInfo(_Strict):
    """Image-quality limits from the training images (see ``domain.QualityLimits``)."""

    min_sharpness: float = Field(ge=0)
    min_brightness: float = Field(ge=0, le=1)
    max_brightness: float = Field(ge=0, le=1)
    max_dark_clipped: float = Field(ge=0, le=1)
    max_bright_clipped: float = Field(ge=0, le=1)
    min_side: int = Field(ge=1)


class Int8Info(_Strict):
    """The int8 (quantized) copy of the model and the gate it had to pass before it may serve.

    ``gate`` holds both files' figures on val and test, the golden samples' largest probability
    change and the heat-maps' correlation; ``passed`` is False when any criterion failed, and then
    no int8 file ships (``file`` and ``sha256`` are empty) and the package serves fp32.
    """

    passed: bool
    file: str = ""
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    method: str
    calibration: dict[str, Any] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _file_when_passed(self) -> Int8Info:
        if self.passed and not (self.file and self.sha256):
            raise ValueError("a passed int8 model needs its file and sha256")
        return self


class DatasetInfo(_Open):
    name: str
    title: str = ""
    citation: str = ""
    license: str = ""
    url: str = ""
    excluded_labels: list[str] = Field(default_factory=list)
    report_by: list[str] = Field(default_factory=list)
    counts: dict[str, Any] = Field(default_factory=dict)

    @property
    def licence_flag(self) -> str:
        """``non-commercial``, ``licence unverified`` or ``""``: what a user must know before use."""
        text = self.license.lower()
        if "non-commercial" in text or "nc" in text.replace("-", " ").split():
            return "non-commercial"
        if not text or "not verified" in text or "no licence" in text:
            return "licence unverified"
        return ""

    @property
    def no_commercial_use(self) -> bool:
        """True unless the licence is known to allow commercial use: a non-commercial licence, one not
        verified, or terms that say not to use it commercially."""
        text = " ".join(self.license.lower().split())
        return bool(self.licence_flag) or "not use commercially" in text or "no commercial" in text


class ModelCard(_Strict):
    """What a package says about its model; see DESIGN.md, "The model package"."""

    schema_version: Literal[2] = 2
    id: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(min_length=1, max_length=32)
    title: str
    modality: str
    organ: str
    use_for: str = ""
    # How the summed probability of the malignant classes and those classes are named to the user:
    # "P(suspicious)" / "suspicious" where the classes are a suspicion grade (thyroid TI-RADS), not a diagnosis.
    score_label: str = Field("P(malignant)", min_length=1, max_length=40)
    positive_label: str = Field("malignant", min_length=1, max_length=40)
    intended_use: str
    limitations: list[str]
    disclaimer: str
    classes: list[ClassInfo] = Field(min_length=2)
    input: InputInfo
    outputs: dict[str, list[int]] = Field(default_factory=dict)
    parameters: int | None = None
    calibration: Calibration
    risk_policy: RiskPolicy
    aggregation: Aggregation = Aggregation()
    decision: Decision = Decision()
    metrics: dict[str, Any]
    metrics_val: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetInfo
    training: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    head: Head
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    domain: DomainInfo | None = None
    quality: QualityInfo | None = None
    int8: Int8Info | None = None
    # What monitoring compares a site's cases with: the test split's P(malignant), sorted
    # (``monitoring.p_malignant_test``).
    monitoring: dict[str, Any] = Field(default_factory=dict)
    # A site version's origin (``oncolens adapt``): parent id/version/sha256, the dataset, the acceptance gate.
    lineage: dict[str, Any] | None = None

    @property
    def gate_passed(self) -> bool | None:
        """A site version's acceptance gate: True passed, False failed, None: not a site version."""
        gate = (self.lineage or {}).get("gate")
        return bool(gate.get("passed")) if isinstance(gate, dict) else None

    @property
    def build(self) -> str:
        """What answers: ``ensemble of k`` (k tails on one shared front, one graph) or ``one network``."""
        ensemble = self.training.get("ensemble") if self.training.get("method") == "ensemble" else None
        return f"ensemble of {ensemble['members']}" if isinstance(ensemble, dict) else "one network"

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids repeat: {ids}")
        if not any(c.malignant for c in self.classes):
            raise ValueError("no class is marked malignant: P(malignant) and the risk policy would be meaningless")
        if self.head.weight_shape[0] != len(ids):
            raise ValueError(f"head.weight_shape {list(self.head.weight_shape)} does not match {len(ids)} classes")
        if self.calibration.logit_bias is not None and len(self.calibration.logit_bias) != len(ids):
            raise ValueError(
                f"calibration.logit_bias has {len(self.calibration.logit_bias)} values for {len(ids)} classes"
            )
        offsets = self.decision.class_offsets
        if offsets is not None and len(offsets) != len(ids):
            raise ValueError(f"decision.class_offsets has {len(offsets)} values for {len(ids)} classes")
        return self

    @property
    def class_ids(self) -> list[str]:
        return [c.id for c in self.classes]

    def class_info(self, class_id: str) -> ClassInfo | None:
        return next((c for c in self.classes if c.id == class_id), None)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def prune_levels(levels: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Risk levels (sorted by ``min``) without the ones no P(malignant) can reach: a level is empty when
    the next level starts at the same threshold. Returns the kept levels and the names left out."""
    ordered = sorted(levels, key=lambda lv: (float(lv["min"]), LEVEL_ORDER[RiskLevel(lv["level"])]))
    kept, dropped = [], []
    for index, level in enumerate(ordered):
        following = ordered[index + 1] if index + 1 < len(ordered) else None
        if following is not None and float(following["min"]) <= float(level["min"]):
            dropped.append(str(level["level"]))
        else:
            kept.append(level)
    if kept and float(kept[0]["min"]) > 0.0:
        kept[0] = kept[0] | {"min": 0.0}
    return kept, dropped


def upgrade_card(data: dict[str, Any]) -> dict[str, Any]:
    """A card of schema 1 (no ``schema_version``) in schema 2: unreachable risk levels left out, with the
    reason added to the policy's reasoning. A schema-2 card is returned as it is."""
    if data.get("schema_version") == SCHEMA_VERSION:
        return data
    if data.get("schema_version") not in (None, 1):
        raise CardError(f"schema_version {data.get('schema_version')!r} is not known (this OncoLens reads 1 and 2)")
    upgraded = {"schema_version": SCHEMA_VERSION} | {k: v for k, v in data.items() if k != "schema_version"}
    policy = dict(upgraded.get("risk_policy", {}))
    if isinstance(policy.get("levels"), list):
        kept, dropped = prune_levels(policy["levels"])
        if dropped:
            policy["levels"] = kept
            policy["reasoning"] = (
                str(policy.get("reasoning", ""))
                + f" Left out as unreachable (its threshold equals the next level's): {', '.join(dropped)}."
            ).strip()
        upgraded["risk_policy"] = policy
    return upgraded


def describe(exc: ValidationError) -> str:
    """Pydantic's errors as ``risk_policy.levels.1.min: Input should be ...; sha256: ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "card"
        parts.append(f"{where}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_card(data: Any, source: str = "card") -> ModelCard:
    """A validated card from parsed JSON; CardError naming each bad field otherwise."""
    if not isinstance(data, dict):
        raise CardError(f"{source} is not a JSON object")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise CardError(f"{source} does not follow the model-card contract: {describe(exc)}") from exc


def read_card(path: Path) -> ModelCard:
    """Read ``card.json``, upgrade it from an older schema (in memory) and validate it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CardError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CardError(f"{path} is not a JSON object")
    return parse_card(upgrade_card(data), str(path))
