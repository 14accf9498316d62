"""The server's resident memory after a burst of traffic, and once it has been idle.

Starts `oncolens serve` on 127.0.0.1 (a free port, a fresh data folder, every model loaded) twice:
with the idle release (``ONCOLENS_RELEASE_MEMORY_IDLE_S``, ``--idle-s``) and without it (0). Each
time it reads the server's RSS once loaded, then sends a burst to every model (16 clients, cases of
1 to 8 of the model's sample images, so the batcher runs batches of up to 16), reads the RSS right
after the burst and then every 0.25 s while the server sits idle, and finally times single-image
requests: the first after the idle period (the arena maps its regions again) and warm ones.
Loopback only; Linux (reads /proc).

    python benchmarks/bench_idle_memory.py [--idle-s 5] [--requests 96] [--save idle-memory]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from _common import live_server, print_table, rss_mb, save

SAMPLES = Path(__file__).parents[1] / "samples"
MODELS = ("skin-ham10000", "skin-isic9", "breast-us", "thyroid-us", "cervical-herlev", "oral-photo")


def releases(base: str) -> int:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("oncolens_memory_releases_total"):
            return int(float(line.split()[1]))
    return 0


async def burst(base: str, requests: int) -> None:
    """16 clients per model, cases of 1, 2, 4 and 8 images in turn."""
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        for model in MODELS:
            images = [p.read_bytes() for p in sorted((SAMPLES / model).glob("*.jpg"))]
            url = f"{base}/api/v1/models/{model}/predict"

            async def one_client(offset: int, url: str = url, images: list[bytes] = images) -> None:
                for i in range(offset, requests, 16):
                    n = (1, 2, 4, 8)[i % 4]
                    files = [("files", (f"{k}.jpg", images[(i + k) % len(images)], "image/jpeg")) for k in range(n)]
                    (await client.post(url, files=files)).raise_for_status()

            await asyncio.gather(*(one_client(c) for c in range(16)))


def one_image_ms(base: str, model: str) -> float:
    image = sorted((SAMPLES / model).glob("*.jpg"))[0].read_bytes()
    start = time.perf_counter()
    httpx.post(f"{base}/api/v1/models/{model}/predict", files={"file": ("x.jpg", image, "image/jpeg")}, timeout=60)
    return 1000 * (time.perf_counter() - start)


def run_server(idle_s: float, requests: int, watch_s: float) -> dict[str, Any]:
    with live_server({"ONCOLENS_RELEASE_MEMORY_IDLE_S": str(idle_s)}) as server:
        pid, base = server.process.pid, server.base
        loaded = rss_mb(pid)
        start = time.perf_counter()
        asyncio.run(burst(base, requests))
        burst_s = time.perf_counter() - start
        after = rss_mb(pid)
        idle_start, trace = time.perf_counter(), []
        while time.perf_counter() - idle_start < watch_s:
            time.sleep(0.25)
            trace.append((round(time.perf_counter() - idle_start, 2), round(rss_mb(pid), 1)))
        idle = rss_mb(pid)
        first = {model: one_image_ms(base, model) for model in ("skin-ham10000", "cervical-herlev")}
        warm = {model: sorted(one_image_ms(base, model) for _ in range(9))[4] for model in first}
        return {
            "idle_s": idle_s,
            "rss_loaded_mb": loaded,
            "rss_after_burst_mb": after,
            "rss_idle_mb": idle,
            "releases": releases(base),
            "burst_s": burst_s,
            "first_request_ms": first,
            "warm_request_p50_ms": warm,
            "idle_trace": trace,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-s", type=float, default=5.0, help="ONCOLENS_RELEASE_MEMORY_IDLE_S for the first run")
    parser.add_argument("--requests", type=int, default=96, help="requests per model in the burst")
    parser.add_argument("--save", default="idle-memory", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    watch_s = args.idle_s + 5
    runs = [run_server(idle_s, args.requests, watch_s) for idle_s in (args.idle_s, 0.0)]
    rows = [
        {
            "idle release": f"after {r['idle_s']:g} s" if r["idle_s"] else "off",
            "RSS loaded MB": r["rss_loaded_mb"],
            "after burst MB": r["rss_after_burst_mb"],
            f"idle {watch_s:g} s MB": r["rss_idle_mb"],
            "releases": r["releases"],
            "burst s": r["burst_s"],
            "1st image ham / cervical ms": "{:.1f} / {:.1f}".format(*r["first_request_ms"].values()),
            "warm p50 ms": "{:.1f} / {:.1f}".format(*r["warm_request_p50_ms"].values()),
        }
        for r in runs
    ]
    print_table(f"Server RSS after a burst ({args.requests} requests of 1-8 images per model, 16 clients)", rows)
    save(args.save, {"requests_per_model": args.requests, "watch_s": watch_s, "runs": runs})


if __name__ == "__main__":
    main()
