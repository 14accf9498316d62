"""The learning loop on the command line: ``cases export-dataset``, ``adapt`` and the ``models``
subcommands that install, shadow, promote and roll back versions and show a model's monitoring.

Run on the server's machine with its settings (``ONCOLENS_*``); the steps act on the database every
server process and replica reads, so a running server serves a promotion or rollback within
``ONCOLENS_MODEL_POLL_S`` seconds. ``--by`` names the admin account a step is recorded under (default:
the command line, as an administrator).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from oncolens.cli.main import (
    _command,
    _fail,
    _server_key,
    _users_session,
    app,
    cases_app,
    command_line_admin,
    models_app,
)

if TYPE_CHECKING:
    from sqlmodel import Session

    from oncolens.services.audit import Actor
    from oncolens.zoo import Zoo

By = Annotated[str, typer.Option("--by", help="E-mail of the admin account the step is recorded under.")]
Why = Annotated[str, typer.Option("--why", help="Why (kept in the audit trail with the step).")]


def _actor(session: Session, by: str) -> Actor:
    from oncolens.services.audit import Actor
    from oncolens.services.users import find_by_email
    from oncolens.store.db.models import Role

    if not by:
        return Actor(command_line_admin(), channel="command line")
    user = find_by_email(session, by)
    if user is None or not user.is_active or user.role != Role.admin.value:
        raise _fail(f"--by {by}: no active admin account with that e-mail")
    return Actor(user, channel="command line")


@contextmanager
def _serving() -> Iterator[tuple[Session, Zoo]]:
    """A database session and the zoo as a server would serve it now (installed versions applied)."""
    from oncolens.config import Settings
    from oncolens.services.versions import VersionSync
    from oncolens.zoo import Zoo

    settings = Settings()
    zoo = Zoo.from_settings(settings)
    with _users_session() as session:
        VersionSync(session.get_bind(), zoo, settings.data_dir / "models").run()  # type: ignore[arg-type]
        yield session, zoo


def _date(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise _fail(f"{name} {value!r}: a date is YYYY-MM-DD") from None


@cases_app.command("export-dataset")
def export_dataset(
    model: Annotated[str, typer.Option("--model", help="The model whose reviewed cases are exported.")],
    out: Annotated[Path, typer.Option("--out", help="A new or empty folder for the dataset.")],
    since: Annotated[str | None, typer.Option("--since", help="First creation date (YYYY-MM-DD), inclusive.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Last creation date (YYYY-MM-DD), inclusive.")] = None,
    by: By = "",
) -> None:
    """The reviewed cases with a reference class as a dataset in the layout training reads (admins only; audited)."""
    from oncolens.config import Settings
    from oncolens.services.learning import export_dataset as export
    from oncolens.store.images import open_store

    settings = Settings()
    first, last = _date(since, "--since"), _date(until, "--until")
    with _users_session() as session:
        report = export(
            session, open_store(settings), _actor(session, by), model, out, _server_key(settings), first, last
        )
    counts = "; ".join(f"{split}: {sum(c.values())}" for split, c in report.counts.items())
    typer.echo(f"exported {report.rows} image(s) of {report.cases} case(s) to {out} ({counts})")
    typer.echo(f"manifest sha256 {report.manifest_sha256}")
    left = ", ".join(f"{n} {what}" for what, n in sorted(report.left_out.items()) if n)
    typer.echo(f"left out: {left or 'nothing'}")


@app.command()
def adapt(
    model: Annotated[str, typer.Argument(help="The model (the version that serves now), or a package folder.")],
    dataset_dir: Annotated[Path, typer.Argument(help="A dataset from `oncolens cases export-dataset`.")],
    out: Annotated[Path, typer.Option("--out", help="A new or empty folder for the site version's package.")],
    version: Annotated[
        str | None, typer.Option(help="The version (default: the parent's X.Y.Z+site.N, next N).")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the gate's intervals.")] = 1000,
    retrain_tail: Annotated[
        bool,
        typer.Option(
            "--retrain-tail",
            help="Also re-train the network's head on the train rows' cached features (classes with at least "
            "20 train images; needs the onnx package); calibration and thresholds are then fitted on val.",
        ),
    ] = False,
) -> None:
    """A site version: calibration and risk thresholds re-fitted on the local train+val rows, written only
    if it passes its acceptance gate on the local test rows against its parent (exit 1 naming the criterion)."""
    from oncolens.errors import InvalidInput
    from oncolens.services.learning import GateFailed, site_version
    from oncolens.services.learning import adapt as run_adapt
    from oncolens.store import packages
    from oncolens.zoo import ModelNotFound, PackageError

    with _serving() as (session, zoo):
        try:
            parent = zoo.load_folder(Path(model)) if Path(model).is_dir() else zoo.get(model)
        except (ModelNotFound, PackageError) as exc:
            raise _fail(str(exc)) from exc
        taken = [row.version for row in packages.versions(session, parent.id)]
    chosen = version or site_version(parent.version, taken)
    typer.echo(f"adapting {parent.id} {parent.version} on {dataset_dir} as {chosen}", err=True)
    try:
        result = run_adapt(parent, dataset_dir, out, chosen, _command(), bootstrap, retrain_tail)
    except GateFailed as exc:
        typer.secho("the acceptance gate failed; nothing was written", fg=typer.colors.RED, err=True)
        for criterion in exc.gate["criteria"]:
            mark = "pass" if criterion["passed"] else "FAIL"
            typer.echo(f"  {mark}  {criterion['criterion']}: {criterion['figures']}", err=True)
        raise typer.Exit(code=1) from None
    except InvalidInput as exc:
        raise _fail(str(exc)) from exc
    for criterion in result.gate["criteria"]:
        typer.echo(f"  pass  {criterion['criterion']}: {criterion['figures']}")
    typer.echo(f"wrote {out}: {result.card.id} {result.card.version}; install it with `oncolens models install {out}`")


@models_app.command("install")
def models_install(
    package: Annotated[Path, typer.Argument(help="A package folder, e.g. written by `oncolens adapt`.")],
    by: By = "",
) -> None:
    """Verify a package and store it in the database, where every replica finds it (it serves once promoted)."""
    from oncolens.services.versions import VersionService

    with _serving() as (session, zoo):
        row, new = VersionService(session, zoo).install(_actor(session, by), package)
    gate = {
        True: "its gate passed",
        False: "its gate FAILED: it cannot be promoted",
        None: "no gate (not a site version)",
    }
    verb = "installed" if new else "already installed:"
    typer.echo(f"{verb} {row.model_id} {row.version} ({gate[row.gate_passed]})")


@models_app.command("versions")
def models_versions(
    model: Annotated[str, typer.Argument(help="The model id.")],
    json_out: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """The model's versions: which serves, which runs in shadow (and how often it agreed), each gate."""
    from oncolens.services.versions import VersionService

    with _serving() as (session, zoo):
        rows = VersionService(session, zoo).versions(model)
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    typer.echo(f"{'version':<22}{'source':<11}{'state':<9}{'gate':<8}agreement (class / level)")
    for r in rows:
        state = "serves" if r.live else "shadow" if r.shadow else ""
        gate = {True: "passed", False: "FAILED", None: "-"}[r.gate_passed]
        a = r.agreement
        agree = f"{a.same_class}/{a.cases} / {a.same_level}/{a.cases}" if a else "-"
        typer.echo(f"{r.version:<22}{r.source:<11}{state:<9}{gate:<8}{agree}")


