"""Schemathesis over the whole OpenAPI of a real running server, without and with an admin token.

Run by ``.ci/run``: starts ``oncolens serve`` on a free loopback port with a fresh data folder
(SQLite; set ONCOLENS_DATABASE_URL for PostgreSQL), creates an admin, then runs Schemathesis twice
(anonymous, then ``Authorization: Bearer <admin token>``) with the checks for server errors and
for responses that do not match the documented schema. Exits non-zero on any failure.

    python scripts/schemathesis_ci.py [--max-examples 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"
# These can end the token Schemathesis is using (logout; a password change or reset of the admin
# itself revokes the admin's tokens; so does an admin's reset of their own second factor), so they run
# last, on a token of their own.
REVOKING = [
    "POST /api/v1/auth/logout",
    "PATCH /api/v1/users/me",
    "PATCH /api/v1/users/{user_id}",
    "DELETE /api/v1/users/{user_id}/2fa",
]
ADMIN, PASSWORD = "admin@example.org", "schemathesis password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, server: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode} before it was up")
        try:
            with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"the server at {url} did not come up in {seconds:.0f} s")


def token(url: str) -> str:
    body = urllib.parse.urlencode({"username": ADMIN, "password": PASSWORD}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/v1/auth/token", data=body), timeout=30) as answer:
        import json

        return str(json.loads(answer.read())["access_token"])


def schemathesis(url: str, max_examples: int, headers: list[str], label: str, filters: list[str] | None = None) -> int:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
        "--checks", CHECKS,
        "--max-examples", str(max_examples),
        "--seed", "13",
        "--request-timeout", "60",
        "--generation-database", ":memory:",
        "--suppress-health-check", "all",
    ]  # fmt: skip
    for header in headers:
        command += ["-H", header]
    command += filters or []
    print(f"\n=== Schemathesis, {label}: {max_examples} examples per operation ===", flush=True)
    start = time.perf_counter()
    code = subprocess.call(command)
    print(f"=== {label}: exit {code} in {time.perf_counter() - start:.0f} s ===", flush=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oncolens-schemathesis-") as data:
        env = os.environ | {
            "ONCOLENS_DATA_DIR": data,
            "ONCOLENS_SECRET_KEY": "schemathesis-secret-key-long-enough-for-hs256",
            "ONCOLENS_THREADS": "1",
            # Schemathesis sends many wrong logins; a lock would only hide the token route's answers.
            "ONCOLENS_LOGIN_MAX_FAILURES": "1000000",
        }
        oncolens = [sys.executable, "-m", "oncolens.cli.main"]
        subprocess.run(
            [*oncolens, "users", "create", "--email", ADMIN, "--admin", "--password-stdin"],
            env=env,
            check=True,
            input=f"{PASSWORD}\n".encode(),
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(data) / "server.log"
        with log.open("wb") as out:
            server = subprocess.Popen(
                [*oncolens, "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_until_up(url, server)
                codes = [
                    schemathesis(url, args.max_examples, [], "anonymous"),
                    schemathesis(
                        url,
                        args.max_examples,
                        [f"Authorization: Bearer {token(url)}"],
                        "admin token",
                        [arg for name in REVOKING for arg in ("--exclude-name", name)],
                    ),
                    schemathesis(
                        url,
                        args.max_examples,
                        [f"Authorization: Bearer {token(url)}"],
                        "admin token, operations that revoke it",
                        [arg for name in REVOKING for arg in ("--include-name", name)],
                    ),
                ]
            finally:
                server.terminate()
                server.wait(timeout=30)
        errors = [
            line for line in log.read_text(errors="replace").splitlines() if "Traceback" in line or " 500 " in line
        ]
        if errors:
            print(f"the server log shows {len(errors)} error line(s):", *errors[:20], sep="\n")
    sys.exit(0 if not any(codes) and not errors else 1)


if __name__ == "__main__":
    main()
