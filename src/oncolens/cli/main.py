"""The ``oncolens`` command line: serve, predict, train, evaluate and export."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from sqlmodel import Session

    from oncolens.config import Settings
    from oncolens.decision import CaseResult
    from oncolens.evaluation.datasets import Sample
    from oncolens.store.db.models import User
    from oncolens.training.backbones import Classifier
    from oncolens.training.recipe import Recipe
    from oncolens.zoo import Zoo
    from oncolens.zoo.card import ModelCard

# The order `oncolens --help` lists the commands in: what a clinic runs first, then the administrator's
# commands, then the way back (building and checking models).
COMMAND_ORDER = (
    "serve",
    "predict",
    "batch",
    "models",
    "cases",
    "adapt",
    "users",
    "db",
    "backup",
    "restore",
    "evaluate",
    "train",
    "cv",
    "export",
    "distill-views",
    "quantize",
    "fit-domain",
    "export-edge",
)


class _Ordered(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: index for index, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(cls=_Ordered, help="OncoLens: calibrated, explained cancer screening models (decision support).")
db_app = typer.Typer(help="Database schema (Alembic migrations).")
users_app = typer.Typer(help="User accounts.")
models_app = typer.Typer(help="The installed models and their versions.")
cases_app = typer.Typer(help="Cases: the clinic's confirmed cases as a dataset.")
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(models_app, name="models")
app.add_typer(cases_app, name="cases")

ZOO_DIR = Path(__file__).parents[1] / "zoo"  # oncolens/zoo: the built-in packages (zoo.BUILTIN_DIR)
SAMPLES_DIR = Path("samples")


# ``--set KEY=VALUE`` (train, cv, export): a recipe value replaced for this run (see ``_settings``).
RecipeSettings = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: KEY=VALUE (train section) or augment.KEY=VALUE; repeatable."),
]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _command() -> str:
    return "oncolens " + " ".join(shlex.quote(a) for a in sys.argv[1:])


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
    set_: RecipeSettings = None,
    val_only: Annotated[
        bool,
        typer.Option(
            "--val-only",
            help="Stop after training: the run's val figures are in RUN_DIR/history.json, test is not read and "
            "no package is written (package it later with `oncolens export RUN_DIR`).",
        ),
    ] = False,
    one_network: OneNetworkOption = None,
) -> None:
    """Fine-tune, calibrate on val, evaluate on test and write a model package."""
    from oncolens.evaluation.datasets import ManifestError, drop_labels, read_manifest
    from oncolens.training.recipe import RecipeError, resolve_recipe
    from oncolens.training.train import fit

    try:
        chosen = _settings(resolve_recipe(recipe, model_id), set_ or []).with_overrides(
            backbone=backbone, image_size=image_size, epochs=epochs, seed=seed, batch_size=batch_size
        )
        samples, n_excluded = drop_labels(read_manifest(dataset_dir), chosen.excluded_labels)
    except (RecipeError, ManifestError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    if n_excluded:
        typer.echo(
            f"left out {n_excluded} image(s) labelled {', '.join(chosen.excluded_labels)} (recipe exclude_labels)"
        )
    runs = run_dir or Path("runs") / model_id
    command = _command()
    if chosen.train.method in ("distill", "soup", "ensemble"):
        from oncolens.training.distill import fit_distilled

        summary = fit_distilled(chosen, samples, runs, command, _start(chosen, model_id, one_network))
    else:
        summary = fit(chosen, samples, runs, command)
    if val_only:
        best = summary.get("best_val") or {}
        figures = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float))
        typer.echo(f"trained {runs} (val: {figures}); test not read, no package written")
        return
    package = _package(chosen, samples, runs, model_id, out, command, dataset_dir, one_network)
    typer.echo(_written(chosen, package))


def _written(recipe: Recipe, package: Path) -> str:
    """What a packaging step did: a package written, or an ensemble that lost its rule (nothing written)."""
    from oncolens.zoo.card import read_card

    if recipe.train.method == "ensemble" and read_card(package / "card.json").training.get("method") != "ensemble":
        return (
            f"the ensemble did not win the recipe's rule on val: {package} stays as it was "
            "(the comparison is in its card, training.ensemble_candidate)"
        )
    return f"wrote model package {package}"


@app.command("distill-views")
def distill_views(
    model_id: Annotated[str, typer.Argument(help="The package to distil (its test-time views are the teacher).")],
    dataset_dir: Annotated[Path, typer.Argument(help="Its dataset folder (manifest.csv and images).")],
    version: Annotated[str, typer.Option(help="Version of the package to write, e.g. 1.4.0.")],
    recipe: Annotated[Path | None, typer.Option(help="Recipe TOML (default recipes/<model-id>.toml).")] = None,
    teacher: Annotated[Path | None, typer.Option(help="Teacher package folder (default the installed one).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs over the train split.")] = 3,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (warmup + cosine).")] = 1e-4,
    temperature: Annotated[float, typer.Option(min=0.1, help="Softening temperature of the KL loss.")] = 2.0,
    out: Annotated[Path | None, typer.Option(help="Package directory to write (default the built-in zoo).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints; re-use it to resume.")] = None,
) -> None:
    """Tune a one-view copy of a package's network to answer like its test-time views, then package it.

    The student is compared with the teacher on val and kept only within the recipe's export
    tta_tolerance (printed and recorded in the card either way); without --out it replaces the
    installed package only when kept.
    """
    from dataclasses import replace

    from oncolens.evaluation.datasets import ManifestError, read_manifest
    from oncolens.training.export import OnnxWeightsError
    from oncolens.training.recipe import RecipeError, resolve_recipe
    from oncolens.training.view_distill import ViewDistillConfig, check_parity, classifier_from_onnx, teacher_package
    from oncolens.training.view_distill import distill_views as run_distillation

    source = teacher or ZOO_DIR / model_id
    try:
        chosen = resolve_recipe(recipe, model_id)
        chosen = replace(chosen, model={**chosen.model, "version": version})
        samples = read_manifest(dataset_dir)
        onnx_path, views, info = teacher_package(source)
        if len(views) < 2:
            raise _fail(f"{source} answers with one view already: there is nothing to distil")
        student = classifier_from_onnx(chosen, onnx_path)
        check_parity(student, views, onnx_path, chosen.input_spec.size)
    except (RecipeError, ManifestError, OnnxWeightsError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    runs = run_dir or Path("runs") / f"{model_id}-views"
    command = _command()
    config = ViewDistillConfig(epochs, lr, temperature)
    with tempfile.TemporaryDirectory() as held:  # the teacher file, safe from the package being replaced
        teacher_file = Path(held) / onnx_path.name
        shutil.copyfile(onnx_path, teacher_file)
        summary = run_distillation(chosen, samples, teacher_file, views, student, runs, command, config, info)
    kept = summary["view_distillation"]["kept"]
    if out is None and not kept:
        typer.echo(f"the student did not reach the teacher on val: {source} stays; checkpoints in {runs}")
        return
    package = _package(chosen, samples, runs, model_id, out, command, dataset_dir)
    typer.echo(f"wrote model package {package} ({'kept' if kept else 'not kept'} by the val comparison)")


def _package(
    recipe: Recipe,
    samples: list[Sample],
    run_dir: Path,
    model_id: str,
    out: Path | None,
    command: str,
    dataset_dir: Path,
    one_network: Path | None = None,
) -> Path:
    """Package a finished run into ``out`` (default the built-in zoo), with the golden samples' file."""
    from oncolens.training.pipeline import RunError, finalize

    target = out or ZOO_DIR / model_id
    samples_dir = SAMPLES_DIR / model_id
    single = _one_network(recipe, model_id, one_network)
    try:
        return finalize(
            recipe, samples, run_dir, target, model_id, samples_dir, command, dataset_dir, _expected_file(out), single
        )
    except RunError as exc:
        raise _fail(str(exc)) from exc


