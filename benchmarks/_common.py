"""Helpers shared by the benchmarks: percentiles, a table printer, JSON next to the table."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95))}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(_fmt(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def cpu_model() -> str:
    """The CPU's model name and core count (Linux /proc/cpuinfo; sessions run on different machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    extras = [f for f in ("avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    described = f"{names[0] if names else platform.processor()}, {len(names)} cores"
    return described + (f" ({', '.join(extras)})" if extras else "")


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "cpu": cpu_model(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nsaved {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:PORT
    ready_s: float  # process start to the first 200 on /api/v1/health


@contextmanager
def live_server(env: dict[str, str] | None = None, workers: int = 1) -> Iterator[LiveServer]:
    """`oncolens serve` on 127.0.0.1 at a free port, a fresh data folder, the settings in ``env``;
    stopped on leaving. Loopback only."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="oncolens-bench-") as data:
        server = subprocess.Popen(
            [sys.executable, "-m", "oncolens.cli.main", "serve", "--port", str(port), "--workers", str(workers)],
            env={**os.environ, "ONCOLENS_DATA_DIR": data, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            while True:
                try:
                    if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - started > 600 or server.poll() is not None:  # migrations may run
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
            yield LiveServer(server, base, time.perf_counter() - started)
        finally:
            server.terminate()
            server.wait(10)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of process ``pid`` from /proc (VmRSS, VmHWM, ...), in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found")
