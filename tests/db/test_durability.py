"""A case acknowledged by the server survives kill -9; files of unfinished cases are swept."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from oncolens.store.db import make_engine, upgrade
from oncolens.store.db.models import Case, CaseImage
from oncolens.store.images import FileStore

SAMPLE = Path(__file__).parents[2] / "samples" / "skin-ham10000" / "ISIC_0025316.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_case_is_complete_after_kill_9_following_the_response(tmp_path: Path) -> None:
    env = dict(os.environ, ONCOLENS_DATA_DIR=str(tmp_path))
    env.pop("ONCOLENS_DATABASE_URL", None)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "oncolens.cli.main",
            "users",
            "create",
            "--email",
            "doc@clinic.org",
            "--password-stdin",
        ],
        env=env,
        check=True,
        capture_output=True,
        input=b"correct horse battery\n",
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "oncolens.cli.main", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        token = httpx.post(
            f"{base}/auth/token", data={"username": "doc@clinic.org", "password": "correct horse battery"}
        ).json()["access_token"]
        response = httpx.post(
            f"{base}/cases",
            data={"model_id": "skin-ham10000", "patient_ref": "CRASH"},
            files=[("files", ("a.jpg", SAMPLE.read_bytes(), "image/jpeg"))] * 2,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        case_id = response.json()["id"]
        server.send_signal(signal.SIGKILL)
    finally:
        server.kill()
        server.wait(10)
    engine = make_engine(f"sqlite:///{tmp_path / 'oncolens.db'}")
    with Session(engine) as session:
        case = session.get(Case, case_id)
        assert case is not None and case.patient_ref == "CRASH"
        images = session.exec(select(CaseImage).where(CaseImage.case_id == case_id)).all()
        store = FileStore(tmp_path / "images")
        assert len(images) == 2
        assert all(store.path(i.stored_name).read_bytes() == SAMPLE.read_bytes() for i in images)
    engine.dispose()


@pytest.mark.parametrize("age_s", [0.0, 3600.0])
def test_sweep_removes_only_old_unreferenced_files(tmp_path: Path, age_s: float) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(engine)
    store = FileStore(tmp_path / "images")
    orphan = store.write(b"\xff\xd8\xff partial case", "JPEG")
    old = time.time() - age_s
    os.utime(store.path(orphan), (old, old))
    with Session(engine) as session:
        removed = store.sweep_orphans(session, older_than_s=600)
    assert removed == (1 if age_s else 0)
    assert store.path(orphan).exists() == (age_s == 0.0)
    engine.dispose()