# ``--one-network DIR`` (train, export): the package an ensemble is measured against.
OneNetworkOption = Annotated[
    Path | None,
    typer.Option(
        "--one-network",
        help="Ensemble recipes: the one-network package to measure the ensemble against (default the installed "
        "model's one-network build, or the installed model itself when it is one network).",
    ),
]


def _start(recipe: Recipe, model_id: str, one_network: Path | None) -> Classifier | None:
    """The one-network package's network, rebuilt and checked, for ``[ensemble] start = "package"``."""
    from oncolens.training.export import OnnxWeightsError
    from oncolens.training.view_distill import check_parity, classifier_from_onnx, teacher_package

    single = _one_network(recipe, model_id, one_network)
    if single is None or recipe.ensemble.start != "package":
        return None
    try:
        onnx_path, views, _ = teacher_package(single)
        network = classifier_from_onnx(recipe, onnx_path)
        check_parity(network, views, onnx_path, recipe.input_spec.size)
    except (OnnxWeightsError, OSError, ValueError) as exc:
        raise _fail(f"the one-network build {single} cannot start the members: {exc}") from exc
    return network.eval()


def _one_network(recipe: Recipe, model_id: str, given: Path | None) -> Path | None:
    """The one-network package an ensemble run is compared with (None for other methods)."""
    from oncolens.zoo import one_network_build

    if recipe.train.method != "ensemble":
        return None
    if given is not None:
        return given
    installed = ZOO_DIR / model_id
    return one_network_build(installed) or installed


def _expected_file(out: Path | None) -> Path | None:
    """Where a new package's golden-sample probabilities go: the shipped samples' expected.json for a
    package built into the zoo; beside a package built elsewhere (``--out``), to copy with it."""
    return None if out is None else out.parent / f"{out.name}.samples-expected.json"


def _settings(recipe: Recipe, pairs: list[str]) -> Recipe:
    """The recipe with ``key=value`` ([train]) and ``augment.key=value`` ([augment]) replaced."""
    from dataclasses import replace

    from oncolens.training.recipe import RecipeError

    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, _, name = key.rpartition(".")
        section = section or "train"
        if not sep or section not in ("train", "augment"):
            raise RecipeError(f"--set {pair!r}: expected KEY=VALUE or augment.KEY=VALUE")
        current = getattr(recipe, section)
        if not hasattr(current, name):
            raise RecipeError(f"--set {pair!r}: [{section}] has no key {name!r}")
        kind = type(getattr(current, name))
        try:
            value = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
        except ValueError as exc:
            raise RecipeError(f"--set {pair!r}: {name} takes a {kind.__name__}") from exc
        recipe = replace(recipe, **{section: replace(current, **{name: value})})
    return recipe


