"""Fine-tuning loop: balanced sampling, AdamW with warmup + cosine, weight EMA, best-on-val, resume."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from oncolens.decision import calibrate
from oncolens.evaluation import metrics
from oncolens.evaluation.datasets import ManifestError, Sample, drop_labels, encode_labels, load_pixels, select_split
from oncolens.training.augment import augment, to_input
from oncolens.training.backbones import Classifier, build_backbone, frozen_front
from oncolens.training.recipe import Recipe, TrainConfig
from oncolens.training.views import candidate_views, choose_views, named_view_logits, union_views

LAST = "last.pt"
BEST = "best.pt"


@dataclass
class SplitData:
    """Decoded pixels ([N, S, S, 3] uint8) and labels ([N] int64) of one split."""

    samples: list[Sample]
    pixels: np.ndarray
    labels: np.ndarray


def load_split(samples: list[Sample], split: str, recipe: Recipe) -> SplitData:
    chosen = select_split(samples, split)
    labels = encode_labels(chosen, recipe.class_ids)
    return SplitData(chosen, load_pixels(chosen, recipe.input_spec), labels)


def build_model(recipe: Recipe, pretrained: bool = True) -> Classifier:
    cfg = recipe.train
    model = Classifier(build_backbone(cfg.backbone, pretrained), len(recipe.classes), cfg.dropout)
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def _frozen_modules(model: Classifier, n_blocks: int) -> list[torch.nn.Module]:
    """The stem and first ``n_blocks`` blocks: generic low-level filters kept at ImageNet values.

    Freezing them (weights and BatchNorm statistics) halves the cost of a CPU step.
    """
    bb = model.backbone
    return [bb._conv_stem, bb._bn0, *bb._blocks[:n_blocks]] if n_blocks > 0 else []


def set_train_mode(model: Classifier, n_frozen: int) -> None:
    model.train()
    for module in _frozen_modules(model, n_frozen):
        module.eval()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: SplitData, recipe: Recipe, batch: int = 64) -> np.ndarray:
    """[N, C] logits of ``model`` (which returns (logits, features)) on a split, in eval mode."""
    model.eval()
    out = []
    pixels = torch.from_numpy(data.pixels)
    for start in range(0, len(pixels), batch):
        x = to_input(pixels[start : start + batch], recipe.input_spec)
        out.append(model(x.contiguous(memory_format=torch.channels_last))[0].float())
    logits: np.ndarray = torch.cat(out).numpy() if out else np.zeros((0, len(recipe.classes)), np.float32)
    return logits


def mean_kl(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(teacher || student) of the softmax probabilities (T = 1) of [N, C] logits."""
    student = torch.from_numpy(np.asarray(student_logits, dtype=np.float64))
    teacher = torch.from_numpy(np.asarray(teacher_logits, dtype=np.float64))
    kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean")
    return float(kl)


def quick_metrics(y: np.ndarray, logits: np.ndarray, num_classes: int) -> dict[str, float]:
    probs = calibrate(logits, 1.0)
    pred = probs.argmax(axis=1)
    return {
        "loss": float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean()),
        "accuracy": metrics.accuracy(y, pred),
        "balanced_accuracy": metrics.balanced_accuracy(y, pred, num_classes),
        "macro_f1": metrics.macro_f1(y, pred, num_classes),
        "macro_auc": metrics.macro_auc(y, probs),
    }


def sampling_weights(
    labels: np.ndarray, num_classes: int, power: float, strata: list[str] | None = None
) -> torch.Tensor:
    """Per-sample weights so class c is drawn in proportion to count_c ** (1 - power).

    power 0 keeps the data's frequencies, 1 draws every class equally often, 0.5 in between.
    With ``strata`` (one value per sample, e.g. the source dataset), the cells are (stratum, class)
    instead: at power 1 every class is equally frequent *within* every stratum, so the stratum
    tells the model nothing about the label (a source shortcut is not rewarded).
    """
    if strata is None:
        cells = labels
    else:
        keys = sorted(set(zip(strata, labels.tolist(), strict=True)))
        index = {key: i for i, key in enumerate(keys)}
        cells = np.array([index[key] for key in zip(strata, labels.tolist(), strict=True)], dtype=np.int64)
    counts = np.bincount(cells, minlength=num_classes).astype(np.float64)
    per_cell = np.where(counts > 0, counts ** (-power), 0.0)
    return torch.from_numpy(per_cell[cells])


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def machine_description() -> str:
    """CPU model, core count and torch build, e.g. 'AMD EPYC, 2 cores (2 torch threads), torch 2.13.0+cpu'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}, no GPU"


def _freeze(model: Classifier, freeze_blocks: int) -> Classifier:
    """A frozen copy for the exponential moving average, after freezing the first blocks of ``model``."""
    for module in _frozen_modules(model, freeze_blocks):
        for p in module.parameters():
            p.requires_grad = False
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad = False
    return ema


def _optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def balance_strata(samples: list[Sample], cfg: TrainConfig) -> list[str] | None:
    """Each sample's ``balance_by`` value (None without one); a column the manifest lacks is an error."""
    if not cfg.balance_by:
        return None
    if any(cfg.balance_by not in s.metadata for s in samples):
        raise ManifestError(f"balance_by: the manifest has no column {cfg.balance_by!r}")
    return [s.metadata[cfg.balance_by] for s in samples]


