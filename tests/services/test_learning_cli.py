"""The learning loop's commands, as an administrator runs them on the server's machine (SQLite):
``cases export-dataset``, ``adapt`` (exit 1 on a failed gate), ``models install/versions/shadow/
promote/rollback/monitoring``, and ``models`` alone still listing the models."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from oncolens.app import create_app
from oncolens.cli.main import app
from oncolens.config import Settings
from tests.api.test_auth_users import add_user, login
from tests.services.test_learning import MODEL, image, make_zoo, post_case, site_red

runner = CliRunner()


@pytest.fixture(scope="module")
def environment(blob_package: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A data folder with 150 reviewed cases of the blob model, and the settings that reach it."""
    zoo_root = make_zoo(blob_package, tmp_path_factory.mktemp("cli-zoo"))
    data = tmp_path_factory.mktemp("cli-data")
    env = {
        "ONCOLENS_DATA_DIR": str(data),
        "ONCOLENS_EXTRA_MODEL_DIR": str(zoo_root),
        "ONCOLENS_SECRET_KEY": "test-secret-key-that-is-long-enough-for-hs256",
        "ONCOLENS_PRELOAD_MODELS": "false",
    }
    settings = Settings(
        data_dir=data, extra_model_dir=zoo_root, preload_models=False, secret_key=env["ONCOLENS_SECRET_KEY"]
    )
    with TestClient(create_app(settings)) as client:
        add_user(client, "admin@clinic.org", "admin")
        add_user(client, "doc@clinic.org", "clinician")
        doctor = login(client, "doc@clinic.org")
        for i in range(150):
            label = "blob" if i % 3 == 0 else "plain"
            case = post_case(client, doctor, image(site_red(label, i), i), f"P-{i:03d}")
            review = {"status": "confirmed", "reference_class": label, "reference_standard": "cytology"}
            assert client.patch(f"/api/v1/cases/{case['id']}", json=review, headers=doctor).status_code == 200
    return env


def oncolens(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_export_adapt_install_promote_rollback_from_the_command_line(
    environment: dict[str, str], tmp_path: Path
) -> None:
    env = environment
    code, out = oncolens(env, "cases", "export-dataset", "--model", MODEL, "--out", str(tmp_path / "a"))
    assert code == 0, out
    assert "exported 150 image(s) of 150 case(s)" in out
    sha = hashlib.sha256((tmp_path / "a" / "manifest.csv").read_bytes()).hexdigest()
    assert f"manifest sha256 {sha}" in out
    code, out = oncolens(
        env, "cases", "export-dataset", "--model", MODEL, "--out", str(tmp_path / "b"), "--by", "x@y.z"
    )
    assert code == 2 and "no user with e-mail x@y.z" in out
    export = ("cases", "export-dataset", "--model", MODEL, "--out", str(tmp_path / "b"))
    code, out = oncolens(env, *export, "--by", "doc@clinic.org")
    assert code == 2 and "--by doc@clinic.org: no active admin account" in out
    code, out = oncolens(
        env, "cases", "export-dataset", "--model", MODEL, "--out", str(tmp_path / "c"), "--since", "2026-13-01"
    )
    assert code == 2 and "a date is YYYY-MM-DD" in out
    code, out = oncolens(env, "adapt", MODEL, str(tmp_path / "a"), "--out", str(tmp_path / "pkg"), "--bootstrap", "200")
    assert code == 0, out
    assert "pass  calibration" in out and f"wrote {tmp_path / 'pkg'}: blob 0.0.1+site.1" in out
    card = json.loads((tmp_path / "pkg" / "card.json").read_text())
    assert card["lineage"]["dataset"]["sha256"] == sha and card["lineage"]["gate"]["passed"] is True
    code, out = oncolens(env, "models", "install", str(tmp_path / "pkg"), "--by", "admin@clinic.org")
    assert code == 0 and "installed blob 0.0.1+site.1 (its gate passed)" in out, out
    code, out = oncolens(env, "models", "install", str(tmp_path / "pkg"))
    assert code == 0 and "already installed: blob 0.0.1+site.1" in out
    # A second adapt numbers its version after the installed one.
    code, out = oncolens(
        env, "adapt", MODEL, str(tmp_path / "a"), "--out", str(tmp_path / "pkg2"), "--bootstrap", "100"
    )
    assert code == 0 and "0.0.1+site.2" in out, out
    code, out = oncolens(env, "models", "promote", MODEL, "0.0.1+site.1", "--why", "")
    assert code == 2 and "say why" in out
    code, out = oncolens(env, "models", "shadow", MODEL, "0.0.1+site.1", "--why", "watch it")
    assert code == 0 and "runs in shadow" in out, out
    code, out = oncolens(env, "models", "promote", MODEL, "0.0.1+site.9", "--why", "typo")
    assert code == 2 and "has no version '0.0.1+site.9'; known: 0.0.1, 0.0.1+site.1" in out
    code, out = oncolens(
        env, "models", "promote", MODEL, "0.0.1+site.1", "--why", "gate passed", "--by", "admin@clinic.org"
    )
    assert code == 0 and "0.0.1+site.1 serves" in out, out
    code, out = oncolens(env, "models", "--json")  # the listing shows what a server serves now
    assert (
        code == 0
        and {json.loads(line)["id"]: json.loads(line)["version"] for line in out.splitlines()}[MODEL] == "0.0.1+site.1"
    )
    code, out = oncolens(env, "models", "versions", MODEL)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "serves" in lines["0.0.1+site.1"] and "passed" in lines["0.0.1+site.1"] and "serves" not in lines["0.0.1"]
    code, out = oncolens(env, "models", "rollback", MODEL, "--why", "compare")
    assert code == 0 and "back to 0.0.1" in out
    code, out = oncolens(env, "models", "rollback", MODEL, "--why", "again")
    assert code == 2 and "nothing to roll back to" in out
    code, out = oncolens(env, "models", "monitoring", MODEL, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["overall"]["reviewed_cases"] == 150 and report["overall"]["drift"]["flag"] is False
    code, out = oncolens(env, "models", "monitoring", MODEL)
    assert code == 0 and out.splitlines()[0].startswith("period") and "all" in out
    code, out = oncolens(env, "models", "--json")
    assert code == 0 and any(json.loads(line)["id"] == MODEL for line in out.splitlines())


def test_a_failed_gate_exits_1_naming_the_criterion(environment: dict[str, str], tmp_path: Path) -> None:
    from tests.services.test_learning import contradicting_dataset

    dataset = contradicting_dataset(tmp_path / "data")
    code, out = oncolens(
        environment, "adapt", MODEL, str(dataset), "--out", str(tmp_path / "pkg"), "--bootstrap", "100"
    )
    assert code == 1, out
    assert "the acceptance gate failed; nothing was written" in out and "FAIL  calibration" in out
    assert not (tmp_path / "pkg").exists()
    few = tmp_path / "few"
    shutil.copytree(dataset, few)
    lines = (few / "manifest.csv").read_text().splitlines()
    (few / "manifest.csv").write_text("\n".join(lines[:15]) + "\n")
    code, out = oncolens(environment, "adapt", MODEL, str(few), "--out", str(tmp_path / "pkg"))
    assert code == 2 and "too few images to adapt blob" in out and "at least 20 are needed" in out