@app.command()
def cv(
    dataset_dir: Annotated[Path, typer.Argument(help="Folder with manifest.csv and the images.")],
    model_id: Annotated[str, typer.Option("--model-id", help="Whose recipe (recipes/<model-id>.toml).")],
    recipe: Annotated[Path | None, typer.Option(help="Recipe TOML (default recipes/<model-id>.toml).")] = None,
    folds: Annotated[int | None, typer.Option(help="Folds (default the recipe's).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Repeats with other fold cuts (default the recipe's).")] = None,
    set_: RecipeSettings = None,
    only: Annotated[
        str | None, typer.Option(help="Train and score only the rows whose metadata COLUMN=VALUE, e.g. a source.")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")] = None,
) -> None:
    """Repeated grouped k-fold cross-validation on train + val: compare recipes without touching test."""
    from oncolens.evaluation.datasets import ManifestError, read_manifest
    from oncolens.training.distill import cross_validate
    from oncolens.training.recipe import RecipeError, resolve_recipe

    try:
        chosen = _settings(resolve_recipe(recipe, model_id), set_ or []).with_overrides(folds=folds, repeats=repeats)
        samples = read_manifest(dataset_dir)
        if only is not None:
            column, sep, value = only.partition("=")
            if not sep or any(column not in s.metadata for s in samples):
                raise ManifestError(f"--only {only!r}: expected COLUMN=VALUE with a manifest column")
            samples = [s for s in samples if s.metadata[column] == value]
            if not samples:
                raise ManifestError(f"--only {only!r}: no rows")
        result = cross_validate(chosen, samples)
    except (RecipeError, ManifestError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    result["only"] = only
    result["set"] = set_ or []
    oof = result["out_of_fold"]
    typer.echo(
        f"{model_id}: {result['folds']}-fold x {result['repeats']} out of fold on {result['n']} train+val images"
    )
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "ece"):
        low, high = oof["intervals"][key]
        typer.echo(f"  {key:<18} {oof[key]:.3f}  [{low:.3f}, {high:.3f}]  by repeat {oof[f'{key}_by_repeat']}")
    if "malignant_auc" in oof:
        low, high = oof["malignant_auc_interval"]
        typer.echo(f"  {'malignant_auc':<18} {oof['malignant_auc']:.3f}  [{low:.3f}, {high:.3f}]")
    for views, report in result["by_views"].items():
        typer.echo(
            f"  views {views}: balanced accuracy {report['balanced_accuracy']:.3f}, AUROC {report['macro_auc']:.3f}"
        )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A training run folder (holds best.pt).")],
    dataset_dir: Annotated[Path, typer.Argument(help="The dataset it was trained on.")],
    model_id: Annotated[str, typer.Option("--model-id")],
    recipe: Annotated[Path | None, typer.Option(help="Recipe TOML (default recipes/<model-id>.toml).")] = None,
    out: Annotated[Path | None, typer.Option(help="Package directory (default the built-in zoo).")] = None,
    set_: RecipeSettings = None,
    one_network: OneNetworkOption = None,
) -> None:
    """Re-run calibration, test evaluation and ONNX export from a run's best checkpoint."""
    from oncolens.evaluation.datasets import ManifestError, read_manifest
    from oncolens.training.pipeline import RunError, finalize
    from oncolens.training.recipe import RecipeError, resolve_recipe

    try:
        chosen = _settings(resolve_recipe(recipe, model_id), set_ or [])
        samples = read_manifest(dataset_dir)
    except (RecipeError, ManifestError) as exc:
        raise _fail(str(exc)) from exc
    try:
        package = finalize(
            chosen,
            samples,
            run_dir,
            out or ZOO_DIR / model_id,
            model_id,
            SAMPLES_DIR / model_id,
            _command(),
            dataset_dir,
            _expected_file(out),
            _one_network(chosen, model_id, one_network),
        )
    except RunError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(_written(chosen, package))


@app.command()
def evaluate(
    model_id: Annotated[str, typer.Argument(help="A model in the zoo, e.g. skin-ham10000.")],
    dataset_dir: Annotated[Path, typer.Argument(help="Folder with manifest.csv (file,label[,split]).")],
    split: Annotated[
        str | None,
        typer.Option(
            help="The rows whose split column holds this name (train, val, test, holdout, ...), or all "
            "(default: test, or all when the manifest has no split column)."
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the metrics as JSON.")] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="Also write one CSV row per image: file, label, each class's calibrated probability, "
            "p_malignant and the predicted class.",
        ),
    ] = None,
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="Extra folder(s) of model packages.")
    ] = None,
) -> None:
    """Run a packaged ONNX model on a dataset and print its metrics (no torch needed)."""
    from oncolens.config import Settings
    from oncolens.evaluation.datasets import ManifestError
    from oncolens.evaluation.evaluate import evaluate_package, format_report
    from oncolens.zoo import ModelNotFound, PackageError, Zoo

    try:
        package = Zoo.from_settings(Settings(), model_dir or []).get(model_id)
        report = evaluate_package(package, dataset_dir, split, predictions=predictions, progress=_progress)
    except (ModelNotFound, PackageError, ManifestError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(format_report(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"\nwrote {json_path}")


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="Extra folder(s) of model packages.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per model instead of a table.")] = False,
) -> None:
    """The installed models: id, version, modality, classes, headline test figures and licence; the
    subcommands manage their versions (install, shadow, promote, rollback) and show their monitoring."""
    if ctx.invoked_subcommand is not None:
        return
    from oncolens.config import Settings
    from oncolens.zoo import ModelPackage, PackageError, Zoo

    settings = Settings()
    zoo = Zoo.from_settings(settings, model_dir or [])
    _installed_versions(zoo, settings)
    rows: list[dict[str, Any]] = []
    for model_id in zoo.ids():
        try:
            card = zoo.get(model_id).card
        except PackageError as exc:
            rows.append({"id": model_id, "error": str(exc)})
            continue
        builds = [(card, True)]
        other = _other_build(zoo.paths[model_id])
        if other is not None:
            try:
                builds.append((ModelPackage.load(other, precision="fp32").card, False))
            except PackageError as exc:
                rows.append({"id": model_id, "served": False, "error": str(exc)})
        rows.extend(_model_row(model_id, c, served) for c, served in builds)
    if json_out:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    _models_table(rows)


def _installed_versions(zoo: Zoo, settings: Settings) -> None:
    """Put the versions the database says serve (``models promote``) in place, where a database exists
    (the listing then shows what a server serves); a missing or unreachable database leaves the shipped ones."""
    from sqlalchemy.exc import SQLAlchemyError

    from oncolens.services.versions import VersionSync
    from oncolens.store.db import make_engine

    url = settings.resolved_database_url
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).is_file():
        return
    engine = make_engine(url)
    try:
        VersionSync(engine, zoo, settings.data_dir / "models").run()
    except SQLAlchemyError:
        pass  # no schema yet, or the database is down: the shipped packages are what would serve
    finally:
        engine.dispose()


