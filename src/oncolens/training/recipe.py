"""Training recipes: one TOML file per shipped model holds everything that differs between models.

The sections are ``[model]`` (title, modality, organ, intended use, limitations), ``[[classes]]``
(id, name, description, malignant), ``[dataset]`` (citation, license), ``[train]``, ``[augment]``,
``[export]`` and ``[risk]``. Command-line flags override ``[train]`` values.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from oncolens.zoo.preprocess import RESIZE_RULES, InputSpec

METHODS = ("finetune", "distill", "soup", "ensemble")
FRONT_PRECISIONS = ("fp32", "bf16")


class RecipeError(ValueError):
    """A recipe file is missing a section or holds a value of the wrong kind."""


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "efficientnet-lite0"
    image_size: int = 224
    resize: str = "squash"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    freeze_blocks: int = 3
    balance_power: float = 0.5
    balance_by: str = ""
    grayscale: bool = False
    label_smoothing: float = 0.0
    dropout: float = 0.2
    ema_decay: float = 0.998
    patience: int = 6
    select_metric: str = "balanced_accuracy"
    seed: int = 0
    threads: int = 0
    # "finetune": one network, the front frozen, every step through the whole network.
    # "distill": the frozen front's maps cached for ``cache_views`` views per image; ``folds`` x
    # ``repeats`` teachers trained by grouped k-fold on train; one student distilled from them.
    # "soup": the same teachers; the served network is their uniform weight average (no student).
    # "ensemble": the same teachers, served together as one graph (training/ensemble.py): one front
    # pass and k tails; the ``[ensemble]`` section says how many, how they combine, and when the
    # ensemble is served instead of the one-network build.
    method: str = "finetune"
    cache_views: int = 8
    folds: int = 5
    repeats: int = 1
    teacher_epochs: int = 0
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    # The share of each student batch whose input is a blend of two train images' cached maps
    # (weights drawn uniformly), whose target is the averaged probabilities of *all* the teachers,
    # computed on that blend during the step: no teacher was trained on it, so the student learns the
    # ensemble's function rather than one held-out teacher per image. The rest of the batch keeps the
    # out-of-fold targets; 0 (the default) distils from those alone.
    distill_mix: float = 0.0
    # The frozen front (stem + ``freeze_blocks`` blocks, no gradients) computed under bfloat16
    # autocast: on a CPU with AVX512-BF16 about 2x faster than fp32 for that part; the trainable
    # tail, every evaluation and the exported model stay fp32 (see training/train.py:front_autocast).
    front_precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.front_precision not in FRONT_PRECISIONS:
            raise RecipeError(f"front_precision {self.front_precision!r} is not one of {FRONT_PRECISIONS}")
        if not 0.0 <= self.distill_mix <= 1.0:
            raise RecipeError(f"distill_mix is a share of the batch, from 0 to 1, not {self.distill_mix}")


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = 180.0
    scale_min: float = 0.85
    scale_max: float = 1.25
    translate: float = 0.08
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    # Per-channel gain: R, G and B each scaled by its own factor in [1 - c, 1 + c], a white-balance or
    # camera-response shift (a cue that can give a photo's source away); 0 leaves colours alone.
    colour_cast: float = 0.0


COMBINES = ("logits", "calibrated_log_probs")
STARTS = ("imagenet", "package")


@dataclass(frozen=True)
class EnsembleConfig:
    """``[ensemble]``: the members, their combination and the rule that serves the ensemble.

    Written before the run, applied by the export (``training/ensemble.py``):

    - members: the first ``members`` teachers (0: all); fewer when the graph would cost more than
      ``max_cost`` times the one-network build's p50 for one image, measured in the same run, or its
      file (float16 weights) would be larger than ``max_file_mb``;
    - combine: each candidate way of averaging (``logits``; ``calibrated_log_probs``, each member
      tempered on val first) is calibrated on val like a package; the lowest val NLL is kept;
    - the ensemble serves when, on val after calibration, its NLL is lower than the one-network
      build's and its macro AUROC is not lower by more than ``max_auroc_drop``; otherwise the
      one-network build stays and the card records the comparison.
    """

    members: int = 0
    # "imagenet": each member's tail starts from ImageNet weights (the distilled recipes' teachers);
    # "package": the front is the one-network package's own (fine-tuned) front and each member's tail
    # starts from that package's tail: members that cost no new network, only tails on cached maps.
    start: str = "imagenet"
    combine: tuple[str, ...] = COMBINES
    max_cost: float = 2.5
    # Model files stay small: no more members than fit this many MB (float16 weights) in model.onnx.
    max_file_mb: float = 25.0
    max_auroc_drop: float = 0.0
    cost_repeats: int = 40

    def __post_init__(self) -> None:
        object.__setattr__(self, "combine", tuple(self.combine))
        unknown = sorted(set(self.combine) - set(COMBINES))
        if unknown or not self.combine:
            raise RecipeError(f"[ensemble] combine {unknown or '[]'}: choose from {list(COMBINES)}")
        if self.start not in STARTS:
            raise RecipeError(f"[ensemble] start {self.start!r} is not one of {list(STARTS)}")
        if self.max_file_mb <= 0:
            raise RecipeError("[ensemble] max_file_mb must be above 0")
        if self.members < 0 or self.max_cost < 1.0 or self.max_auroc_drop < 0.0 or self.cost_repeats < 5:
            raise RecipeError(
                "[ensemble] needs members >= 0 (0: all), max_cost >= 1, max_auroc_drop >= 0 and cost_repeats >= 5"
            )


@dataclass(frozen=True)
class ClassInfo:
    id: str
    name: str
    description: str
    malignant: bool


@dataclass(frozen=True)
class Recipe:
    model: dict[str, Any]
    classes: list[ClassInfo]
    dataset: dict[str, Any]
    train: TrainConfig
    augment: AugmentConfig
    export: dict[str, Any] = field(default_factory=dict)
    risk: dict[str, Any] = field(default_factory=dict)
    aggregation: dict[str, Any] = field(default_factory=lambda: {"rule": "mean"})
    source: str = ""
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    @property
    def class_ids(self) -> list[str]:
        return [c.id for c in self.classes]

    @property
    def input_spec(self) -> InputSpec:
        # EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x*255 - 127) / 128).
        mean = tuple(self.export.get("mean", (0.498, 0.498, 0.498)))
        std = tuple(self.export.get("std", (0.502, 0.502, 0.502)))
        return InputSpec(
            self.train.image_size,
            mean,
            std,
            self.train.resize,  # type: ignore[arg-type]
            self.train.grayscale,
        )

    @property
    def excluded_labels(self) -> list[str]:
        """Dataset labels left out of the model (``[dataset] exclude_labels``), e.g. a class too small to learn."""
        return [str(x) for x in self.dataset.get("exclude_labels", [])]

    @property
    def report_by(self) -> list[str]:
        """Manifest metadata columns to break the test metrics down by (``[dataset] report_by``)."""
        return [str(x) for x in self.dataset.get("report_by", [])]

    def with_overrides(self, **overrides: Any) -> Recipe:
        """A copy with the given non-None ``[train]`` values replaced."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, train=replace(self.train, **given))

    def to_dict(self) -> dict[str, Any]:
        out = {"train": asdict(self.train), "augment": asdict(self.augment), "export": self.export}
        if self.train.method == "ensemble":
            out["ensemble"] = asdict(self.ensemble) | {"combine": list(self.ensemble.combine)}
        return out


