"""The single-server clinic deployment (deploy/clinic): systemd units that verify, and Caddy with its
internal CA in front of a real `oncolens serve`: a login and an analysis over HTTPS, Secure cookies,
HTTP redirected to HTTPS."""

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import free_port

CLINIC = Path(__file__).parents[2] / "deploy" / "clinic"
SAMPLE = Path(__file__).parents[2] / "samples" / "skin-ham10000" / "ISIC_0026213.jpg"
HOST = "oncolens.ward.internal"
PASSWORD = "a long ward password"
ONCOLENS = str(Path(sys.executable).with_name("oncolens"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["oncolens.service", "oncolens-backup.service", "oncolens-backup.timer"])
def test_the_clinic_units_pass_systemd_analyze(tmp_path: Path, unit: str) -> None:
    for name in ("oncolens.service", "oncolens-backup.service", "oncolens-backup.timer"):
        text = (CLINIC / name).read_text().replace("/opt/oncolens/venv/bin/oncolens", ONCOLENS)
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def wait_for(check: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def ward(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`oncolens serve` on a free loopback port and Caddy (internal CA) in front of it."""
    if shutil.which("caddy") is None:
        pytest.skip("Caddy is not installed (Debian: apt-get install caddy)")
    app_port, http_port, https_port = free_port(), free_port(), free_port()
    env = os.environ | {
        "ONCOLENS_DATA_DIR": str(tmp_path / "data"),
        "ONCOLENS_PUBLIC_URL": f"https://{HOST}:{https_port}",
        "ONCOLENS_NEW_PASSWORD": PASSWORD,
        "ONCOLENS_HOSTNAME": HOST,
        "ONCOLENS_UPSTREAM": f"127.0.0.1:{app_port}",
        "CADDY_HTTP_PORT": str(http_port),
        "CADDY_HTTPS_PORT": str(https_port),
        "XDG_DATA_HOME": str(tmp_path / "caddy-data"),
        "XDG_CONFIG_HOME": str(tmp_path / "caddy-config"),
    }
    env.pop("ONCOLENS_DATABASE_URL", None)
    made = subprocess.run(
        [ONCOLENS, "users", "create", "--admin", "--email", "admin@clinic.org"], env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    # Caddy's admin endpoint is off, and it does not try to install its root in the system's trust store.
    caddyfile = (CLINIC / "Caddyfile").read_text().replace("{\n", "{\n\tadmin off\n\tskip_install_trust\n", 1)
    (tmp_path / "Caddyfile").write_text(caddyfile)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [ONCOLENS, "serve", "--host", "127.0.0.1", "--port", str(app_port)], env=env, stdout=log, stderr=log
    )
    caddy = subprocess.Popen(
        ["caddy", "run", "--config", str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"],
        env=env,
        stdout=log,
        stderr=log,
    )
    root = tmp_path / "caddy-data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
    try:
        ca = str(root)
        base = f"https://{HOST}:{https_port}"
        resolve = f"{HOST}:{https_port}:127.0.0.1"

        def up() -> bool:
            if not root.is_file():
                return False
            probe = curl(ca, resolve, f"{base}/api/v1/health", "-o", "/dev/null", "-w", "%{http_code}")
            return probe.stdout == "200"

        wait_for(up, "the server behind Caddy", 90)
        yield {
            "base": base,
            "ca": ca,
            "resolve": resolve,
            "http": f"http://{HOST}:{http_port}",
            "http_port": str(http_port),
        }
    finally:
        for process in (caddy, server):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def curl(ca: str, resolve: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-s", "--cacert", ca, "--resolve", resolve, *args, url], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_a_login_and_an_analysis_over_https_with_caddy(ward: dict[str, str], tmp_path: Path) -> None:
    ca, resolve, base = ward["ca"], ward["resolve"], ward["base"]
    token = curl(ca, resolve, f"{base}/api/v1/auth/token", "-d", f"username=admin@clinic.org&password={PASSWORD}")
    assert token.returncode == 0, token.stderr
    bearer = re.search(r'"access_token":"([^"]+)"', token.stdout)
    assert bearer, token.stdout
    analysed = curl(
        ca, resolve, f"{base}/api/v1/models/skin-ham10000/analyze", "-H", f"Authorization: Bearer {bearer.group(1)}",
        "-F", f"file=@{SAMPLE}",
    )  # fmt: skip
    assert '"risk_level":"high"' in analysed.stdout and '"top_class":"bcc"' in analysed.stdout, analysed.stdout[:300]

    # The web sign-in: every cookie the server sets over HTTPS is Secure (it trusts Caddy's X-Forwarded-Proto).
    jar = str(tmp_path / "cookies")
    page = curl(ca, resolve, f"{base}/login", "-c", jar, "-D", "-")
    assert re.search(r"(?im)^set-cookie: .*; secure", page.stdout), page.stdout[:500]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.stdout)
    assert csrf
    signed_in = curl(
        ca, resolve, f"{base}/login", "-b", jar, "-c", jar, "-D", "-", "-o", "/dev/null",
        "--data-urlencode", f"csrf_token={csrf.group(1)}", "--data-urlencode", "email=admin@clinic.org",
        "--data-urlencode", f"password={PASSWORD}",
    )  # fmt: skip
    cookies = re.findall(r"(?im)^set-cookie: (.*)$", signed_in.stdout)
    assert cookies and all("secure" in c.lower() for c in cookies), signed_in.stdout
    assert any(c.lower().startswith("oncolens_session=") and "httponly" in c.lower() for c in cookies), cookies
    assert re.search(r"(?m)^HTTP/\S+ 303", signed_in.stdout)
    assert "strict-transport-security: max-age=31536000" in signed_in.stdout.lower()

    # Plain HTTP answers only with a redirect to HTTPS.
    plain = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
         "--resolve", f"{HOST}:{ward['http_port']}:127.0.0.1", f"{ward['http']}/cases"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    code, target = plain.stdout.split(" ", 1)
    # (Caddy 2.6 names no port in the redirect when HTTPS is not on 443, as it is in the ward.)
    assert code in ("301", "308") and target in (f"{base}/cases", f"https://{HOST}/cases"), plain.stdout