def _other_build(served: Path) -> Path | None:
    """The build of a model that does not serve: an ensemble's kept one-network build, or (with
    ``ONCOLENS_ONE_NETWORK``) the ensemble it sits in."""
    from oncolens.zoo import ONE_NETWORK, one_network_build

    if served.name == ONE_NETWORK:
        return served.parent
    return one_network_build(served)


def _model_row(model_id: str, card: ModelCard, served: bool) -> dict[str, Any]:
    m = card.metrics
    return {
        "id": model_id,
        "version": card.version,
        "build": card.build,
        "served": served,
        "modality": f"{card.organ}/{card.modality}",
        "classes": len(card.classes),
        "test_n": m.get("n"),
        "balanced_accuracy": m.get("balanced_accuracy"),
        "macro_auc": m.get("macro_auc"),
        "non_commercial": card.dataset.no_commercial_use,
        "licence_flag": card.dataset.licence_flag,
        "license": card.dataset.license,
        "title": card.title,
    }


def _models_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        typer.echo("no models installed")
        return

    def fig(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "-"

    typer.echo(
        f"{'id':<17}{'version':<9}{'build':<22}{'organ/modality':<26}{'cls':>4}{'test n':>8}{'bal-acc':>9}"
        f"{'AUROC':>7}  licence"
    )
    for r in rows:
        if "error" in r:
            typer.echo(f"{r['id']:<17}BROKEN: {r['error']}")
            continue
        build = f"{r['build']}{' (serves)' if r['served'] else ''}"
        flag = r["licence_flag"] or "see the card"
        typer.echo(
            f"{r['id']:<17}{r['version']:<9}{build:<22}{r['modality']:<26}{r['classes']:>4}{r['test_n'] or '-':>8}"
            f"{fig(r['balanced_accuracy']):>9}{fig(r['macro_auc']):>7}  {flag}"
        )
    typer.echo(
        "\ntest figures are on each dataset's own test split (`oncolens evaluate` re-measures them); "
        "the licence terms are on each model's page and card; ONCOLENS_ONE_NETWORK serves a model's one-network build"
    )


@app.command()
def quantize(
    model_id: Annotated[str, typer.Argument(help="A model in the zoo, e.g. skin-ham10000.")],
    dataset_dir: Annotated[Path, typer.Argument(help="The model's dataset (manifest.csv with train/val/test).")],
    calibration_images: Annotated[int, typer.Option(min=8, help="Train images that set the int8 ranges.")] = 200,
    qat_steps: Annotated[
        int, typer.Option(min=0, help="Steps of quantization-aware tuning towards the fp32 model (0: none).")
    ] = 0,
    qat_images: Annotated[int, typer.Option(min=8, help="Train images the quantization-aware tuning uses.")] = 512,
    qat_export: Annotated[
        Path | None,
        typer.Option(help="Write a tuning bundle here (for `python -m oncolens.training.qat` on a GPU) and stop."),
    ] = None,
    qat_tuned: Annotated[
        Path | None, typer.Option(help="Gate the tuned copy of this bundle instead of making one here.")
    ] = None,
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="Extra folder(s) of model packages.")
    ] = None,
) -> None:
    """Make a package's int8 copy (calibrated on train images) and gate it against fp32 on val and test.

    ``--qat-steps N`` then tunes the copy's weights, in a fake-quantized copy of its own graph, to
    answer like the fp32 model on train images (quantization-aware distillation) before the gate.
    On a GPU elsewhere: ``--qat-export DIR`` writes the bundle, ``python -m oncolens.training.qat DIR
    --seconds 60`` tunes it there, and ``--qat-tuned DIR`` gates the result here.

    The copy ships only if every criterion holds (AUROC, balanced accuracy, ECE, the golden samples'
    probabilities and heat-maps); the card records both files' figures either way, and the golden
    samples' expected.json gains the int8 probabilities.
    """
    from oncolens.config import Settings
    from oncolens.evaluation.datasets import ManifestError
    from oncolens.training.pipeline import record_sample_expectations
    from oncolens.training.qat import QatError
    from oncolens.training.quantize import QuantizeError, add_int8, export_qat
    from oncolens.zoo import ModelNotFound, PackageError, Zoo

    if qat_export is not None and (qat_tuned is not None or qat_steps > 0):
        raise _fail("--qat-export writes a bundle to tune elsewhere: it takes neither --qat-tuned nor --qat-steps")
    try:
        zoo = Zoo.from_settings(Settings(), model_dir or [])
        directory = zoo.get(model_id).directory
        if qat_export is not None:
            export_qat(directory, dataset_dir, qat_export, calibration_images, qat_images, log=typer.echo)
            typer.echo(f"tune it with: python -m oncolens.training.qat {qat_export} --seconds 60")
            return
        info = add_int8(
            directory,
            dataset_dir,
            SAMPLES_DIR / model_id,
            calibration_images,
            log=typer.echo,
            qat_steps=qat_steps,
            qat_images=qat_images,
            tuned=qat_tuned,
        )
    except (ModelNotFound, PackageError, ManifestError, QatError, QuantizeError, OSError) as exc:
        raise _fail(str(exc)) from exc
    for check in info.gate["checks"]:
        mark = "ok  " if check["passed"] else "FAIL"
        typer.echo(f"  {mark} {check['criterion']}: {check['value']} (limit {check['limit']})")
    recorded = record_sample_expectations(directory, SAMPLES_DIR / model_id)
    verdict = "passed: the int8 file serves" if info.passed else "failed: fp32 serves"
    typer.echo(f"{model_id} int8 {verdict}; {recorded} golden sample(s) recorded")


