"""``oncolens serve`` refuses to start in one line naming what to fix, before any model loads."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oncolens.cli.main import app
from oncolens.config import Settings
from oncolens.runtime.startup import StartupError, safe_url, startup_lines

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ONCOLENS_DATA_DIR", str(tmp_path / "data"))
    for name in ("ONCOLENS_DATABASE_URL", "ONCOLENS_SMTP_SSL", "ONCOLENS_SMTP_STARTTLS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def refused(*args: str) -> str:
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, f"one line, got: {result.output!r}"
    assert "Traceback" not in result.output
    return result.output.strip()


def test_a_database_url_that_is_no_url(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCOLENS_DATABASE_URL", "oncolens.store.db")
    assert refused() == "error: ONCOLENS_DATABASE_URL is not a database URL: oncolens.store.db"


def test_an_unreachable_postgresql_is_named_without_its_password(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ONCOLENS_DATABASE_URL", f"postgresql+psycopg://clinic:s3cret-pw@127.0.0.1:{port}/oncolens")
    line = refused()
    assert line.startswith(
        f"error: cannot reach the database postgresql+psycopg://clinic:***@127.0.0.1:{port}/oncolens"
    )
    assert "(ONCOLENS_DATABASE_URL)" in line and "s3cret-pw" not in line


def test_a_data_folder_that_cannot_be_written(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = env / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ONCOLENS_DATA_DIR", str(blocker / "data"))
    assert (
        refused() == f"error: the data folder {blocker / 'data'} is not writable (ONCOLENS_DATA_DIR): Not a directory"
    )


def test_a_busy_port(env: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = refused("--port", str(port))
    assert line == (
        f"error: port {port} on 127.0.0.1 is already in use (--port): stop the other server or pick another port"
    )


def test_bad_settings_are_named(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCOLENS_MAX_IMAGE_BYTES", "-1")
    assert refused() == "error: ONCOLENS_MAX_IMAGE_BYTES: Input should be greater than 0"
    monkeypatch.delenv("ONCOLENS_MAX_IMAGE_BYTES")
    monkeypatch.setenv("ONCOLENS_RELEASE_MEMORY_IDLE_S", "-5")
    assert refused() == "error: ONCOLENS_RELEASE_MEMORY_IDLE_S: Input should be greater than or equal to 0"
    monkeypatch.delenv("ONCOLENS_RELEASE_MEMORY_IDLE_S")
    monkeypatch.setenv("ONCOLENS_SMTP_SSL", "true")
    monkeypatch.setenv("ONCOLENS_SMTP_STARTTLS", "true")
    assert "set ONCOLENS_SMTP_SSL or ONCOLENS_SMTP_STARTTLS, not both" in refused()


def test_the_start_up_lines_say_where_the_data_is_and_how_to_begin(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://u:pw@db.clinic.org/oncolens")
    lines = startup_lines(settings, ["skin-ham10000"], users=0)
    assert lines[0] == f"data folder: {tmp_path}"
    assert lines[1] == "database: postgresql+psycopg://u:***@db.clinic.org/oncolens"
    assert lines[2] == f"images: folder {tmp_path / 'images'}"
    assert lines[3] == "models: skin-ham10000" and lines[5] == "e-mail: off (ONCOLENS_SMTP_HOST not set)"
    assert lines[4] == (
        f"inference: all ONNX Runtime thread(s) per model, {settings.resolved_decode_threads} decoding thread(s), "
        "batches of up to 8 backbone passes, precision setting int8, unused model memory released after 10 s idle"
    )
    assert "create the first administrator with `oncolens users create --admin" in lines[6]
    assert len(startup_lines(settings, [], users=2)) == 6
    tuned = Settings(
        data_dir=tmp_path, threads=1, decode_threads=3, batch_max=4, precision="fp32", release_memory_idle_s=0
    )
    assert startup_lines(tuned, [], users=1)[4] == (
        "inference: 1 ONNX Runtime thread(s) per model, 3 decoding thread(s), batches of up to 4 backbone passes, "
        "precision setting fp32, unused model memory kept (ONCOLENS_RELEASE_MEMORY_IDLE_S=0)"
    )
    shared = Settings(data_dir=tmp_path, image_store="s3://cases/oncolens", s3_endpoint_url="http://s3.local:8333")
    assert startup_lines(shared, [], users=1)[2] == "images: s3://cases/oncolens at http://s3.local:8333"


def test_a_server_off_sqlite_needs_the_shared_secret_key(tmp_path: Path) -> None:
    from oncolens.runtime.startup import check_secret_key

    on_postgres = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://u@db/oncolens")
    with pytest.raises(StartupError, match="ONCOLENS_SECRET_KEY must be set when the database is not SQLite"):
        check_secret_key(on_postgres)
    assert not (tmp_path / "secret.key").exists()  # no per-replica key file was made
    check_secret_key(Settings(data_dir=tmp_path, database_url="postgresql+psycopg://u@db/o", secret_key="k" * 40))
    check_secret_key(Settings(data_dir=tmp_path))  # SQLite keeps its key file
    assert safe_url("not a url") == "not a url"


def test_a_log_file_that_cannot_be_written(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = env / "plain-file"
    blocker.write_text("x")
    monkeypatch.setenv("ONCOLENS_LOG_FILE", str(blocker / "oncolens.log"))
    line = refused()
    assert (
        line
        == f"error: cannot write the log file {blocker / 'oncolens.log'} (ONCOLENS_LOG_FILE): {blocker} is not a folder"
    )


def test_the_log_goes_to_a_file_as_json_lines(tmp_path: Path) -> None:
    import json
    import logging
    import logging.config

    from oncolens.runtime.logs import log_config

    path = tmp_path / "logs" / "oncolens.log"
    path.parent.mkdir()
    settings = Settings(data_dir=tmp_path, log_file=path, log_format="json", log_level="info")
    logging.config.dictConfig(log_config(settings))
    try:
        logging.getLogger("oncolens.api").info("swept %d file(s)", 3)
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/x", "1.1", 200)
        logging.getLogger("oncolens.api").debug("not at info level")
    finally:
        for handler in logging.getLogger("oncolens").handlers:
            handler.close()
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["message"] for e in entries] == ["swept 3 file(s)", '127.0.0.1:1 - "GET /x HTTP/1.1" 200']
    assert entries[0]["level"] == "INFO" and entries[0]["logger"] == "oncolens.api"
    assert entries[0]["time"].endswith("+00:00")
    text = log_config(Settings(data_dir=tmp_path))
    assert set(text["handlers"]) == {"console"} and "format" in text["formatters"]["main"]


def test_workers_starting_together_share_one_key_file(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from oncolens.accounts.auth import load_or_create_secret

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_secret(tmp_path), range(16)))
    assert len(keys) == 1 and (tmp_path / "secret.key").read_text() == keys.pop()
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temporary file left behind
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
