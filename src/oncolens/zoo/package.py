"""ModelPackage: a model directory (model.onnx + card.json + report/) loaded for inference.

The package is checked before use: the sha256 in the card must match ``model.onnx`` and the ONNX
input/output shapes must match the card's input size and class count.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from oncolens import decision
from oncolens.vision.domain import OTHER_KIND, OTHER_KIND_SURE, UNUSUAL, DomainCheck, DomainModel, QualityLimits, pooled
from oncolens.zoo.card import CardError, ModelCard, read_card
from oncolens.zoo.preprocess import InputSpec, preprocess

CARD = "card.json"
ONNX = "model.onnx"
PRECISIONS = ("int8", "fp32")


class PackageError(RuntimeError):
    """A model package is incomplete, corrupted or does not match its card."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def use_shared_arena(options: ort.SessionOptions) -> None:
    """Let a session take its working memory from one CPU arena shared by every session of the process.

    Each session's own arena keeps what the largest batch it has run needed: after all six models had
    run batches of 1 to 16 images a server process held 1.7 GB. The server runs one session at a time,
    so one arena (ONNX Runtime's default growth, to the next power of two; it is thread-safe) serves
    them all and holds what the largest batch of any model needs: 0.8 GB after the same batches, at
    the same speed (README, Performance).
    """
    global _shared_arena_registered
    with _shared_arena_lock:
        if not _shared_arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0}))
            _shared_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


@dataclass(frozen=True)
class Prediction:
    """Outputs for a batch: logits and calibrated probabilities [N, C], P(malignant) [N]."""

    logits: np.ndarray
    probs: np.ndarray
    p_malignant: np.ndarray