@app.command("export-edge")
def export_edge(
    model_id: Annotated[str, typer.Argument(help="A model in the zoo, e.g. skin-ham10000.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the device files into.")],
    precision: Annotated[
        str, typer.Option(help="int8 (where it passed its accuracy gate; else fp32 is written) or fp32.")
    ] = "int8",
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="Extra folder(s) of model packages.")
    ] = None,
) -> None:
    """Write a model for a phone or a Raspberry-Pi-class device: the ONNX Runtime mobile format (.ort),
    the preprocessing and decision spec (oncolens-edge.json), a reference runner and a README."""
    from oncolens.config import Settings
    from oncolens.zoo import ModelNotFound, PackageError, Zoo
    from oncolens.zoo.edge import export_edge as write
    from oncolens.zoo.package import PRECISIONS, ModelPackage

    if precision not in PRECISIONS:
        raise _fail(f"--precision must be int8 or fp32, got {precision!r}")
    zoo = Zoo.from_settings(Settings(), model_dir or [])
    if model_id not in zoo.paths:
        raise _fail(str(ModelNotFound(model_id, zoo.paths)))
    try:
        package = ModelPackage.load(zoo.paths[model_id], threads=1, precision=precision)
        done = write(package, out_dir)
    except (PackageError, OSError) as exc:
        raise _fail(str(exc)) from exc
    if precision == "int8" and done.precision != "int8":
        int8 = package.card.int8
        why = "has no int8 copy" if int8 is None else "failed its int8 accuracy gate (see the card's int8 section)"
        typer.echo(f"{model_id} {why}: wrote the fp32 model")
    size = done.model.stat().st_size / 1e6
    typer.echo(f"wrote {done.model} ({done.precision}, {size:.1f} MB), {done.spec.name}, predict.py, README.md")


@app.command("fit-domain")
def fit_domain(
    model_id: Annotated[str, typer.Argument(help="A model in the zoo, e.g. skin-ham10000.")],
    dataset_dir: Annotated[Path, typer.Argument(help="The model's dataset (manifest.csv with train/val/test).")],
    other: Annotated[
        list[Path] | None, typer.Option("--other", help="A dataset of another organ or modality (repeatable).")
    ] = None,
    others_from: Annotated[
        Path | None,
        typer.Option(help="A folder of dataset folders named by model id: every one of another organ/modality."),
    ] = None,
    natural: Annotated[Path | None, typer.Option(help="A folder of everyday photographs to measure too.")] = None,
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="Extra folder(s) of model packages.")
    ] = None,
) -> None:
    """Fit the out-of-domain model and quality limits of a package from its dataset (no retraining).

    The threshold passes 95% of the model's own val images; the flagged shares of its own test split,
    of the other datasets' test splits and of the photographs are measured and written to the card.
    """
    from oncolens.config import Settings
    from oncolens.evaluation.datasets import ManifestError, read_manifest
    from oncolens.training.domain_fit import fit_domain as fit
    from oncolens.training.domain_fit import install_domain, other_domains
    from oncolens.vision.domain import DomainFitError
    from oncolens.zoo import ModelNotFound, PackageError, Zoo

    try:
        zoo = Zoo.from_settings(Settings(), model_dir or [])
        package = zoo.get(model_id)
        others = list(other or [])
        if others_from is not None:
            domains = {i: f"{zoo.get(i).card.organ}/{zoo.get(i).card.modality}" for i in zoo.ids()}
            others += other_domains(others_from, model_id, domains)
        result = fit(package, read_manifest(dataset_dir), others, natural, log=typer.echo)
        install_domain(package.directory, result)
    except (ModelNotFound, PackageError, ManifestError, DomainFitError) as exc:
        raise _fail(str(exc)) from exc
    flagged = result.card_section["flagged"]
    section = result.card_section
    typer.echo(f"{model_id}: distance threshold {section['distance_threshold']:.3f} (d={section['dims']})")
    typer.echo(f"  own test flagged: {flagged['own_test']:.3f} of {flagged['own_test_n']}")
    for name, row in flagged["other_datasets_test"].items():
        typer.echo(f"  {name} test flagged: {row['flagged']:.3f} of {row['n']} ({row['refused']} refused by modality)")
    if "natural_photos" in flagged:
        row = flagged["natural_photos"]
        typer.echo(f"  photographs flagged: {row['flagged']:.3f} of {row['n']} ({row['refused']} refused by modality)")
    typer.echo(f"wrote {package.directory / result.card_section['file']} and the card's domain and quality sections")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes (each loads every model).")] = 1,
) -> None:
    """Run the API server (settings come from ONCOLENS_* environment variables).

    Before any model loads it checks the settings, the data folder, the database and the port, and
    stops with one line naming what to fix.
    """
    import uvicorn

    from oncolens.runtime.startup import (
        StartupError,
        check_data_dir,
        check_database,
        check_image_store,
        check_log_file,
        check_port,
        check_secret_key,
        count_users,
        load_settings,
        startup_lines,
    )
    from oncolens.zoo import Zoo

    try:
        settings = load_settings()
        check_data_dir(settings.data_dir)
        check_log_file(settings.log_file)
        check_database(settings.resolved_database_url)
        check_secret_key(settings)
        check_image_store(settings)
        check_port(host, port)
        _upgrade_database()
        users = count_users(settings.resolved_database_url)
    except StartupError as exc:
        raise _fail(str(exc)) from exc
    for line in startup_lines(settings, Zoo.from_settings(settings).ids(), users):
        typer.echo(line)
    typer.echo(f"serving on http://{host}:{port} (web app /, API /api/v1, docs /docs)")

    from oncolens.runtime.logs import log_config

    config = log_config(settings)
    with _metrics_folder(workers):
        uvicorn.run("oncolens.app:create_app", factory=True, host=host, port=port, workers=workers, log_config=config)


