"""The deploy/ folder an operator copies: its environment file names only real settings and loads,
the systemd unit passes systemd's own check, the HAProxy configuration passes HAProxy's. (The
configuration is run in front of two real replicas in test_replicas.py.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict

from oncolens.config import Settings

DEPLOY = Path(__file__).parents[2] / "deploy"


def env_names(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]


def test_the_environment_file_names_real_settings_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    names = env_names(DEPLOY / "oncolens.env")
    fields = {f"ONCOLENS_{name.upper()}" for name in Settings.model_fields}
    unknown = [n for n in names if n.startswith("ONCOLENS_") and n not in fields]
    assert not unknown, f"not settings of oncolens: {unknown}"
    assert {"ONCOLENS_DATABASE_URL", "ONCOLENS_SECRET_KEY", "ONCOLENS_IMAGE_STORE"} <= set(names)
    for name in [n for n in list(os.environ) if n.startswith("ONCOLENS_")]:
        monkeypatch.delenv(name)

    class FromFile(Settings):
        model_config = SettingsConfigDict(env_prefix="ONCOLENS_", env_file=DEPLOY / "oncolens.env", extra="ignore")

    settings = FromFile()
    assert not settings.on_sqlite and settings.secret_key and settings.image_store.startswith("s3://")
    assert settings.s3_secret_access_key is not None and settings.log_format == "json"
    assert settings.clinic_name == "Example Clinic" and settings.smtp_from == "OncoLens <noreply@clinic.org>"


def test_the_shell_reads_the_environment_file_as_systemd_does() -> None:
    script = f'set -a; . "{DEPLOY / "oncolens.env"}"; set +a; echo "$ONCOLENS_SMTP_FROM|$ONCOLENS_CLINIC_NAME"'
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "OncoLens <noreply@clinic.org>|Example Clinic"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "oncolens@.service").read_text()
    assert "ExecStart=/opt/oncolens/venv/bin/oncolens serve --host 127.0.0.1 --port %i" in unit
    here = Path(sys.executable).with_name("oncolens")
    (tmp_path / "oncolens@.service").write_text(unit.replace("/opt/oncolens/venv/bin/oncolens", str(here)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "oncolens@8001.service")], capture_output=True, text=True
    )
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy is not installed")
def test_the_haproxy_configuration_is_valid() -> None:
    config = DEPLOY / "haproxy" / "haproxy.cfg"
    text = config.read_text()
    assert "option httpchk GET /api/v1/health" in text and text.count("server replica") == 2
    done = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert done.returncode == 0 and "Configuration file is valid" in done.stdout + done.stderr