def _dataclass_from(cls: type, section: dict[str, Any], name: str) -> Any:
    known = {f.name: f.type for f in fields(cls)}
    unknown = set(section) - known.keys()
    if unknown:
        raise RecipeError(f"[{name}] has unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**section)


def load_recipe(path: Path) -> Recipe:
    """Parse and check a recipe TOML file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    for section in ("model", "classes", "dataset"):
        if section not in data:
            raise RecipeError(f"recipe {path} has no [{section}] section")
    classes = []
    for entry in data["classes"]:
        try:
            classes.append(
                ClassInfo(
                    id=str(entry["id"]),
                    name=str(entry.get("name", entry["id"])),
                    description=str(entry.get("description", "")),
                    malignant=bool(entry["malignant"]),
                )
            )
        except KeyError as exc:
            raise RecipeError(f"recipe {path}: a [[classes]] entry lacks {exc}") from exc
    if len(classes) < 2:
        raise RecipeError(f"recipe {path}: a classifier needs at least two classes")
    train = _dataclass_from(TrainConfig, data.get("train", {}), "train")
    overlap = set(map(str, data["dataset"].get("exclude_labels", []))) & {c.id for c in classes}
    if overlap:
        raise RecipeError(f"recipe {path}: label(s) {sorted(overlap)} are both classes and excluded")
    if train.method not in METHODS:
        raise RecipeError(f"recipe {path}: method {train.method!r} is not one of {METHODS}")
    if train.method != "finetune" and (train.folds < 2 or train.repeats < 1 or train.cache_views < 1):
        raise RecipeError(f"recipe {path}: {train.method} needs folds >= 2, repeats >= 1 and cache_views >= 1")
    if train.resize not in RESIZE_RULES:
        raise RecipeError(f"recipe {path}: resize {train.resize!r} is not one of {RESIZE_RULES}")
    return Recipe(
        model=data["model"],
        classes=classes,
        dataset=data["dataset"],
        train=train,
        augment=_dataclass_from(AugmentConfig, data.get("augment", {}), "augment"),
        export=data.get("export", {}),
        risk=data.get("risk", {}),
        aggregation=data.get("aggregation", {"rule": "mean"}),
        source=str(path),
        ensemble=_dataclass_from(EnsembleConfig, data.get("ensemble", {}), "ensemble"),
    )


RECIPES_DIR = Path("recipes")


def resolve_recipe(path: Path | None, model_id: str) -> Recipe:
    """The given recipe, else ``recipes/<model-id>.toml`` in the working directory."""
    chosen = path or RECIPES_DIR / f"{model_id}.toml"
    if not chosen.is_file():
        raise RecipeError(f"no recipe at {chosen}: pass --recipe FILE (see recipes/ for examples)")
    return load_recipe(chosen)