@contextmanager
def _metrics_folder(workers: int) -> Iterator[None]:
    """Prometheus multiprocess mode for several workers: a fresh folder where each keeps its values.

    ``PROMETHEUS_MULTIPROC_DIR`` set by the operator is used (emptied first, as the client library
    asks); else a temporary folder lives as long as the server. It must be set before the workers
    start, since they read it when they import the client library.
    """
    if workers <= 1:
        yield
        return
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="oncolens-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image file(s) of one case.")],
    model: Annotated[str, typer.Option("--model", help="Model id, e.g. skin-ham10000.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    heatmap: Annotated[
        Path | None, typer.Option(help="Write the top-class heat-map overlay PNG (OUT-2.png... for more images).")
    ] = None,
) -> None:
    """Predict one case from image files with the same decoder and analysis as the API."""
    from oncolens.api.schemas import PredictionPublic
    from oncolens.config import Settings
    from oncolens.errors import DomainError
    from oncolens.services.analysis import analyse_now
    from oncolens.vision.cam import explanation
    from oncolens.vision.decode import ImageDecodeError
    from oncolens.vision.prepare import RawImage
    from oncolens.zoo import ModelNotFound, PackageError, Zoo

    settings = Settings()
    try:
        package = Zoo.from_settings(settings).get(model)
        raw = [RawImage(path.read_bytes(), path.name) for path in images]
        analysed = analyse_now(package, raw, settings)
    except (ModelNotFound, PackageError, OSError, ImageDecodeError, DomainError) as exc:
        raise _fail(str(exc)) from exc
    result, decoded = analysed.result, analysed.prepared.decoded
    if heatmap is not None:
        for i, (d, feats) in enumerate(zip(decoded, analysed.features, strict=True)):
            out = heatmap if i == 0 else heatmap.with_name(f"{heatmap.stem}-{i + 1}{heatmap.suffix}")
            named = result.images[i].assessment.top_class
            out.write_bytes(explanation(package, d.image, feats, named, (d.width, d.height)).overlay_png)
    if as_json:
        typer.echo(PredictionPublic.from_result(result).model_dump_json(indent=2))
        return
    typer.echo(format_case(result))


@app.command()
def batch(
    folder: Annotated[
        str, typer.Argument(help="Folder of images (searched recursively), or s3://BUCKET/PREFIX with --engine ray.")
    ],
    model: Annotated[str, typer.Option("--model", help="Model id, e.g. skin-ham10000.")],
    out: Annotated[Path, typer.Option(help="results.csv or results.jsonl; re-run with the same file to resume.")],
    heatmaps: Annotated[Path | None, typer.Option(help="Folder for each image's heat-map overlay PNG.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding images.")] = 2,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Images decoded and written together; the model runs them in slices of at most "
            "ONCOLENS_BATCH_MAX backbone passes.",
        ),
    ] = 16,
    model_dir: Annotated[
        list[Path] | None, typer.Option("--model-dir", help="Extra folder(s) of model packages.")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="local: this process; ray: a Ray cluster (Ray Data reads, one ONNX session per actor).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (auto, ray://head:10001); default a local one for the run."),
    ] = None,
    actors: Annotated[
        int | None, typer.Option(min=1, help="Ray actors, each with one model session (default one per CPU).")
    ] = None,
) -> None:
    """Screen every image in a folder with one model: one row per image, unreadable files reported."""
    from tqdm import tqdm

    from oncolens.batch.local import BatchError, run_batch
    from oncolens.config import Settings
    from oncolens.zoo import ModelNotFound, PackageError, Zoo

    if engine not in ("local", "ray"):
        raise _fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (ray_address or actors):
        raise _fail("--ray-address and --actors go with --engine ray")
    settings = Settings()
    try:
        package = Zoo.from_settings(settings, model_dir or []).get(model)
    except (ModelNotFound, PackageError) as exc:
        raise _fail(str(exc)) from exc
    bar = tqdm(total=0, unit="img", desc=f"{package.id}", dynamic_ncols=True)
    errors = 0

    def started(todo: int) -> None:
        bar.total = todo
        bar.refresh()

    def progress(n: int, failed: int) -> None:
        nonlocal errors
        errors += failed
        bar.update(n)
        bar.set_postfix(errors=errors)

    try:
        if engine == "ray":
            from oncolens.batch.ray_engine import run_batch_ray

            summary = run_batch_ray(
                package, folder, out, heatmaps, batch_size, settings, ray_address, actors, progress, started
            )
        else:
            if folder.startswith("s3://"):
                raise BatchError("an s3:// source is read with --engine ray")
            summary = run_batch(
                package, Path(folder), out, heatmaps, workers, batch_size, settings, progress=progress, started=started
            )
    except BatchError as exc:
        bar.close()
        raise _fail(str(exc)) from exc
    bar.close()
    typer.echo(
        f"{summary.analysed} image(s) analysed in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s); "
        f"{summary.skipped} already in {out.name}; {len(summary.not_images)} not images (skipped); "
        f"{len(summary.errors)} could not be analysed"
    )
    if summary.not_images:
        shown = ", ".join(summary.not_images[:5]) + (" ..." if len(summary.not_images) > 5 else "")
        typer.echo(f"  not images, left out: {shown}")
    for name, reason in summary.errors:
        typer.echo(f"  not analysed {name}: {reason}")


def _upgrade_database() -> str:
    from oncolens.config import Settings
    from oncolens.store.db import make_engine, upgrade

    settings = Settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return settings.resolved_database_url


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""
    url = _upgrade_database()
    typer.echo(f"database at the newest revision: {url.split('@')[-1]}")


@db_app.command("refresh-stats")
def db_refresh_stats() -> None:
    """Recount the dashboard's case counts from the cases (after loading cases by SQL, or as a check)."""
    from oncolens.store.stats import rebuild

    with _users_session() as session:
        counted = rebuild(session)
    typer.echo(f"case counts rebuilt from {counted} case(s)")


