"""HTTP throughput and latency of POST /predict at 1, 4 and 16 concurrent clients.

Starts `oncolens serve` on 127.0.0.1 (a free port), waits for /health, then each client sends the
sample images in a loop for a fixed number of requests. Only loopback traffic.

    python benchmarks/bench_http.py [--requests 400] [--model skin-ham10000] [--workers N] [--threads T]
        [--precision fp32|int8] [--spinning] [--save NAME]

``--workers`` starts ``oncolens serve --workers N`` (N processes, each with every model);
``--threads`` sets ``ONCOLENS_THREADS`` (ONNX Runtime threads per model; 0 = all cores);
``--spinning`` sets ``ONCOLENS_SPINNING=1`` (idle ONNX Runtime threads spin instead of sleeping).

Each level also reports the CPU time the server (all its processes) and this client spent per
image (Linux: from /proc): on a 2-core machine the client shares the cores it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from pathlib import Path

import httpx
from _common import live_server, percentiles_ms, print_table, save

SAMPLES = Path(__file__).parents[1] / "samples"


async def client_loop(client: httpx.AsyncClient, url: str, images: list[bytes], n: int, out: list[float]) -> None:
    for i in range(n):
        start = time.perf_counter()
        response = await client.post(url, files={"file": ("x.jpg", images[i % len(images)], "image/jpeg")})
        response.raise_for_status()
        out.append(time.perf_counter() - start)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its child processes (the workers); 0 without /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for p in [pid, *map(int, children)]:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return 0.0
    return total


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(url: str, images: list[bytes], clients: int, total: int, server_pid: int) -> dict[str, object]:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await client_loop(client, url, images, 4, [])  # warm-up
        server_cpu, client_cpu = process_cpu_s(server_pid), own_cpu_s()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, url, images, total // clients, latencies) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        server_cpu, client_cpu = process_cpu_s(server_pid) - server_cpu, own_cpu_s() - client_cpu
    return {
        "clients": clients,
        "requests": len(latencies),
        "img/s": len(latencies) / elapsed,
        **percentiles_ms(latencies),
        "server_cpu_ms/img": 1000 * server_cpu / len(latencies),
        "client_cpu_ms/img": 1000 * client_cpu / len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--model", default="skin-ham10000")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    parser.add_argument("--spinning", action="store_true", help="ONNX Runtime threads spin (ONCOLENS_SPINNING)")
    parser.add_argument("--save", default="http", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted((SAMPLES / args.model).glob("*.jpg"))]
    env = {
        "ONCOLENS_THREADS": str(args.threads),
        "ONCOLENS_PRECISION": args.precision,
        "ONCOLENS_SPINNING": "1" if args.spinning else "0",
    }
    with live_server(env, workers=args.workers) as server:
        # what answers: int8 only where the model's copy passed its gate, whatever --precision asks for
        listed = {m["id"]: m for m in httpx.get(f"{server.base}/api/v1/models", timeout=10).json()}
        serving = listed[args.model]["serving_precision"]
        url = f"{server.base}/api/v1/models/{args.model}/predict"
        rows = [asyncio.run(run_level(url, images, c, args.requests, server.process.pid)) for c in (1, 4, 16)]
        ready_s = server.ready_s
    setup = (
        f"{args.workers} worker(s), {args.threads or 'all'} thread(s) per model"
        f"{', spinning' if args.spinning else ''}, "
        f"precision setting {args.precision}, serving {serving}"
    )
    print_table(f"HTTP POST /predict ({args.model}, {len(images)} sample images; {setup})", rows)
    print(f"\nserver ready (process start to first 200 on /health): {ready_s:.2f} s")
    save(
        args.save,
        {
            "model": args.model,
            "workers": args.workers,
            "threads": args.threads,
            "spinning": args.spinning,
            "precision": args.precision,
            "serving_precision": serving,
            "levels": rows,
            "server_ready_s": ready_s,
        },
    )


if __name__ == "__main__":
    main()