def _train_weights(train: SplitData, cfg: TrainConfig, num_classes: int) -> torch.Tensor:
    """Sampling weights of the train images (balanced by class, within ``balance_by`` strata)."""
    return sampling_weights(train.labels, num_classes, cfg.balance_power, balance_strata(train.samples, cfg))


@dataclass
class Progress:
    """What a run carries from epoch to epoch (and across a resume)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    elapsed_before: float = 0.0


def resume(
    last_path: Path, model: Classifier, ema: Classifier, optimizer: torch.optim.Optimizer, gen: torch.Generator
) -> Progress:
    if not last_path.exists():
        return Progress()
    state = torch.load(last_path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    tqdm.write(f"resuming from {last_path} at epoch {state['epoch'] + 2}")
    return Progress(state["history"], state["epoch"] + 1, state["best_score"], state["best_epoch"], state["elapsed_s"])


def keep_if_best(
    progress: Progress, epoch: int, val_metrics: dict[str, float], metric: str, ema: Classifier, best_path: Path
) -> bool:
    """If ``epoch`` beats the best val ``metric`` so far: record it and save the EMA weights as ``best.pt``."""
    improved = val_metrics[metric] > progress.best_score
    if improved:
        progress.best_score, progress.best_epoch = val_metrics[metric], epoch
        torch.save({"model": ema.state_dict(), "epoch": epoch, "val": val_metrics}, best_path)
    return improved


def save_last(
    path: Path,
    model: Classifier,
    ema: Classifier,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    progress: Progress,
    epoch: int,
    elapsed: float,
) -> None:
    """Everything ``resume`` needs to go on after ``epoch``."""
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": gen.get_state(),
        "history": progress.history,
        "epoch": epoch,
        "best_score": progress.best_score,
        "best_epoch": progress.best_epoch,
        "elapsed_s": elapsed,
    }
    torch.save(state, path)


def _update_ema(ema: Classifier, model: Classifier, decay: float) -> None:
    with torch.no_grad():
        for e_p, m_p in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if e_p.dtype.is_floating_point:
                e_p.mul_(decay).add_(m_p, alpha=1 - decay)
            else:
                e_p.copy_(m_p)


def optimizer_step(
    model: Classifier,
    ema: Classifier,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    step: int,
    total_steps: int,
    warmup: int,
    cfg: TrainConfig,
) -> int:
    """One AdamW step at the warmup + cosine learning rate, then the weight EMA; returns the next step."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total_steps, warmup, cfg.lr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    step += 1
    _update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
    return step


def _epoch(
    recipe: Recipe,
    model: Classifier,
    ema: Classifier,
    optimizer: torch.optim.Optimizer,
    batches: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    step: int,
    total_steps: int,
    warmup: int,
    desc: str,
) -> tuple[float, int]:
    """One epoch over ``batches`` [steps, batch] of image indices; returns (smoothed loss, step)."""
    cfg = recipe.train
    set_train_mode(model, cfg.freeze_blocks)
    running = 0.0
    bar = tqdm(range(len(batches)), desc=desc, unit="batch")
    for i in bar:
        idx = batches[i]
        x = augment(pixels[idx], recipe.augment, recipe.input_spec, gen)
        if cfg.freeze_blocks > 0:  # the frozen front without gradients, at the recipe's precision
            front = frozen_front(model, x, cfg.freeze_blocks, cfg.front_precision)
            logits = model.tail_logits(front, cfg.freeze_blocks)
        else:
            logits, _ = model(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg.label_smoothing)
        step = optimizer_step(model, ema, optimizer, loss, step, total_steps, warmup, cfg)
        running = 0.9 * running + 0.1 * loss.item() if i else loss.item()
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
    return running, step