class ModelPackage:
    """A verified model package with one ONNX Runtime session, created once."""

    def __init__(
        self,
        directory: Path,
        card: ModelCard,
        session: ort.InferenceSession,
        precision: str = "fp32",
        model_file: Path | None = None,
    ) -> None:
        self.directory = directory
        self.card = card
        self.session = session
        self.precision = precision  # which file serves: "int8" (quantized) or "fp32"
        self.model_file = model_file or directory / ONNX  # that file, checked against the card at load

    @classmethod
    def load(cls, directory: Path, threads: int = 0, precision: str = "int8", spinning: bool = False) -> ModelPackage:
        """Read the card, check the ONNX file's sha256 and shapes, and open the session.

        ``precision="int8"`` serves the quantized file when the card says it passed its accuracy
        gate, else the fp32 one; ``"fp32"`` always serves the fp32 file.
        """
        if precision not in PRECISIONS:
            raise PackageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        card_path, onnx_path = directory / CARD, directory / ONNX
        for needed in (card_path, onnx_path):
            if not needed.is_file():
                raise PackageError(f"model package {directory} lacks {needed.name}")
        try:
            card = read_card(card_path)
        except CardError as exc:
            raise PackageError(str(exc)) from exc
        actual = sha256_of(onnx_path)
        if card.sha256 != actual:
            raise PackageError(f"{onnx_path} sha256 {actual[:12]}… does not match the card's {card.sha256[:12]}…")
        serving = "fp32"
        if precision == "int8" and card.int8 is not None and card.int8.passed:
            onnx_path, serving = directory / card.int8.file, "int8"
            if not onnx_path.is_file() or sha256_of(onnx_path) != card.int8.sha256:
                raise PackageError(f"{onnx_path} is missing or does not match the card's int8 sha256")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # By default idle ONNX Runtime threads sleep instead of spinning: ~20% less CPU under load, left
        # to decoding and to the other workers of `serve --workers N`. Spinning (ONCOLENS_SPINNING)
        # answers one image at a time sooner on some CPUs (README, Performance).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        use_shared_arena(options)
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        package = cls(directory, card, session, serving, onnx_path)
        package._check_shapes()
        package._load_domain()
        return package

    def _load_domain(self) -> None:
        self.domain_model: DomainModel | None = None
        self.quality_limits: QualityLimits | None = None
        if self.card.quality is not None:
            self.quality_limits = QualityLimits(**self.card.quality.model_dump())
        if self.card.domain is None:
            return
        path = self.directory / self.card.domain.file
        if not path.is_file() or sha256_of(path) != self.card.domain.sha256:
            raise PackageError(f"{self.id}: {path.name} is missing or does not match the card's sha256")
        try:
            model = DomainModel.load(path)
        except (OSError, KeyError, ValueError) as exc:
            raise PackageError(f"{self.id}: the domain model {path.name} cannot be read: {exc}") from exc
        if model.mean.shape[1] != self.head_weight.shape[1]:
            raise PackageError(f"{self.id}: {path.name} does not match the feature size {self.head_weight.shape[1]}")
        self.domain_model = model

    def domain_checks(self, features: np.ndarray) -> list[DomainCheck | None]:
        """[N, K, h, w] features -> each image's out-of-domain check (None: the package has no domain model)."""
        if self.domain_model is None or self.card.domain is None:
            return [None] * len(features)
        threshold = self.card.domain.threshold
        vectors = pooled(features)
        scores = self.domain_model.score(vectors)
        other = self.domain_model.other_probability(vectors)
        return [
            DomainCheck(
                bool(s <= threshold),
                float(s),
                threshold,
                "" if s <= threshold else OTHER_KIND if o >= OTHER_KIND_SURE else UNUSUAL,
            )
            for s, o in zip(scores, other, strict=True)
        ]

    def _check_shapes(self) -> None:
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        size, n_classes = self.input_spec.size, len(self.class_ids)
        if list(inputs) != ["image"] or list(inputs["image"][1:]) != [3, size, size]:
            raise PackageError(f"{self.id}: ONNX input {inputs} is not image [N, 3, {size}, {size}]")
        if set(outputs) != {"logits", "features"}:
            raise PackageError(f"{self.id}: ONNX outputs {sorted(outputs)} are not logits and features")
        if outputs["logits"][1] != n_classes:
            raise PackageError(f"{self.id}: ONNX logits {outputs['logits']} but the card has {n_classes} classes")
        if outputs["features"][1] != self.head_weight.shape[1]:
            raise PackageError(f"{self.id}: feature channels do not match the card's head weights")

    @property
    def id(self) -> str:
        return self.card.id

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def class_ids(self) -> list[str]:
        return self.card.class_ids

    @property
    def malignant(self) -> list[bool]:
        return [c.malignant for c in self.card.classes]

    @cached_property
    def input_spec(self) -> InputSpec:
        return self.card.input.spec()

    @property
    def feature_offset(self) -> tuple[float, float]:
        """(dy, dx) of the feature cells from the even grid, in input pixels (for heat-maps)."""
        return self.card.input.feature_offset_px

    @cached_property
    def head_weight(self) -> np.ndarray:
        """[C, K] float32 weights of the linear head (for class-activation maps)."""
        head = self.card.head
        raw = base64.b64decode(head.weight_f32_b64)
        return np.frombuffer(raw, dtype="<f4").reshape(head.weight_shape).astype(np.float32)

    def run(
        self, batch: np.ndarray, with_features: bool = False, max_batch: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """[N, 3, S, S] preprocessed float32 -> logits [N, C] (and features [N, K, h, w]).

        With ``max_batch`` the session runs on slices of at most that many images: a request of many
        images never makes ONNX Runtime's working memory (kept in the shared arena) larger than
        ``max_batch`` images need.
        """
        names = ["logits", "features"] if with_features else ["logits"]
        step = max_batch or len(batch) or 1
        parts = [
            self.session.run(names, {"image": np.ascontiguousarray(batch[start : start + step], dtype=np.float32)})
            for start in range(0, max(len(batch), 1), step)
        ]
        if len(parts) == 1:
            outputs = parts[0]
        else:
            outputs = [np.concatenate([part[i] for part in parts]) for i in range(len(names))]
        return outputs[0], (outputs[1] if with_features else None)

    def images_per_run(self, batch_max: int) -> int:
        """How many images one session run may take when it may make ``batch_max`` backbone passes.

        Each image runs once per test-time view inside the graph, so ONNX Runtime's working memory
        (the shared arena, which keeps what the largest run needed) grows with images x views: 16
        images of cervical-herlev's four flips needed as much as 64 one-view images. Past a few images
        a run gains no speed (cervical-herlev answered as many images per second in runs of 4 as of 16).
        """
        return max(1, batch_max // len(self.card.input.test_time_views))

    def release_memory(self) -> None:
        """Give the shared arena's unused working memory back to the system.

        The arena keeps every region the largest batch so far needed. One blank image runs with
        ONNX Runtime's arena shrinkage, which unmaps each region no tensor is using once the run ends:
        after batches of 16 on all six models, 570 MB resident became 290 MB (README, Performance).
        The next larger batch maps its regions again (a few milliseconds).
        """
        size = self.input_spec.size
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.session.run(["logits"], {"image": np.zeros((1, 3, size, size), dtype=np.float32)}, options)

    def predict(self, images: list[Image.Image], batch_size: int = 32) -> Prediction:
        """Decoded RGB images -> calibrated prediction for each (batched through the session)."""
        chunks = [
            self.run(preprocess(images[start : start + batch_size], self.input_spec))[0]
            for start in range(0, len(images), batch_size)
        ]
        logits = np.concatenate(chunks).astype(np.float64)
        probs = decision.probabilities(self.card, logits)
        return Prediction(logits=logits, probs=probs, p_malignant=decision.p_malignant(probs, self.malignant))
