"""The ``oncolens`` command line: train, evaluate and export models."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="OncoLens: calibrated, explained cancer screening models (decision support).")

ZOO_DIR = Path(__file__).parent / "zoo"
SAMPLES_DIR = Path("samples")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def train(
    dataset_dir: Annotated[Path, typer.Argument(help="Folder with manifest.csv and the images.")],
    model_id: Annotated[str, typer.Option("--model-id", help="Id of the package to write.")],
    recipe: Annotated[Path | None, typer.Option(help="Recipe TOML (default recipes/<model-id>.toml).")] = None,
    backbone: Annotated[str | None, typer.Option(help="efficientnet-lite0, -lite1 or -lite2.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size in pixels.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum number of epochs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    out: Annotated[Path | None, typer.Option(help="Package directory (default the built-in zoo).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints; re-use it to resume.")] = None,
) -> None:
    """Fine-tune, calibrate on val, evaluate on test and write a model package."""
    from oncolens.datasets import ManifestError, read_manifest
    from oncolens.training.recipe import RecipeError, resolve_recipe
    from oncolens.training.train import fit

    try:
        chosen = resolve_recipe(recipe, model_id).with_overrides(
            backbone=backbone, image_size=image_size, epochs=epochs, seed=seed, batch_size=batch_size
        )
        samples = read_manifest(dataset_dir)
    except (RecipeError, ManifestError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    runs = run_dir or Path("runs") / model_id
    command = "oncolens " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    fit(chosen, samples, runs, command)
    from oncolens.training.pipeline import finalize

    package = finalize(chosen, samples, runs, out or ZOO_DIR / model_id, model_id, SAMPLES_DIR / model_id)
    typer.echo(f"wrote model package {package}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A training run folder (holds best.pt).")],
    dataset_dir: Annotated[Path, typer.Argument(help="The dataset it was trained on.")],
    model_id: Annotated[str, typer.Option("--model-id")],
    recipe: Annotated[Path | None, typer.Option(help="Recipe TOML (default recipes/<model-id>.toml).")] = None,
    out: Annotated[Path | None, typer.Option(help="Package directory (default the built-in zoo).")] = None,
) -> None:
    """Re-run calibration, test evaluation and ONNX export from a run's best checkpoint."""
    from oncolens.datasets import ManifestError, read_manifest
    from oncolens.training.pipeline import finalize
    from oncolens.training.recipe import RecipeError, resolve_recipe

    try:
        chosen = resolve_recipe(recipe, model_id)
        samples = read_manifest(dataset_dir)
    except (RecipeError, ManifestError) as exc:
        raise _fail(str(exc)) from exc
    package = finalize(chosen, samples, run_dir, out or ZOO_DIR / model_id, model_id, SAMPLES_DIR / model_id)
    typer.echo(f"wrote model package {package}")


@app.command()
def evaluate(
    model_id: Annotated[str, typer.Argument(help="A model in the zoo, e.g. skin-ham10000.")],
    dataset_dir: Annotated[Path, typer.Argument(help="Folder with manifest.csv (file,label[,split]).")],
    split: Annotated[
        str | None, typer.Option(help="train, val, test or all (default: test, or all without splits).")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the metrics as JSON.")] = None,
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="Extra folder(s) of model packages.")
    ] = None,
) -> None:
    """Run a packaged ONNX model on a dataset and print its metrics (no torch needed)."""
    from oncolens.datasets import ManifestError
    from oncolens.evaluation import evaluate_package, format_report
    from oncolens.zoo import ModelNotFound, PackageError, Zoo

    try:
        package = Zoo([ZOO_DIR, *(model_dir or [])]).get(model_id)
        report = evaluate_package(package, dataset_dir, split)
    except (ModelNotFound, PackageError, ManifestError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(format_report(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"\nwrote {json_path}")


if __name__ == "__main__":
    app()
