"""How close distilled students are to one fixed set of teachers, on `val` (test is not read).

    python scripts/teacher_closeness.py ../shared/datasets/breast-us --model-id breast-us \
        --teachers 'runs/breast/teachers/r0-*.pt' runs/breast-e60 runs/breast-r2

Each run folder's served network (``best.pt``) and every teacher file matching the pattern are
rebuilt by the recipe (``recipes/<model-id>.toml``) and run on the `val` images alone (no
test-time views). Printed: the teachers' ensemble's `val` figures (mean logits, uncalibrated) and,
per run, the served epoch, the KL divergence of its probabilities from the ensemble's and the share
of images where both put the same class first (``training.distill.agreement``, the figure every
distilled run records against its *own* teachers), with its own `val` figures. Runs trained from
different teachers (another ``repeats``) can so be compared against the same ensemble.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oncolens.evaluation.datasets import drop_labels, read_manifest
from oncolens.training.distill import agreement
from oncolens.training.recipe import resolve_recipe
from oncolens.training.train import build_model, load_split, quick_metrics
from oncolens.training.views import test_time_views, view_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="the dataset folder (manifest.csv and images)")
    parser.add_argument("--model-id", required=True, help="whose recipe (recipes/<model-id>.toml)")
    parser.add_argument("--teachers", required=True, help="glob of teacher files, e.g. 'runs/x/teachers/r0-*.pt'")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders holding best.pt")
    args = parser.parse_args()

    recipe = resolve_recipe(None, args.model_id)
    samples, _ = drop_labels(read_manifest(args.dataset), recipe.excluded_labels)
    val = load_split(samples, "val", recipe)
    views = test_time_views(build_model(recipe), val.pixels, recipe, ("identity",))
    n_classes = len(recipe.classes)

    def val_logits(state: dict[str, Any]) -> np.ndarray:
        model = build_model(recipe, pretrained=False)
        model.load_state_dict(state)
        return view_logits(model.eval(), views, recipe.train.freeze_blocks)[:, 0]

    files = sorted(Path().glob(args.teachers))
    if not files:
        parser.error(f"no teacher file matches {args.teachers!r}")
    ensemble = np.mean([val_logits(torch.load(f, map_location="cpu", weights_only=True)) for f in files], axis=0)
    figures = quick_metrics(val.labels, ensemble, n_classes)
    print(f"{len(files)} teachers' ensemble on val: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    for run in args.runs:
        checkpoint = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
        logits = val_logits(checkpoint["model"])
        close = agreement(ensemble, logits)
        own = quick_metrics(val.labels, logits, n_classes)
        print(
            f"{run} (epoch {checkpoint['epoch'] + 1}): KL {close['kl']:.4f}, same top class "
            f"{close['same_top_class']:.1%}; val " + ", ".join(f"{k} {v:.4f}" for k, v in own.items())
        )


if __name__ == "__main__":
    main()
