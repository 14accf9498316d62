"""``oncolens audit archive`` and ``oncolens audit restore``: the audit log's retention on the command line.

Run on the server's machine with its settings (``ONCOLENS_*``), while it serves: the archive moves the
events before a day into a verified file in one transaction (``services.archive``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oncolens.cli.learning import By, _actor, _date
from oncolens.cli.main import _users_session, app

audit_app = typer.Typer(help="The audit log's retention: archive old events to a file, restore them.")
app.add_typer(audit_app, name="audit")


@audit_app.command("archive")
def audit_archive(
    before: Annotated[str, typer.Option("--before", help="Archive the events before this UTC day (YYYY-MM-DD).")],
    to: Annotated[Path, typer.Option("--to", help="A new file for them (gzip of JSON lines, made 0600).")],
    by: By = "",
) -> None:
    """Move the audit events before a day into a new file: written, read back and checked, then deleted."""
    from oncolens.services.archive import archive

    day = _date(before, "--before")
    with _users_session() as session:
        report = archive(session, _actor(session, by), day, to)
    span = f" ({report.first:%Y-%m-%d} to {report.last:%Y-%m-%d})" if report.first and report.last else ""
    typer.echo(f"archived {report.events} audit event(s){span} to {report.path}, sha256 {report.sha256}")


@audit_app.command("restore")
def audit_restore(
    archive_file: Annotated[Path, typer.Argument(help="An archive written by `oncolens audit archive`.")],
    by: By = "",
) -> None:
    """Put an archive's events back into the audit log, with their own ids (checked first; all or nothing)."""
    from oncolens.services.archive import restore

    with _users_session() as session:
        report = restore(session, _actor(session, by), archive_file)
    typer.echo(f"restored {report.events} audit event(s) from {report.path}, sha256 {report.sha256}")