def _summary(recipe: Recipe, command: str, progress: Progress) -> dict[str, Any]:
    history, best = progress.history, progress.best_epoch
    return {
        "command": command,
        "recipe": recipe.to_dict(),
        "best_epoch": best + 1,
        "best_val": history[best]["val"] if 0 <= best < len(history) else None,
        "epochs_run": len(history),
        "wall_time_s": round(history[-1]["elapsed_s"] if history else 0.0, 1),
        "machine": machine_description(),
        "history": history,
        "config": asdict(recipe.train),
    }


def fit(recipe: Recipe, samples: list[Sample], out_dir: Path, command: str) -> dict[str, Any]:
    """Train on ``train``, select on ``val``; writes ``best.pt``/``last.pt``/``history.json``.

    Re-running with the same ``out_dir`` resumes from ``last.pt``.
    """
    cfg = recipe.train
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    samples, _ = drop_labels(samples, recipe.excluded_labels)
    train, val = load_split(samples, "train", recipe), load_split(samples, "val", recipe)
    tqdm.write(f"loaded {len(train.labels)} train / {len(val.labels)} val images in {time.time() - t0:.0f}s")

    num_classes = len(recipe.classes)
    model = build_model(recipe)
    ema = _freeze(model, cfg.freeze_blocks)
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = max(1, len(train.labels) // cfg.batch_size)
    total_steps, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    weights = _train_weights(train, cfg, num_classes)
    pixels, labels = torch.from_numpy(train.pixels), torch.from_numpy(train.labels)
    last_path = out_dir / LAST
    progress = resume(last_path, model, ema, optimizer, gen)

    t_train = time.time()
    step = progress.start_epoch * steps_per_epoch
    for epoch in range(progress.start_epoch, cfg.epochs):
        order = torch.multinomial(weights, steps_per_epoch * cfg.batch_size, replacement=True, generator=gen)
        batches = order.view(steps_per_epoch, cfg.batch_size)
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        running, step = _epoch(
            recipe, model, ema, optimizer, batches, pixels, labels, gen, step, total_steps, warmup, desc
        )
        val_metrics = quick_metrics(val.labels, predict_logits(ema, val, recipe), num_classes)
        improved = keep_if_best(progress, epoch, val_metrics, cfg.select_metric, ema, out_dir / BEST)
        elapsed = progress.elapsed_before + time.time() - t_train
        progress.history.append({"epoch": epoch + 1, "train_loss": running, "val": val_metrics, "elapsed_s": elapsed})
        tqdm.write(
            f"epoch {epoch + 1}: train loss {running:.3f} | val loss {val_metrics['loss']:.3f} "
            f"acc {val_metrics['accuracy']:.3f} bal-acc {val_metrics['balanced_accuracy']:.3f} "
            f"F1 {val_metrics['macro_f1']:.3f} AUROC {val_metrics['macro_auc']:.3f}" + (" *best*" if improved else "")
        )
        save_last(last_path, model, ema, optimizer, gen, progress, epoch, elapsed)
        if epoch - progress.best_epoch >= cfg.patience:
            tqdm.write(f"early stop: no {cfg.select_metric} gain on val for {cfg.patience} epochs")
            break
    summary = _summary(recipe, command, progress)
    summary.update(_choose_views(recipe, val, out_dir / BEST))
    (out_dir / "history.json").write_text(json.dumps(summary, indent=2))
    return summary


def _choose_views(recipe: Recipe, val: SplitData, best_path: Path) -> dict[str, Any]:
    """With several ``[export] tta_candidates``: the set the best checkpoint scores best with on val."""
    candidates = candidate_views(recipe)
    if len(candidates) < 2 or not best_path.is_file():
        return {}
    model = build_model(recipe, pretrained=False)
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    names = union_views(candidates)
    logits = named_view_logits(model, val.pixels, recipe, names)
    metric, k = recipe.train.select_metric, len(recipe.classes)
    chosen, scores = choose_views(recipe, logits, names, lambda z: quick_metrics(val.labels, z, k)[metric])
    tqdm.write(f"test-time views {list(chosen)} (val {metric}: {scores})")
    return {"test_time_views": list(chosen), "view_choice_val": scores}
