"""Ensemble packages: k networks that share a frozen front, exported as one ONNX graph.

The teachers of a distilled recipe (``training/distill.py``) all start from the same ImageNet
weights and never train the first ``freeze_blocks`` blocks, so they share that front exactly. One
graph runs the front once per test-time view and each member's tail on its map. Its outputs keep
the package contract of a single network:

- ``features`` [N, k*1280, h, w]: the members' feature maps side by side (each averaged over the
  views, mapped back like :class:`~oncolens.training.export.ExportModel`'s);
- ``logits`` [N, C] = ``head(mean over h, w of features)``, where the head is the members' heads
  side by side, each scaled by its member's weight ``w_k``: ``sum_k w_k * logits_k``.

With ``w_k = 1/k`` the logits are the members' average (``combine = "logits"``); with
``w_k = 1/(k * T_k)``, ``T_k`` each member's temperature fitted on val, the calibrated
probabilities are ``softmax(mean_k log softmax(logits_k / T_k))`` (``"calibrated_log_probs"``: the
log-sum-exp each member subtracts is the same for every class, so it drops out). Either way the
class-activation map of the card's head over ``features`` is exactly the weighted sum of the
members' maps, the out-of-domain model is fitted on the ensemble's own features, and the package's
calibration, decision rule and risk policy are fitted on the combined logits like any package's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oncolens.evaluation.calibrate import fit_temperature
from oncolens.training.backbones import Classifier, EfficientNetLite
from oncolens.training.export import VIEWS, ExportModel, check_views

COMBINES = ("logits", "calibrated_log_probs")


class EnsembleError(ValueError):
    """Members that cannot make one graph (different fronts, shapes or class counts)."""


class _Front(nn.Module):
    """The stem and the first ``n_frozen`` blocks of a backbone."""

    def __init__(self, backbone: EfficientNetLite, n_frozen: int) -> None:
        super().__init__()
        self._conv_stem, self._bn0, self.act = backbone._conv_stem, backbone._bn0, backbone.act
        self._blocks = nn.ModuleList(list(backbone._blocks)[:n_frozen])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x


class _Tail(nn.Module):
    """The blocks after the first ``n_frozen`` and the head convolution of a backbone."""

    def __init__(self, backbone: EfficientNetLite, n_frozen: int) -> None:
        super().__init__()
        self._blocks = nn.ModuleList(list(backbone._blocks)[n_frozen:])
        self._conv_head, self._bn1, self.act = backbone._conv_head, backbone._bn1, backbone.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._blocks:
            x = block(x)
        out: torch.Tensor = self.act(self._bn1(self._conv_head(x)))
        return out


def front_state(model: Classifier, n_frozen: int) -> dict[str, torch.Tensor]:
    """The weights and BatchNorm statistics of the front (stem + ``n_frozen`` blocks)."""
    keep = ("backbone._conv_stem.", "backbone._bn0.", *(f"backbone._blocks.{i}." for i in range(n_frozen)))
    return {k: v for k, v in model.state_dict().items() if k.startswith(keep)}


def check_shared_front(members: Sequence[Classifier], n_frozen: int) -> None:
    """Raise :class:`EnsembleError` unless every member has the first member's front, value for value."""
    if not members:
        raise EnsembleError("an ensemble needs at least one member")
    first = front_state(members[0], n_frozen)
    for i, member in enumerate(members[1:], start=2):
        state = front_state(member, n_frozen)
        if state.keys() != first.keys():
            raise EnsembleError(f"member {i} has another architecture than member 1")
        differing = [k for k in first if not torch.equal(first[k], state[k])]
        if differing:
            raise EnsembleError(
                f"member {i} does not share the frozen front of member 1 ({len(differing)} tensors differ, "
                f"e.g. {differing[0]}): an ensemble graph needs members trained with the same freeze_blocks "
                "from the same weights"
            )
        if member.head.weight.shape != members[0].head.weight.shape:
            raise EnsembleError(
                f"member {i} has a head of {tuple(member.head.weight.shape)}, member 1 of "
                f"{tuple(members[0].head.weight.shape)}"
            )