def _step(action: str, model: str, version: str | None, why: str, by: str) -> None:
    from oncolens.services.versions import VersionService

    with _serving() as (session, zoo):
        service = VersionService(session, zoo)
        actor = _actor(session, by)
        if action == "shadow":
            service.shadow(actor, model, str(version), why)
            typer.echo(f"{model} {version} runs in shadow on every new case (never shown)")
        elif action == "unshadow":
            service.unshadow(actor, model, why)
            typer.echo(f"{model}: shadow stopped")
        elif action == "promote":
            service.promote(actor, model, str(version), why)
            typer.echo(f"{model} {version} serves; running servers switch within ONCOLENS_MODEL_POLL_S seconds")
        else:
            back = service.rollback(actor, model, why)
            typer.echo(f"{model}: back to {back}; running servers switch within ONCOLENS_MODEL_POLL_S seconds")


@models_app.command("shadow")
def models_shadow(
    model: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()], why: Why, by: By = ""
) -> None:
    """Run VERSION on every new case of MODEL as well: stored beside the case, never shown to clinicians."""
    _step("shadow", model, version, why, by)


@models_app.command("unshadow")
def models_unshadow(model: Annotated[str, typer.Argument()], why: Why, by: By = "") -> None:
    """Stop the shadow version of MODEL."""
    _step("unshadow", model, None, why, by)


@models_app.command("promote")
def models_promote(
    model: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()], why: Why, by: By = ""
) -> None:
    """Serve VERSION of MODEL from now on (a site version whose gate failed is refused)."""
    _step("promote", model, version, why, by)


@models_app.command("rollback")
def models_rollback(model: Annotated[str, typer.Argument()], why: Why, by: By = "") -> None:
    """Serve the version that served before MODEL's newest promotion (one step back)."""
    _step("rollback", model, None, why, by)


@models_app.command("monitoring")
def models_monitoring(
    model: Annotated[str, typer.Argument()],
    period: Annotated[str, typer.Option(help="week or month")] = "month",
    since: Annotated[str | None, typer.Option("--since", help="First day (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Last day (YYYY-MM-DD), inclusive.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="The whole report as JSON.")] = False,
) -> None:
    """Cases, reviewed cases, sensitivity/specificity/AUROC, out-of-domain and quality rates and drift, per period."""
    from oncolens.config import Settings
    from oncolens.services.monitoring import monitoring

    first, last = _date(since, "--since"), _date(until, "--until")
    with _serving() as (session, zoo):
        report = monitoring(session, zoo.get(model).card, Settings(), period, first, last)  # type: ignore[arg-type]
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return

    def f(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    head: list[tuple[str, str]] = [("period", "<12"), ("cases", ">6"), ("reviewed", ">9"), ("sens", ">7")]
    head += [("spec", ">7"), ("AUROC", ">7"), ("OOD", ">7"), ("PSI", ">7"), ("KS p", ">8")]
    typer.echo("".join(f"{name:{spec}}" for name, spec in head) + "  drift")
    for p in [*report["periods"], report["overall"] | {"start": "all"}]:
        d = p["drift"]
        typer.echo(
            f"{p['start']:<12}{p['cases']:>6}{p['reviewed_cases']:>9}{f(p['sensitivity']):>7}{f(p['specificity']):>7}"
            f"{f(p['auroc']):>7}{f(p['out_of_domain_rate']):>7}{f(d['psi']):>7}{f(d['ks_p'], 4):>8}  "
            f"{'FLAG' if d['flag'] else ''}"
        )
    performance = report["overall"]["performance"]
    if performance["flag"]:
        typer.secho("performance flag: " + "; ".join(performance["reasons"]), fg=typer.colors.RED)
