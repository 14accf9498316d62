"""View distillation: one backbone pass that answers like several test-time views.

A package that averages K test-time views (skin-ham10000 1.3.0: the image and its three flips) pays K
backbone passes per image. Here a copy of its network (the *student*) is tuned so that one pass over
an image gives the logits the package's K views give (the *teacher*, the package's own ONNX file run
by ONNX Runtime). The teacher's answer is exact for whatever the student sees: each training image is
augmented by the recipe's ``[augment]`` (the same rotations, flips, scales and colour changes the
network was trained with) and the teacher runs its K views on that very image, so no target is
approximated or cached. The loss is the KL divergence of the temperature-softened class probabilities
(Hinton et al., 2015), scaled by T^2; no labels are used. The student starts as the teacher's network,
keeps its first ``freeze_blocks`` blocks frozen (run in the recipe's ``front_precision``) and every
BatchNorm at its statistics (eval mode throughout: the network only moves its weights), and learns
with AdamW at a small learning rate, warmup + cosine, and the recipe's weight EMA.

The student may start from a run's checkpoint or from an installed package (``export.load_onnx_weights``
rebuilds the PyTorch network from the package's ONNX file, BatchNorm folded back out).

Every epoch the EMA student is scored on val with one view (the recipe's ``select_metric`` and its
KL to the teacher's val logits); the best epoch is kept, the untuned network (epoch 0) included, so
tuning that does not pay on val is not shipped. Its test-time views are then chosen on val among
the image alone, the recipe's candidates and the teacher's views like any run's, and it is compared
with the teacher on val: it is ``kept`` only if it needs fewer views and its views score within
``[export] tta_tolerance`` of the teacher's (the rule that already trades views for cost). ``oncolens
distill-views`` installs it only if kept (``--out`` writes a candidate package either way); the
history and the card record both models' val figures.

Measured on the shipped models (README, "One view instead of several"): the tuning lowered the loss
on train but never the KL to the teacher on val, at lr 1e-4 or 1e-5; it does not teach one view the
views' invariance. What it ships is the one-view network chosen on val, tuned or not.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from oncolens.evaluation.datasets import Sample, drop_labels
from oncolens.training.augment import augment, to_input
from oncolens.training.backbones import Classifier, frozen_front
from oncolens.training.export import ExportModel, OnnxWeightsError, load_onnx_weights, max_logit_difference
from oncolens.training.qat import Teacher, onnx_teacher
from oncolens.training.recipe import Recipe
from oncolens.training.train import (
    BEST,
    LAST,
    SplitData,
    _choose_views,
    _freeze,
    _optimizer,
    _train_weights,
    build_model,
    keep_if_best,
    load_split,
    machine_description,
    mean_kl,
    optimizer_step,
    predict_logits,
    quick_metrics,
    resume,
    save_last,
)
from oncolens.training.views import SINGLE, candidate_views
from oncolens.zoo.card import parse_card
from oncolens.zoo.package import CARD, ONNX, sha256_of


def classifier_from_onnx(recipe: Recipe, onnx_path: Path) -> Classifier:
    """The recipe's network with the weights of a package's ONNX file (see ``load_onnx_weights``)."""
    return load_onnx_weights(build_model(recipe, pretrained=False), onnx_path, recipe.input_spec.size)


def check_parity(model: Classifier, views: tuple[str, ...], onnx_path: Path, size: int, limit: float = 1e-3) -> float:
    """Max |logit| difference between ``model`` with ``views`` and the ONNX file on 4 seeded random
    images; an error above ``limit`` (the rebuilt network would not be the package's)."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    diff = max_logit_difference(ExportModel(model, views), onnx_teacher(onnx_path)(x)[0].numpy(), x)
    if not diff < limit:
        raise OnnxWeightsError(f"{onnx_path}: the rebuilt network's logits differ by {diff:.2e} (limit {limit})")
    return diff


def _teacher_logits(teacher: Teacher, data: SplitData, recipe: Recipe, batch: int = 32) -> np.ndarray:
    """[N, C] logits of the teacher file on a split's decoded pixels (as ``predict_logits`` scores the student)."""
    pixels = torch.from_numpy(data.pixels)
    chunks = [to_input(pixels[s : s + batch], recipe.input_spec).numpy() for s in range(0, len(pixels), batch)]
    return np.concatenate([teacher(x)[0].numpy() for x in chunks]).astype(np.float64)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the probabilities softened by ``temperature``, times temperature^2."""
    t = temperature
    return (
        F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean")
        * t
        * t
    )


@dataclasses.dataclass(frozen=True)
class ViewDistillConfig:
    """Epochs over the train split, the peak learning rate (warmup + cosine) and the KL temperature."""

    epochs: int = 3
    lr: float = 1e-4
    temperature: float = 2.0


def distill_views(
    recipe: Recipe,
    samples: list[Sample],
    teacher_onnx: Path,
    teacher_views: tuple[str, ...],
    student: Classifier,
    run_dir: Path,
    command: str,
    config: ViewDistillConfig,
    teacher_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tune ``student`` to answer in one view like ``teacher_onnx``; writes ``best.pt``, ``last.pt`` and
    ``history.json`` (with the chosen views and the comparison with the teacher) into ``run_dir``.
    Re-running with the same ``run_dir`` resumes."""
    cfg = dataclasses.replace(recipe.train, lr=config.lr)
    teacher_info = dict(teacher_info or {})
    ensemble = teacher_info.pop("ensemble", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    samples, _ = drop_labels(samples, recipe.excluded_labels)
    t0 = time.time()
    train, val = load_split(samples, "train", recipe), load_split(samples, "val", recipe)
    teacher = onnx_teacher(teacher_onnx)
    teacher_val = _teacher_logits(teacher, val, recipe)
    k, metric = len(recipe.classes), cfg.select_metric
    teacher_score = quick_metrics(val.labels, teacher_val, k)
    tqdm.write(
        f"teacher ({'+'.join(teacher_views)}) on val: {json.dumps(teacher_score)} ({time.time() - t0:.0f} s to load)"
    )

    ema = _freeze(student, cfg.freeze_blocks)
    optimizer = _optimizer(student, cfg)
    steps_per_epoch = max(1, len(train.labels) // cfg.batch_size)
    total_steps, warmup = steps_per_epoch * config.epochs, steps_per_epoch // 10
    weights = _train_weights(train, cfg, k)
    pixels = torch.from_numpy(train.pixels)
    progress = resume(run_dir / LAST, student, ema, optimizer, gen)
    if not progress.history:  # the untuned network with one view is the first candidate for the best
        start_logits = predict_logits(ema, val, recipe).astype(np.float64)
        start_val = quick_metrics(val.labels, start_logits, k) | {"kl_to_teacher": mean_kl(teacher_val, start_logits)}
        progress.history.append({"epoch": 0, "val": start_val, "elapsed_s": 0.0})
        keep_if_best(progress, -1, start_val, metric, ema, run_dir / BEST)
        tqdm.write(f"student before tuning, one view, on val: {json.dumps(start_val)}")
    t_train = time.time()
    step = progress.start_epoch * steps_per_epoch
    for epoch in range(progress.start_epoch, config.epochs):
        order = torch.multinomial(weights, steps_per_epoch * cfg.batch_size, replacement=True, generator=gen)
        running = 0.0
        student.eval()  # BatchNorm keeps its statistics, no dropout: only the weights move
        bar = tqdm(
            order.view(steps_per_epoch, cfg.batch_size), desc=f"views epoch {epoch + 1}/{config.epochs}", unit="batch"
        )
        for i, idx in enumerate(bar):
            x = augment(pixels[idx], recipe.augment, recipe.input_spec, gen)
            target = teacher(x.contiguous().numpy())[0]
            front = frozen_front(student, x, cfg.freeze_blocks, cfg.front_precision)
            loss = distill_loss(student.tail_logits(front, cfg.freeze_blocks), target, config.temperature)
            step = optimizer_step(student, ema, optimizer, loss, step, total_steps, warmup, cfg)
            running = 0.9 * running + 0.1 * loss.item() if i else loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
        val_logits = predict_logits(ema, val, recipe).astype(np.float64)
        val_metrics = quick_metrics(val.labels, val_logits, k) | {"kl_to_teacher": mean_kl(teacher_val, val_logits)}
        improved = keep_if_best(progress, epoch, val_metrics, metric, ema, run_dir / BEST)
        elapsed = progress.elapsed_before + time.time() - t_train
        progress.history.append({"epoch": epoch + 1, "train_loss": running, "val": val_metrics, "elapsed_s": elapsed})
        tqdm.write(
            f"epoch {epoch + 1}: distill loss {running:.4f} | val {json.dumps(val_metrics)}"
            + (" *best*" if improved else "")
        )
        save_last(run_dir / LAST, student, ema, optimizer, gen, progress, epoch, elapsed)
    history, best_epoch = progress.history, progress.best_epoch
    summary = _choice(recipe, val, run_dir / BEST, teacher_views, teacher_score[metric])
    summary.update(
        {
            "command": command,
            "method": "view_distill",
            "recipe": recipe.to_dict(),
            "best_epoch": best_epoch + 1,
            "best_val": history[best_epoch + 1]["val"],
            "epochs_run": len(history) - 1,
            "wall_time_s": round(history[-1]["elapsed_s"], 1),
            "machine": machine_description(),
            "history": history,
            "config": dataclasses.asdict(cfg),
            "view_distillation": {
                **dataclasses.asdict(config),
                "teacher": {
                    **teacher_info,
                    "test_time_views": list(teacher_views),
                    "onnx_sha256": sha256_of(teacher_onnx),
                    "val": teacher_score,
                },
                "student_start_val": history[0]["val"],
                "loss": "KL of temperature-softened probabilities x T^2, teacher run on the same augmented image",
            },
        }
    )
    summary["view_distillation"].update(summary.pop("verdict"))
    if ensemble:  # the teacher's own teachers: their recorded figures stay in the card
        summary["teachers_scored"] = ensemble
    (run_dir / "history.json").write_text(json.dumps(summary, indent=2))
    return summary


def _choice(
    recipe: Recipe, val: SplitData, best_path: Path, teacher_views: tuple[str, ...], teacher_score: float
) -> dict[str, Any]:
    """The student's test-time views (the image alone, the recipe's candidates or the teacher's views:
    the cheapest within tolerance of the best on val), and whether it is kept: fewer views than the
    teacher and within tolerance of the teacher's val score."""
    candidates = [SINGLE, *candidate_views(recipe), teacher_views]
    unique = [list(c) for i, c in enumerate(candidates) if c not in candidates[:i]]
    views = _choose_views(
        dataclasses.replace(recipe, export={**recipe.export, "tta_candidates": unique}), val, best_path
    )
    chosen, scores, metric = tuple(views["test_time_views"]), views["view_choice_val"], recipe.train.select_metric
    tolerance = float(recipe.export.get("tta_tolerance", 0.005))
    kept = scores["+".join(chosen)] >= teacher_score - tolerance and len(chosen) < len(teacher_views)
    tqdm.write(
        f"teacher {list(teacher_views)}: val {metric} {teacher_score:.4f}; "
        + ("kept" if kept else "not kept: the teacher stays")
    )
    verdict = {"metric": metric, "tolerance": tolerance, "student_views": list(chosen), "kept": kept}
    return {**views, "verdict": verdict}


def teacher_package(package_dir: Path) -> tuple[Path, tuple[str, ...], dict[str, Any]]:
    """A package's ONNX file, test-time views and identity (id, version, command) as a teacher."""
    path = package_dir / CARD
    card = parse_card(json.loads(path.read_text()), str(path))
    info = {
        "package": card.id,
        "version": card.version,
        "command": card.training.get("command"),
        "view_choice_val": card.training.get("view_choice_val"),
    }
    if card.training.get("teachers"):  # the ensemble its network was distilled from
        info["ensemble"] = card.training["teachers"]
    return package_dir / ONNX, tuple(card.input.test_time_views), info