def combine_weights(combine: str, temperatures: Sequence[float]) -> list[float]:
    """Each member's weight on its logits: ``1/k`` (``logits``) or ``1/(k T_k)`` (``calibrated_log_probs``)."""
    k = len(temperatures)
    if combine == "logits":
        return [1.0 / k] * k
    if combine == "calibrated_log_probs":
        return [1.0 / (k * t) for t in temperatures]
    raise EnsembleError(f"unknown combine {combine!r}; choose one of {', '.join(COMBINES)}")


Head = tuple[torch.Tensor, torch.Tensor]


class EnsembleExport(ExportModel):
    """image [N,3,H,W] -> (logits [N,C], features [N,k*K,h,w]): one front, k tails, one combined head.

    Build it with :meth:`from_members`; :meth:`reweighted` and :meth:`first` make graphs with other
    member weights or fewer members that share these modules.
    """

    def __init__(
        self,
        front: nn.Module,
        tails: Sequence[nn.Module],
        heads: Sequence[Head],
        n_frozen: int,
        views: Sequence[str],
        weights: Sequence[float],
    ) -> None:
        nn.Module.__init__(self)
        if not tails or len(tails) != len(heads) or len(weights) != len(tails):
            raise EnsembleError(f"{len(tails)} tails, {len(heads)} heads and {len(weights)} weights do not match")
        self.views = check_views(views)
        self.n_frozen = n_frozen
        self.weights = [float(w) for w in weights]
        self.front = front
        self.tails = nn.ModuleList(tails)
        self.member_heads = list(heads)
        classes, width = heads[0][0].shape
        self.member_width = int(width)
        self.head = nn.Linear(self.member_width * len(tails), int(classes))
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([w * hw for w, (hw, _) in zip(self.weights, heads, strict=True)], 1))
            self.head.bias.copy_(torch.stack([w * hb for w, (_, hb) in zip(self.weights, heads, strict=True)]).sum(0))
        self.eval()

    @classmethod
    def from_members(
        cls,
        members: Sequence[Classifier],
        n_frozen: int,
        views: Sequence[str] = ("identity",),
        weights: Sequence[float] | None = None,
    ) -> EnsembleExport:
        """The graph of ``members`` (checked to share their front), weighted ``1/k`` unless given."""
        check_shared_front(members, n_frozen)
        k = len(members)
        heads = [(m.head.weight.detach().clone(), m.head.bias.detach().clone()) for m in members]
        tails = [_Tail(m.backbone, n_frozen) for m in members]
        front = _Front(members[0].backbone, n_frozen)
        return cls(front, tails, heads, n_frozen, views, list(weights) if weights is not None else [1.0 / k] * k)

    @property
    def members(self) -> int:
        return len(self.tails)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps: list[list[torch.Tensor]] = [[] for _ in self.tails]
        for view in self.views:
            forward, inverse = VIEWS[view]
            front = self.front(forward(image))
            for i, tail in enumerate(self.tails):
                maps[i].append(inverse(tail(front)))
        per_member = [m[0] if len(m) == 1 else torch.stack(m).mean(dim=0) for m in maps]
        features = torch.cat(per_member, dim=1)
        return self.head(features.mean(dim=(2, 3))), features

    @torch.no_grad()
    def member_logits(self, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
        """[k, N, C] each member's own logits (its head on its features) for preprocessed ``inputs``."""
        self.eval()
        out = []
        for start in range(0, len(inputs), batch):
            pooled = self(torch.from_numpy(inputs[start : start + batch]))[1].mean(dim=(2, 3))
            chunks = pooled.split(self.member_width, dim=1)
            out.append(torch.stack([c @ w.T + b for c, (w, b) in zip(chunks, self.member_heads, strict=True)]))
        return torch.cat(out, dim=1).double().numpy()

    def reweighted(self, weights: Sequence[float]) -> EnsembleExport:
        """The same members with other weights (the combined head made again; front and tails shared)."""
        return EnsembleExport(self.front, list(self.tails), self.member_heads, self.n_frozen, self.views, weights)

    def first(self, k: int, weights: Sequence[float]) -> EnsembleExport:
        """The ensemble of the first ``k`` members with ``weights`` (front and tails shared)."""
        if not 1 <= k <= self.members:
            raise EnsembleError(f"cannot keep {k} of {self.members} members")
        return EnsembleExport(
            self.front, list(self.tails)[:k], self.member_heads[:k], self.n_frozen, self.views, weights
        )

    def with_views(self, views: Sequence[str]) -> EnsembleExport:
        """The same members and weights over other test-time views."""
        return EnsembleExport(self.front, list(self.tails), self.member_heads, self.n_frozen, views, self.weights)

    def parameter_count(self) -> int:
        """Parameters the graph runs: the front once, every tail, the combined head."""
        return sum(p.numel() for p in self.parameters())


def member_temperatures(member_logits: np.ndarray, y: np.ndarray) -> list[float]:
    """Each member's NLL-optimal temperature on labelled logits [k, N, C]."""
    return [fit_temperature(logits, y) for logits in member_logits]


def combined_logits(member_logits: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """[N, C] ``sum_k w_k logits_k`` of [k, N, C] member logits."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1, 1, 1)
    out: np.ndarray = (w * member_logits).sum(axis=0)
    return out


def teacher_files(folder: Path) -> list[Path]:
    """The teachers a distilled run saved (``r{repeat}-f{fold}.pt``), in training order."""

    def order(path: Path) -> tuple[int, int]:
        repeat, _, fold = path.stem.partition("-")
        try:
            return int(repeat.lstrip("r")), int(fold.lstrip("f"))
        except ValueError:
            return (1 << 30, 0)

    return sorted(folder.glob("r*-f*.pt"), key=order)


def p50_ms(files: dict[str, Path], size: int, repeats: int, threads: int = 0) -> dict[str, float]:
    """Median milliseconds of one image through each ONNX file, run as the server runs it
    (all optimizations, idle threads sleeping), the files taking turns so a change of load on the
    machine falls on all of them alike."""
    import onnxruntime as ort

    sessions = {}
    for name, path in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_ in range(repeats + 5):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(["logits"], {"image": image})
            if round_ >= 5:  # the first runs warm the session up
                times[name].append(time.perf_counter() - start)
    return {name: round(float(np.median(t)) * 1000, 2) for name, t in times.items()}


def _fuse(owner: nn.Module, conv_name: str, norm_name: str) -> None:
    """Fold ``owner.<norm_name>`` (eval-mode BatchNorm) into ``owner.<conv_name>`` and drop the norm."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, norm = getattr(owner, conv_name), getattr(owner, norm_name)
    setattr(owner, conv_name, fuse_conv_bn_eval(conv.eval(), norm.eval()))
    setattr(owner, norm_name, nn.Identity())


def _fuse_blocks(blocks: nn.ModuleList) -> None:
    for block in blocks:
        if getattr(block, "has_expand", False):
            _fuse(block, "_expand_conv", "_bn0")
        _fuse(block, "_depthwise_conv", "_bn1")
        _fuse(block, "_project_conv", "_bn2")


def half_precision_weights(model: EnsembleExport) -> EnsembleExport:
    """A copy of ``model`` with every BatchNorm folded into its convolution and every weight rounded
    to the nearest float16 value (kept as float32).

    An ensemble file holds k tails (about 10 MB each in float32); :func:`store_half` then writes these
    weights as float16, which halves the file without changing a single answer: the network that was
    measured (val, test, golden samples, parity) is this rounded one, and ONNX Runtime casts the
    weights back to float32 once, when the session is made, so it runs as fast as before.
    """
    import copy

    rounded = copy.deepcopy(model).eval()
    front = rounded.front
    assert isinstance(front, _Front)
    _fuse(front, "_conv_stem", "_bn0")
    _fuse_blocks(front._blocks)
    for tail in rounded.tails:
        assert isinstance(tail, _Tail)
        _fuse_blocks(tail._blocks)
        _fuse(tail, "_conv_head", "_bn1")
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    return rounded


def store_half(path: Path) -> int:
    """Rewrite an ONNX file so that each float32 weight that float16 holds exactly is stored as
    float16 and cast back to float32 in the graph (ONNX Runtime folds the casts when the session is
    made); returns how many weights were converted. Weights float16 cannot hold exactly stay float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    casts, converted = [], 0
    for init in list(graph.initializer):
        values = numpy_helper.to_array(init)
        if values.dtype != np.float32 or values.size < 16:
            continue
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(half, f"{init.name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{init.name}.fp16"], [init.name], to=TensorProto.FLOAT))
        converted += 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*casts, *nodes])
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
    return converted