@app.command()
def backup(
    dest: Annotated[Path, typer.Argument(help="A new or empty folder for the backup (made 0700, files 0600).")],
) -> None:
    """Back up the database, the case images and the key while the server runs (consistent copy)."""
    from oncolens.config import Settings
    from oncolens.store.backup import BackupError
    from oncolens.store.backup import backup as take_backup
    from oncolens.store.images import StoreError

    try:
        report = take_backup(Settings(), dest, progress=lambda line: typer.echo(line, err=True))
    except (BackupError, StoreError) as exc:
        raise _fail(f"backup failed: {getattr(exc, 'detail', exc)}") from None
    typer.echo(
        f"backed up {report.cases} case(s), {report.images} image(s), the {report.database} database "
        f"(revision {report.revision}) and secret.key to {report.folder} ({report.bytes / 2**20:.1f} MB)"
    )
    if report.missing:
        typer.echo(f"{len(report.missing)} image(s) of cases deleted while the backup ran were not kept", err=True)


@app.command()
def restore(
    src: Annotated[Path, typer.Argument(help="A folder written by `oncolens backup`.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the data already in the target database and image store.")
    ] = False,
) -> None:
    """Restore a backup into this configuration's database, image store and data folder (server stopped)."""
    from oncolens.config import Settings
    from oncolens.store.backup import BackupError
    from oncolens.store.backup import restore as put_back
    from oncolens.store.images import StoreError

    try:
        report = put_back(Settings(), src, force=force, progress=lambda line: typer.echo(line, err=True))
    except (BackupError, StoreError) as exc:
        raise _fail(f"restore failed: {getattr(exc, 'detail', exc)}") from None
    typer.echo(
        f"restored {report.cases} case(s) and {report.images} image(s) into the {report.database} database "
        f"(revision {report.revision}); `oncolens serve` migrates it to this release when it starts"
    )


NEW_PASSWORD_ENV = "ONCOLENS_NEW_PASSWORD"


PASSWORD_IN_ARGV = (
    "--password is refused: a password on the command line is visible to every user of this machine in "
    "the process list and stays in the shell history. Use --password-stdin "
    f"(printf '%s\\n' \"$PW\" | oncolens users ... --password-stdin), ${NEW_PASSWORD_ENV}, or the prompt"
)


def _new_password(given: str | None, from_stdin: bool) -> str:
    """The new password: the first line of standard input (``--password-stdin``), else
    ``ONCOLENS_NEW_PASSWORD``, else asked for twice without echo. ``--password`` is refused, saying why."""
    if given is not None:
        raise _fail(PASSWORD_IN_ARGV)
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise _fail("--password-stdin: standard input gave no password")
        return line
    if os.environ.get(NEW_PASSWORD_ENV):
        return os.environ[NEW_PASSWORD_ENV]
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


PasswordOption = Annotated[
    str | None,
    typer.Option(hidden=True, help="Refused (visible in the process list): use --password-stdin."),
]
PasswordStdin = Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")]


