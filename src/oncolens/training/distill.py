"""Teachers by grouped k-fold, one student distilled from them, all on cached front maps.

``method = "distill"`` in a recipe's ``[train]``:

1. The frozen front (stem + ``freeze_blocks`` blocks, ImageNet weights) runs once per image and
   view (:mod:`oncolens.training.views`): ``cache_views`` augmented views of each train image, the
   candidate test-time views of each train and val image.
2. Teachers: the train split is cut into ``folds`` folds by patient/lesion group (``repeats`` times
   with other cuts); each teacher trains the tail on the other folds for ``teacher_epochs`` and
   predicts its held-out fold: the pooled out-of-fold predictions measure the recipe on every train
   image at once, with intervals (the same machinery is ``oncolens cv``).
3. Student: one network of the served size trained on every train image to match, view by view, the
   probabilities of the teachers that did *not* see that image (softened by ``distill_temperature``),
   mixed with the label (``distill_alpha``); selected on val like a fine-tuned model. With
   ``distill_mix`` a share of each batch is a blend of two images' maps whose target is the average
   of *every* teacher on that blend (:func:`blend`): one held-out teacher per image is a noisy
   stand-in for the ensemble, and the blend is an input none of them was trained on.
   With ``method = "soup"`` there is no student: the served network is the teachers' uniform weight
   average (:func:`weight_soup`); with ``method = "ensemble"`` the teachers themselves serve, as one
   graph (:mod:`oncolens.training.ensemble`). Either way the run records the soup's val figures, so the two can
   be compared.
4. Test-time views: of the recipe's candidate sets, the cheapest whose val score is within
   ``tta_tolerance`` of the best.

The val split stays out of every teacher and every gradient step: it selects the student's epoch and
test-time views and, in the pipeline, fits the calibration and decision rule. Test is not read here.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from oncolens.decision import calibrate
from oncolens.evaluation import metrics
from oncolens.evaluation.datasets import Sample, drop_labels
from oncolens.evaluation.evaluate import finite, subgroup_reports
from oncolens.training.backbones import Classifier
from oncolens.training.recipe import Recipe
from oncolens.training.train import (
    BEST,
    SplitData,
    _freeze,
    _optimizer,
    balance_strata,
    build_model,
    load_split,
    machine_description,
    mean_kl,
    optimizer_step,
    quick_metrics,
    sampling_weights,
    set_train_mode,
)
from oncolens.training.views import (
    ViewCache,
    augmented_views,
    candidate_views,
    choose_views,
    mean_over,
    test_time_views,
    union_views,
    view_logits,
)

TEACHERS = "teachers"
# A blended student's BatchNorm statistics are measured on this many real cached views per train
# image (thousands of maps for the smallest set; every view would cost a pass as long as an epoch).
BATCHNORM_VIEWS = 2


def grouped_folds(labels: np.ndarray, groups: list[str], k: int, seed: int) -> np.ndarray:
    """[N] fold index in 0..k-1: a group's images share a fold, and each fold gets its share of each class.

    Groups are taken largest first (ties in a seeded random order) and each goes to the fold where
    its classes are least represented so far, then the smallest fold.
    """
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = list(members)
    if len(names) < k:
        raise ValueError(f"{len(names)} groups cannot make {k} folds")
    rng = np.random.default_rng(seed)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    shuffled.sort(key=lambda g: -len(members[g]))
    counts = np.zeros((k, num_classes))
    fold = np.empty(len(labels), dtype=np.int64)
    for g in shuffled:
        idx = members[g]
        cls = np.bincount(labels[idx], minlength=num_classes)
        cost = counts @ cls * 1000.0 + counts.sum(axis=1)
        f = int(np.argmin(cost))
        counts[f] += cls
        fold[idx] = f
    return fold


@dataclass
class Pool:
    """The images one tail is trained on: cached views, labels and balancing strata."""

    views: ViewCache
    labels: np.ndarray
    strata: list[str] | None
    targets: torch.Tensor | None = None  # [N, K, C] teacher probabilities at the distillation temperature


def _subset(pool: Pool, index: np.ndarray) -> Pool:
    strata = [pool.strata[i] for i in index] if pool.strata is not None else None
    targets = pool.targets[torch.from_numpy(index)] if pool.targets is not None else None
    return Pool(pool.views.subset(index), pool.labels[index], strata, targets)


EpochHook = Callable[[int, Classifier], bool]


def blend(
    x: torch.Tensor, share: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend a ``share`` of the batch's maps with another image's: ``w * x[i] + (1 - w) * x[partner[i]]``.

    Returns the maps, each row's partner, its weight ``w`` (1.0 for rows left as they are; drawn
    uniformly in (0, 1) otherwise) and a mask of the blended rows.
    """
    n = len(x)
    partner = torch.randperm(n, generator=gen)
    blended = (torch.rand(n, generator=gen) < share) & (partner != torch.arange(n))
    weight = torch.where(blended, torch.rand(n, generator=gen), torch.ones(n))
    w = weight.view(-1, 1, 1, 1).to(x.dtype)
    return w * x + (1 - w) * x[partner], partner, weight, blended


