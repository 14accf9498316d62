"""``oncolens dicom``: the DICOM node on the command line (listen, and the studies and quarantine it keeps)."""

from __future__ import annotations

import json
import signal
import threading
from typing import Annotated

import typer

from oncolens.cli.main import _fail, _upgrade_database, _users_session, app

dicom_app = typer.Typer(help="The DICOM node: receive studies from a PACS, answer with an SR and heat-maps.")
app.add_typer(dicom_app, name="dicom")


@dicom_app.command("listen")
def dicom_listen() -> None:
    """Run the Storage SCP (ONCOLENS_DICOM_* settings) until stopped (SIGTERM or Ctrl-C)."""
    try:
        from oncolens.config import Settings
        from oncolens.dicom.listener import Listener
    except ImportError:
        raise _fail("the DICOM node needs the dicom extra: pip install 'oncolens[dicom]'") from None

    settings = Settings()
    _upgrade_database()
    try:
        listener = Listener(settings)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if not settings.dicom_allowed_aes:
        typer.secho("warning: ONCOLENS_DICOM_ALLOWED_AES is empty: every association is refused", err=True)
    try:
        listener.start()
    except OSError as exc:
        raise _fail(f"cannot listen on {settings.dicom_host}:{settings.dicom_port}: {exc}") from None
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    typer.echo(
        f"DICOM listener {settings.dicom_ae_title} on {settings.dicom_host}:{settings.dicom_port}; "
        f"{len(listener.routes)} route(s), {len(listener.destinations)} destination(s)"
    )
    for rule in listener.routes:
        typer.echo(f"  route: {rule.describe()}")
    stop.wait()
    listener.stop()


@dicom_app.command("studies")
def dicom_studies(
    state: Annotated[str | None, typer.Option(help="receiving, analysed, unrouted or failed.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """The studies the listener received, newest first, with their state and case."""
    from oncolens.services.studies import listed

    with _users_session() as session:
        rows = listed(session, state)
    for s in rows:
        fields = {
            "study_uid": s.study_uid,
            "state": s.state,
            "instances": s.instances,
            "calling_ae": s.calling_ae,
            "model_id": s.model_id,
            "case_id": s.case_id,
            "last_received_at": s.last_received_at.isoformat(),
            "detail": s.detail,
        }
        line = f"{s.state:<10} {s.study_uid}  {s.instances} instance(s)  {s.detail}"
        typer.echo(json.dumps(fields) if json_out else line)


@dicom_app.command("quarantine")
def dicom_quarantine() -> None:
    """The instances the listener could not use, with why (files in the data folder's dicom/quarantine)."""
    from oncolens.config import Settings
    from oncolens.dicom.inbox import Inbox

    for item in Inbox(Settings().data_dir).quarantined():
        typer.echo(f"{item.at:%Y-%m-%d %H:%M:%S}  {item.path}  {item.reason}")


@dicom_app.command("pull")
def dicom_pull(
    source: Annotated[str, typer.Option("--from", help="The PACS, as AE@host:port.")],
    study: Annotated[str, typer.Option("--study", help="The Study Instance UID.")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the analysis.")] = 300.0,
) -> None:
    """Have a PACS send a study to the running listener (C-FIND, then C-MOVE) and print its case id."""
    try:
        from oncolens.config import Settings
        from oncolens.dicom.pull import PullFailed, pull
        from oncolens.store.db import make_engine
    except ImportError:
        raise _fail("the DICOM node needs the dicom extra: pip install 'oncolens[dicom]'") from None

    settings = Settings()
    _upgrade_database()
    engine = make_engine(settings.resolved_database_url)
    try:
        record = pull(engine, source, study, settings.dicom_ae_title, wait)
    except (PullFailed, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    if record.case_id is None:
        raise _fail(f"study {study}: {record.state}: {record.detail}")
    typer.echo(record.case_id)