@contextmanager
def _users_session() -> Iterator[Session]:
    """A session on the configured database (migrated first); domain errors end the command in one line."""
    from sqlmodel import Session

    from oncolens.accounts.auth import PasswordTooWeak
    from oncolens.config import Settings
    from oncolens.errors import DomainError
    from oncolens.store.db import make_engine

    _upgrade_database()
    engine = make_engine(Settings().resolved_database_url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            yield session
    except (PasswordTooWeak, DomainError) as exc:
        raise _fail(str(exc)) from exc
    finally:
        engine.dispose()


@users_app.command("create")
def users_create(
    email: Annotated[str, typer.Option(prompt=True, help="Login e-mail.")],
    password: PasswordOption = None,
    password_stdin: PasswordStdin = False,
    full_name: Annotated[str, typer.Option(help="Display name.")] = "",
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an administrator.")] = False,
    role: Annotated[str, typer.Option(help="clinician or viewer (ignored with --admin).")] = "clinician",
) -> None:
    """Create a user (the first administrator is made this way)."""
    from oncolens.services.users import create_user

    chosen = "admin" if admin else role
    secret = _new_password(password, password_stdin)
    with _users_session() as session:
        user = create_user(session, None, email, secret, full_name, chosen)
        typer.echo(f"created {chosen} {user.email} (id {user.id})")


@users_app.command("list")
def users_list(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per account instead of a table.")] = False,
) -> None:
    """Every account: id, e-mail, role, state (active, invited, unverified, awaiting approval,
    deactivated) and whether it signs in with a second factor."""
    from oncolens.services.accounts import account_state
    from oncolens.services.users import list_users

    with _users_session() as session:
        rows = list_users(session)
    if json_out:
        for u in rows:
            fields = {"id": u.id, "email": u.email, "role": u.role, "state": account_state(u)}
            typer.echo(json.dumps(fields | {"two_factor": bool(u.two_factor), "full_name": u.full_name}))
        return
    if not rows:
        typer.echo("no users yet: create the first administrator with `oncolens users create --admin`")
        return
    typer.echo(f"{'id':>4}  {'e-mail':<32}{'role':<11}{'state':<19}2FA  name")
    for u in rows:
        two = "on" if u.two_factor else "off"
        typer.echo(f"{u.id:>4}  {u.email:<32}{u.role:<11}{account_state(u):<19}{two:<5}{u.full_name}")


@users_app.command("set-password")
def users_set_password(
    email: Annotated[str, typer.Argument(help="The account's e-mail.")],
    password: PasswordOption = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Set an account's password on the server (an admin who forgot theirs); every session of the
    account ends and its login lock is lifted."""
    from oncolens.services.users import change_on_command_line

    secret = _new_password(password, password_stdin)
    with _users_session() as session:
        user = change_on_command_line(session, email, password=secret)
    typer.echo(f"password set for {user.email}; its earlier sessions have ended")


def _change_user(email: str, message: str, is_active: bool | None = None, approved: bool | None = None) -> None:
    from oncolens.services.users import change_on_command_line

    with _users_session() as session:
        user = change_on_command_line(session, email, is_active=is_active, approved=approved)
    typer.echo(message.format(email=user.email, role=user.role))


EmailArgument = Annotated[str, typer.Argument(help="The account's e-mail.")]


@users_app.command("deactivate")
def users_deactivate(email: EmailArgument) -> None:
    """Stop an account from logging in (its sessions end); its cases and audit trail stay."""
    _change_user(email, "deactivated {email}", is_active=False)


@users_app.command("activate")
def users_activate(email: EmailArgument) -> None:
    """Let a deactivated account log in again."""
    _change_user(email, "activated {email}", is_active=True)


@users_app.command("approve")
def users_approve(email: EmailArgument) -> None:
    """Approve a self-signed-up account so it can log in (give it a role on the users page or API)."""
    _change_user(email, "approved {email} ({role})", approved=True)


@users_app.command("reset-2fa")
def users_reset_two_factor(email: Annotated[str, typer.Argument(help="The account's e-mail.")]) -> None:
    """Turn an account's second factor off (a lost phone): it signs in with the password alone until it
    enrols again; its sessions end."""
    from oncolens.config import Settings
    from oncolens.services.accounts import Accounts
    from oncolens.services.users import find_by_email

    settings = Settings()
    with _users_session() as session:
        user = find_by_email(session, email)
        assert user.id is not None
        Accounts(session, settings, _server_key(settings)).admin_reset(None, user.id)
    typer.echo(f"second factor of {user.email} reset")


@users_app.command("invite")
def users_invite(
    email: Annotated[str, typer.Argument(help="Who to invite.")],
    role: Annotated[str, typer.Option(help="admin, clinician or viewer.")] = "clinician",
    full_name: Annotated[str, typer.Option(help="Display name.")] = "",
    inviter: Annotated[str, typer.Option(help="E-mail of the admin the invitation comes from.")] = "",
) -> None:
    """E-mail an invitation (needs the ONCOLENS_SMTP_* settings and ONCOLENS_PUBLIC_URL for the link)."""
    from oncolens.accounts.mail import Mailer
    from oncolens.config import Settings
    from oncolens.services import mailqueue
    from oncolens.services.accounts import Accounts
    from oncolens.services.audit import Actor
    from oncolens.services.users import find_by_email

    settings = Settings()
    with _users_session() as session:
        sender = find_by_email(session, inviter) if inviter else command_line_admin()
        accounts = Accounts(session, settings, _server_key(settings))
        user = accounts.invite(Actor(sender, channel="command line"), email, role, full_name)
        sent = mailqueue.drain(session.get_bind(), Mailer(settings))  # type: ignore[arg-type]
    if sent:
        typer.echo(f"invitation sent to {user.email} ({role}); the link expires in {settings.invite_hours} hours")
    else:
        typer.echo(
            f"invitation to {user.email} ({role}) made; the mail server did not take it yet, so the running "
            "server sends it (it retries for about an hour; a failure is in the audit trail as mail_failed)"
        )


def _progress(done: int, total: int) -> None:
    """``evaluate``'s progress on standard error (the report itself goes to standard output)."""
    typer.echo(f"\revaluating: {done}/{total} images", err=True, nl=done >= total)


def command_line_admin() -> User:
    """The actor of a step run on the server's own command line without ``--by``: an administrator."""
    from oncolens.store.db.models import Role, User

    return User(email="command line", full_name="The OncoLens administrator", role=Role.admin.value, hashed_password="")


def _server_key(settings: Settings) -> str:
    from oncolens.accounts.auth import server_secret

    return server_secret(settings.secret_key, settings.data_dir, settings.on_sqlite)


def format_case(result: CaseResult) -> str:
    """A terminal table: each image's named class, its probability, P(malignant) and risk, then the
    case's statement (the same words as the API, the web page and the reports)."""
    lines = [f"model {result.model_id} v{result.model_version}", ""]
    header = f"{'image':<28}{'named class':<14}{'prob.':>7}{'P(malig.)':>11}  risk"
    lines += [header, "-" * len(header)]
    rows = [(image.filename or f"#{image.index + 1}", image.assessment) for image in result.images]
    if len(result.images) > 1:
        rows.append((f"case ({result.aggregation_rule})", result.aggregate))
    for name, a in rows:
        if a.indeterminate:
            lines.append(f"{name[:27]:<28}{'-':<14}{'-':>7}{'-':>11}  {a.risk_level}")
        else:
            lines.append(f"{name[:27]:<28}{a.top_class:<14}{a.confidence:>7.3f}{a.p_malignant:>11.3f}  {a.risk_level}")
    for image in result.images:
        name, a = image.filename or f"#{image.index + 1}", image.assessment
        if a.domain is not None and not a.domain["in_domain"]:
            kind = "another kind of image" if a.domain.get("reason") == "other_kind" else "an unusual image"
            lines.append(
                f"! {name}: out of the model's domain, {kind} (score {a.domain['score']:.2f} > "
                f"{a.domain['threshold']:.2f}): no class, no risk level"
            )
        lines += [f"! {name}: {issue['message']}" for issue in a.quality]
    agg = result.aggregate
    if agg.note:
        lines.append(f"note: {agg.note}")
    title = (
        "class probabilities (case; for reference only, not an answer):"
        if agg.indeterminate
        else ("class probabilities (case):")
    )
    lines += ["", title]
    for class_id, p in sorted(agg.probabilities.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {class_id:<26}{p:>7.3f}  {'#' * round(p * 40)}")
    lines += ["", agg.statement, "", result.disclaimer]
    return "\n".join(lines)


# The learning loop's commands (cases export-dataset, adapt, models install/shadow/promote/rollback/monitoring)
# the audit log's (audit archive/restore) and the DICOM node's, registered on this module's ``app``.
from oncolens.cli import audit, dicom, learning  # noqa: E402,F401

if __name__ == "__main__":  # `python -m oncolens.cli.main`: the app the modules above registered on
    from oncolens.cli.main import app as registered

    registered()