@torch.no_grad()
def ensemble_probabilities(
    teachers: list[Classifier], x: torch.Tensor, n_frozen: int, temperature: float
) -> torch.Tensor:
    """[B, C] the teachers' softened probabilities on front maps ``x``, averaged."""
    probs = [torch.softmax(t.tail_logits(x, n_frozen) / temperature, dim=1) for t in teachers]
    return torch.stack(probs).mean(dim=0)


def train_tail(
    recipe: Recipe,
    pool: Pool,
    epochs: int,
    seed: int,
    desc: str,
    on_epoch: EpochHook | None = None,
    ensemble: list[Classifier] | None = None,
    start: Classifier | None = None,
    checkpoint: Path | None = None,
) -> Classifier:
    """Train the tail (blocks after ``freeze_blocks``, head) from ImageNet weights on cached views.

    With ``start`` (a package's network, its BatchNorm folded into the convolutions) the tail starts
    from that network's weights and its BatchNorm layers stay as they are (eval mode): only the
    weights move. With ``checkpoint`` the state after each epoch is saved there, and a run
    interrupted after an epoch resumes from it exactly (weights, average, optimizer and random
    streams); the file is removed when the tail is finished.

    Each step draws a class-balanced batch of images and one cached view of each; with teacher
    ``targets`` the loss is ``alpha * CE(label) + (1 - alpha) * T^2 * CE(teacher_T, student_T)``.
    With an ``ensemble`` (the teachers, in eval mode) and the recipe's ``distill_mix`` > 0, that share
    of each batch is blended with a partner image (:func:`blend`): its label term weighs both labels
    by the blend and its target is the ensemble's probabilities on the blend.
    Returns the exponential moving average of the weights; ``on_epoch(epoch, ema)`` returning True stops.
    """
    cfg = recipe.train
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    num_classes = len(recipe.classes)
    model = copy.deepcopy(start) if start is not None else build_model(recipe)
    ema = _freeze(model, cfg.freeze_blocks)
    optimizer = _optimizer(model, cfg)
    first_epoch, step = 0, 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        first_epoch, step = int(saved["epoch"]) + 1, int(saved["step"])
        tqdm.write(f"{desc}: resumed after epoch {first_epoch} of {epochs} from {checkpoint}")
    n = pool.views.n_images
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)
    total, warmup = steps * epochs, int(cfg.warmup_epochs * steps)
    weights = sampling_weights(pool.labels, num_classes, cfg.balance_power, pool.strata)
    labels = torch.from_numpy(pool.labels)
    temperature, alpha = cfg.distill_temperature, cfg.distill_alpha
    mixing = ensemble is not None and cfg.distill_mix > 0
    for epoch in range(first_epoch, epochs):
        set_train_mode(model, cfg.freeze_blocks)
        if start is not None:  # folded BatchNorm: statistics stay, only weights move
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
        order = torch.multinomial(weights, steps * batch, replacement=True, generator=gen).view(steps, batch)
        for idx in tqdm(order, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            view = torch.randint(pool.views.n_views, (len(idx),), generator=gen)
            x = pool.views.maps[idx, view].float()
            if mixing:
                x, partner, weight, blended = blend(x, cfg.distill_mix, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            logits = model.tail_logits(x, cfg.freeze_blocks)
            if mixing:
                ce = partial(F.cross_entropy, logits, reduction="none", label_smoothing=cfg.label_smoothing)
                loss = (weight * ce(labels[idx]) + (1 - weight) * ce(labels[idx][partner])).mean()
            else:
                loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg.label_smoothing)
            if pool.targets is not None:
                soft = pool.targets[idx, view]
                if mixing and ensemble is not None and bool(blended.any()):
                    soft = soft.clone()
                    soft[blended] = ensemble_probabilities(ensemble, x[blended], cfg.freeze_blocks, temperature)
                distill = -(soft * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()
                loss = alpha * loss + (1 - alpha) * temperature**2 * distill
            step = optimizer_step(model, ema, optimizer, loss, step, total, warmup, cfg)
        if checkpoint is not None and epoch + 1 < epochs:
            state = {
                "epoch": epoch,
                "step": step,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # a kill mid-write leaves the last epoch
        if on_epoch is not None and on_epoch(epoch, ema):
            break
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return ema


@dataclass
class Teachers:
    """Out-of-fold logits [R, N, V, C] of the train images and the teachers' mean val logits [N, V, C]."""

    oof: np.ndarray
    val: np.ndarray
    folds: np.ndarray  # [R, N]
    targets: torch.Tensor  # [N, K, C]
    wall_time_s: float
    states: list[dict[str, torch.Tensor]]  # each teacher's weights, in training order


def train_teachers(
    recipe: Recipe,
    pool: Pool,
    groups: list[str],
    test_views: ViewCache,
    val_views: ViewCache | None,
    folder: Path | None,
    start: Classifier | None = None,
) -> Teachers:
    """``folds`` x ``repeats`` teachers; each saved in ``folder`` (a re-run loads it instead of training,
    and a teacher interrupted mid-way resumes from its last finished epoch); ``start``: see :func:`train_tail`."""
    cfg = recipe.train
    k, repeats = cfg.folds, cfg.repeats
    epochs = cfg.teacher_epochs or cfg.epochs
    n, c = pool.views.n_images, len(recipe.classes)
    oof = np.zeros((repeats, n, test_views.n_views, c))
    targets = torch.zeros((n, pool.views.n_views, c))
    val_sum = np.zeros((val_views.n_images, val_views.n_views, c)) if val_views is not None else np.zeros(0)
    folds = np.zeros((repeats, n), dtype=np.int64)
    states: list[dict[str, torch.Tensor]] = []
    t0 = time.time()
    for r in range(repeats):
        folds[r] = grouped_folds(pool.labels, groups, k, cfg.seed + r)
        for f in range(k):
            held = np.flatnonzero(folds[r] == f)
            kept = np.flatnonzero(folds[r] != f)
            path = folder / f"r{r}-f{f}.pt" if folder is not None else None
            if path is not None and path.is_file():
                teacher = build_model(recipe, pretrained=False)
                teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                seed = cfg.seed + 1000 * (r + 1) + f
                partial = path.with_suffix(".partial") if path is not None else None
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                teacher = train_tail(
                    recipe, _subset(pool, kept), epochs, seed, f"teacher {r + 1}.{f + 1}", None, None, start, partial
                )
                if path is not None:
                    torch.save(teacher.state_dict(), path.with_name(path.name + ".tmp"))
                    path.with_name(path.name + ".tmp").replace(path)
            states.append(teacher.state_dict())
            oof[r, held] = view_logits(teacher, test_views.subset(held), cfg.freeze_blocks)
            on_views = view_logits(teacher, pool.views.subset(held), cfg.freeze_blocks)
            targets[torch.from_numpy(held)] += torch.softmax(
                torch.from_numpy(on_views) / cfg.distill_temperature, -1
            ).float()
            if val_views is not None:
                val_sum += view_logits(teacher, val_views, cfg.freeze_blocks)
            y, p = pool.labels[held], calibrate(oof[r, held].mean(axis=1), 1.0)
            tqdm.write(
                f"teacher {r + 1}.{f + 1}: held-out fold of {len(held)} images: "
                f"acc {metrics.accuracy(y, p.argmax(1)):.3f} AUROC {metrics.macro_auc(y, p):.3f}"
            )
    return Teachers(oof, val_sum / (k * repeats), folds, targets / repeats, time.time() - t0, states)


@torch.no_grad()
def reestimate_batchnorm(model: Classifier, views: ViewCache, n_frozen: int, batch: int = 64) -> None:
    """Measure the running statistics of the tail's BatchNorm layers afresh on cached views.

    Each layer's statistics become the plain average over every batch of every view (momentum None),
    then the layers go back to their momentum; the frozen front's layers are not run, so theirs stay.
    """
    set_train_mode(model, n_frozen)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training]
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    for start in range(0, views.n_images, batch):
        for view in range(views.n_views):
            x = views.maps[start : start + batch, view].float().contiguous(memory_format=torch.channels_last)
            model.tail_logits(x, n_frozen)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()


def teacher_models(recipe: Recipe, states: list[dict[str, torch.Tensor]]) -> list[Classifier]:
    """The teachers as networks in eval mode, without gradients (targets for a blended batch)."""
    models = []
    for state in states:
        model = build_model(recipe, pretrained=False)
        model.load_state_dict(state)
        model.requires_grad_(False)
        models.append(model.eval())
    return models


def weight_soup(recipe: Recipe, states: list[dict[str, torch.Tensor]], views: ViewCache) -> Classifier:
    """One network of the served size from the teachers: the uniform average of their weights.

    Every teacher's tail starts from the same ImageNet weights and trains briefly on most of the same
    images, so the average of the weights is itself a working network that keeps much of what
    averaging the teachers' outputs gains (a "model soup", Wortsman et al., ICML 2022). BatchNorm
    statistics of an average network are not the average of the statistics: they are measured again
    on ``views`` (the train images' cached views).
    """
    if not states:
        raise ValueError("a weight soup needs at least one teacher")
    averaged = {
        name: torch.stack([s[name].float() for s in states]).mean(dim=0).to(first.dtype)
        if first.dtype.is_floating_point
        else first.clone()
        for name, first in states[0].items()
    }
    model = build_model(recipe, pretrained=False)
    model.load_state_dict(averaged)
    reestimate_batchnorm(model, views, recipe.train.freeze_blocks)
    return model


def oof_report(recipe: Recipe, y: np.ndarray, oof_logits: np.ndarray, n_boot: int = 1000) -> dict[str, Any]:
    """Metrics of the pooled out-of-fold predictions [R, N, C] (softmax, no calibration): each repeat's
    report, and for the headline figures the mean over repeats with the first repeat's interval."""
    classes, malignant = recipe.class_ids, [c.malignant for c in recipe.classes]
    reports = [
        metrics.classification_report(
            y, calibrate(logits, 1.0), classes, malignant, n_boot=n_boot, seed=r, calibration=False
        )
        for r, logits in enumerate(oof_logits)
    ]
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")
    out: dict[str, Any] = {"n": len(y), "repeats": len(reports)}
    for key in keys:
        out[key] = float(np.mean([rep[key] for rep in reports]))
        out[f"{key}_by_repeat"] = [rep[key] for rep in reports]
    out["intervals"] = reports[0]["intervals"]
    if "malignant" in reports[0]:
        out["malignant_auc"] = float(np.mean([rep["malignant"]["auc"] for rep in reports]))
        out["malignant_auc_interval"] = reports[0]["malignant"]["intervals"]["auc"]
    out["per_class_recall"] = {c: float(np.mean([rep["per_class"][c]["recall"] for rep in reports])) for c in classes}
    return out


def agreement(teacher_logits: np.ndarray, student_logits: np.ndarray) -> dict[str, float]:
    """How close a student's answers are to its teachers' on the same images ([N, C] logits each):
    the mean KL divergence of the student's probabilities from the teachers' (softmax at T = 1) and
    the share of images where both put the same class first."""
    same = (np.asarray(teacher_logits).argmax(1) == np.asarray(student_logits).argmax(1)).mean()
    return {"kl": mean_kl(teacher_logits, student_logits), "same_top_class": float(same)}


def _student(
    recipe: Recipe,
    pool: Pool,
    teachers: Teachers,
    val: SplitData,
    val_tta: ViewCache,
    names: tuple[str, ...],
    candidates: list[tuple[str, ...]],
    history: list[dict[str, Any]],
) -> tuple[Classifier, int, dict[str, float]]:
    """The student trained on every train image towards the teachers' out-of-fold probabilities,
    its epoch chosen on val; appends one record per epoch to ``history``. Returns it, its epoch
    (0-based) and its val figures."""
    cfg = recipe.train
    num_classes = len(recipe.classes)
    best: dict[str, Any] = {"score": -math.inf, "epoch": -1, "state": None, "val": None}
    t_student = time.time()
    ensemble = teacher_models(recipe, teachers.states) if cfg.distill_mix > 0 else None
    bn_views = ViewCache(pool.views.maps[:, :BATCHNORM_VIEWS], pool.views.names)
    teacher_val = mean_over(teachers.val, names, candidates[0])

    def on_epoch(epoch: int, ema: Classifier) -> bool:
        if ensemble is not None:
            # Blended maps are narrower than real ones, so the running BatchNorm statistics the
            # steps left are measured again on the real cached views (on a copy: training goes on).
            ema = copy.deepcopy(ema)
            reestimate_batchnorm(ema, bn_views, cfg.freeze_blocks)
        val_logits = mean_over(view_logits(ema, val_tta, cfg.freeze_blocks), names, candidates[0])
        val_metrics = quick_metrics(val.labels, val_logits, num_classes)
        closeness = agreement(teacher_val, val_logits)
        score = val_metrics[cfg.select_metric]
        improved = score > best["score"]
        if improved:
            best.update(
                score=score, epoch=epoch, state={k: v.clone() for k, v in ema.state_dict().items()}, val=val_metrics
            )
        history.append(
            {"epoch": epoch + 1, "val": val_metrics, "val_to_teachers": closeness, "elapsed_s": time.time() - t_student}
        )
        tqdm.write(
            f"student epoch {epoch + 1}: val loss {val_metrics['loss']:.3f} acc {val_metrics['accuracy']:.3f} "
            f"bal-acc {val_metrics['balanced_accuracy']:.3f} AUROC {val_metrics['macro_auc']:.3f} "
            f"KL to teachers {closeness['kl']:.4f}" + (" *best*" if improved else "")
        )
        return epoch - int(best["epoch"]) >= cfg.patience

    student_pool = Pool(pool.views, pool.labels, pool.strata, teachers.targets)
    train_tail(recipe, student_pool, cfg.epochs, cfg.seed, "student", on_epoch, ensemble)
    student = build_model(recipe, pretrained=False)
    student.load_state_dict(best["state"])
    return student.eval(), int(best["epoch"]), best["val"]


def fit_distilled(
    recipe: Recipe, samples: list[Sample], out_dir: Path, command: str, start: Classifier | None = None
) -> dict[str, Any]:
    """Teachers, then the served network (the student, or with ``method = "soup"`` the teachers' weight
    soup; with ``"ensemble"`` the teachers themselves); writes ``best.pt`` and ``history.json`` like
    :func:`train.fit`. With ``start`` (a package's network) the front is that network's and every
    teacher's tail starts from its weights (:func:`train_tail`)."""
    cfg = recipe.train
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    samples, _ = drop_labels(samples, recipe.excluded_labels)
    train, val = load_split(samples, "train", recipe), load_split(samples, "val", recipe)
    tqdm.write(f"loaded {len(train.labels)} train / {len(val.labels)} val images in {time.time() - t0:.0f}s")
    front = start if start is not None else build_model(recipe)
    gen = torch.Generator().manual_seed(cfg.seed)
    candidates = candidate_views(recipe)
    names = union_views(candidates)
    t_cache = time.time()
    pool = Pool(
        augmented_views(front, train.pixels, recipe, cfg.cache_views, gen),
        train.labels,
        balance_strata(train.samples, cfg),
    )
    train_tta = test_time_views(front, train.pixels, recipe, names)
    val_tta = test_time_views(front, val.pixels, recipe, names)
    cache_s = time.time() - t_cache
    tqdm.write(f"cached {pool.views.nbytes() / 2**20:.0f} MiB of front maps in {cache_s:.0f}s")

    groups = [s.group_id for s in train.samples]
    teachers = train_teachers(recipe, pool, groups, train_tta, val_tta, out_dir / TEACHERS, start)
    teacher_oof = oof_report(recipe, train.labels, np.stack([mean_over(o, names, candidates[0]) for o in teachers.oof]))
    tqdm.write(
        "teachers out of fold: "
        + json.dumps({k: teacher_oof[k] for k in ("accuracy", "balanced_accuracy", "macro_auc")})
    )

    num_classes = len(recipe.classes)
    timings = {"cache": round(cache_s, 1), "teachers": round(teachers.wall_time_s, 1)}
    soup: Classifier | None = None
    soup_val: dict[str, float] = {}
    if start is None:  # a soup re-measures BatchNorm, which a package's folded network does not have
        t_soup = time.time()
        soup = weight_soup(recipe, teachers.states, pool.views)
        soup_val = quick_metrics(
            val.labels, mean_over(view_logits(soup, val_tta, cfg.freeze_blocks), names, candidates[0]), num_classes
        )
        timings["soup"] = round(time.time() - t_soup, 1)
        tqdm.write("teachers' weight soup on val: " + json.dumps(soup_val))
    history: list[dict[str, Any]] = []
    served: Classifier | None
    if cfg.method == "ensemble":  # the teachers serve together (training/ensemble.py): no one network
        served, epoch = None, (cfg.teacher_epochs or cfg.epochs) - 1
        served_val = quick_metrics(val.labels, mean_over(teachers.val, names, candidates[0]), num_classes)
    elif cfg.method == "soup" and soup is not None:
        served, epoch, served_val = soup, (cfg.teacher_epochs or cfg.epochs) - 1, soup_val
    else:
        served, epoch, served_val = _student(recipe, pool, teachers, val, val_tta, names, candidates, history)
        timings["student"] = round(history[-1]["elapsed_s"], 1)
    val_views = view_logits(served, val_tta, cfg.freeze_blocks) if served is not None else teachers.val
    chosen, view_scores = choose_views(
        recipe, val_views, names, lambda logits: quick_metrics(val.labels, logits, num_classes)[cfg.select_metric]
    )
    teachers_on_val = mean_over(teachers.val, names, chosen)
    teacher_val = quick_metrics(val.labels, teachers_on_val, num_classes)
    to_teachers = agreement(teachers_on_val, mean_over(val_views, names, chosen))
    tqdm.write(
        f"test-time views {list(chosen)} (val {cfg.select_metric}: {view_scores}); teachers on val: {teacher_val}"
    )
    state = served.state_dict() if served is not None else None  # an ensemble's members are the teachers
    torch.save({"model": state, "epoch": epoch, "val": served_val}, out_dir / BEST)
    summary = {
        "command": command,
        "method": cfg.method,
        "recipe": recipe.to_dict(),
        "best_epoch": epoch + 1,
        "best_val": served_val,
        "epochs_run": len(history) if history else epoch + 1,
        "wall_time_s": round(time.time() - t0, 1),
        "timings_s": timings,
        "cache_mib": round(pool.views.nbytes() / 2**20, 1),
        "machine": machine_description(),
        "history": history,
        "config": recipe.to_dict()["train"],
        "test_time_views": list(chosen),
        "view_choice_val": view_scores,
        "teachers": {
            "models": cfg.folds * cfg.repeats,
            "folds": cfg.folds,
            "repeats": cfg.repeats,
            "epochs": cfg.teacher_epochs or cfg.epochs,
            "out_of_fold": teacher_oof,
            "val_uncalibrated": teacher_val,
            "served_on_val": to_teachers,
        },
        "soup": {"models": len(teachers.states), "val_uncalibrated": soup_val} if soup is not None else None,
        "start": "package" if start is not None else "imagenet",
    }
    (out_dir / "history.json").write_text(json.dumps(summary, indent=2))
    return summary


def cross_validate(recipe: Recipe, samples: list[Sample], folder: Path | None = None) -> dict[str, Any]:
    """Repeated grouped k-fold cross-validation of the recipe on train + val pooled (test untouched).

    ``folds`` x ``repeats`` models are trained exactly as teachers are; each image is predicted by the
    model that did not see it, for each repeat. Returns the pooled out-of-fold metrics (mean over
    repeats, with the bootstrap interval of the first), per candidate test-time view set, and per
    value of the recipe's ``report_by`` columns.
    """
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    samples, _ = drop_labels(samples, recipe.excluded_labels)
    rows = [s for s in samples if s.split in ("train", "val")]
    data = load_split(rows, "all", recipe)
    front = build_model(recipe)
    gen = torch.Generator().manual_seed(cfg.seed)
    candidates = candidate_views(recipe)
    names = union_views(candidates)
    pool = Pool(
        augmented_views(front, data.pixels, recipe, cfg.cache_views, gen),
        data.labels,
        balance_strata(data.samples, cfg),
    )
    tta = test_time_views(front, data.pixels, recipe, names)
    groups = [s.group_id for s in data.samples]
    teachers = train_teachers(recipe, pool, groups, tta, None, folder)
    by_views = {
        "+".join(views): oof_report(recipe, data.labels, np.stack([mean_over(o, names, views) for o in teachers.oof]))
        for views in candidates
    }
    classes, malignant = recipe.class_ids, [c.malignant for c in recipe.classes]
    first = calibrate(mean_over(teachers.oof[0], names, candidates[0]), 1.0)
    by = subgroup_reports(data.labels, first, data.samples, classes, malignant, recipe.report_by)
    result: dict[str, Any] = finite(
        {
            "n": len(rows),
            "folds": cfg.folds,
            "repeats": cfg.repeats,
            "recipe": recipe.to_dict(),
            "out_of_fold": by_views["+".join(candidates[0])],
            "by_views": by_views,
            "by": by,
            "wall_time_s": round(time.time() - t0, 1),
            "machine": machine_description(),
        }
    )
    return result
