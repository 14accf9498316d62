"""Model latency and throughput on ONNX Runtime, start-up time and memory with every model loaded.

python benchmarks/bench_model.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
from _common import percentiles_ms, print_table, save

from oncolens.zoo import Zoo


def startup_and_rss() -> dict[str, float]:
    """Fresh process: import the app, build it and load every model; report time and peak RSS."""
    # ru_maxrss survives fork/exec on Linux, so read the new process's own VmRSS/VmHWM instead.
    code = (
        "import time; t=time.perf_counter();"
        "from oncolens.api import create_app;"
        "app=create_app(); app.state.zoo.load_all(); elapsed=time.perf_counter()-t;"
        "status=dict(l.split(':',1) for l in open('/proc/self/status'));"
        "print(elapsed, status['VmRSS'].split()[0], status['VmHWM'].split()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"startup_s": float(out[0]), "rss_mb": float(out[1]) / 1024, "peak_rss_mb": float(out[2]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for package in Zoo().load_all():
        size = package.input_spec.size
        rng = np.random.default_rng(0)
        single = rng.normal(size=(1, 3, size, size)).astype(np.float32)
        for _ in range(10):
            package.run(single)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            package.run(single)
            times.append(time.perf_counter() - start)
        row: dict[str, object] = {"model": package.id, "input": f"{size}px", **percentiles_ms(times)}
        for batch in (8, 32):
            x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
            package.run(x)
            runs = max(3, args.repeats // batch)
            start = time.perf_counter()
            for _ in range(runs):
                package.run(x)
            row[f"img/s@{batch}"] = batch * runs / (time.perf_counter() - start)
        row["views"] = len(package.card.input.test_time_views)
        rows.append(row)
    print_table("Model latency (ONNX Runtime, CPU, all threads)", rows)
    process = startup_and_rss()
    print_table("Start-up (import + create_app + load every model) and memory of that process", [process])
    save("model", {"models": rows, "process": process})


if __name__ == "__main__":
    main()
