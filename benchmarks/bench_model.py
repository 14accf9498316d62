"""Model latency and throughput on ONNX Runtime (fp32 and int8 files), start-up time and memory.

    python benchmarks/bench_model.py [--repeats 200] [--calibration-dir ../shared/datasets] [--spinning]
        [--save NAME] [--builds-only]

First each ensemble package is timed against the one-network build it keeps (``--builds-only`` stops
there).

Each model runs as shipped (its card's fp32 file) and as an int8 copy made here with the same
recipe as `oncolens quantize`. The int8 copy is calibrated on the model's train images when
``--calibration-dir`` holds its dataset, else on its committed sample images: the ranges change the
answers, not the speed, so the timings hold either way. Whether an int8 copy may serve is decided by
the accuracy gate (the card's ``int8`` section), not here. ``--spinning`` lets idle ONNX Runtime
threads spin instead of sleeping (``ONCOLENS_SPINNING``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import percentiles_ms, print_table, save

from oncolens.evaluation.datasets import Sample
from oncolens.training.ensemble import p50_ms
from oncolens.training.quantize import METHOD, calibration_samples, quantize, staged_int8
from oncolens.zoo import ModelPackage, Zoo, one_network_build
from oncolens.zoo.card import Int8Info

SAMPLES = Path(__file__).parents[1] / "samples"


def startup_and_rss() -> dict[str, float]:
    """Fresh process: import the app, build it and load every model; report time and RSS. Then run
    every model on batches of 1 to 16 images, in runs of at most BATCH_MAX backbone passes (as a busy
    server would) and report the RSS again: ONNX Runtime keeps the working memory of the largest run."""
    # ru_maxrss survives fork/exec on Linux, so read the new process's own VmRSS/VmHWM instead.
    code = (
        "import time; import numpy as np; t=time.perf_counter();"
        "from oncolens.app import create_app;"
        "app=create_app(); models=app.state.zoo.load_all(); elapsed=time.perf_counter()-t;"
        "status=dict(l.split(':',1) for l in open('/proc/self/status'));"
        "print(elapsed, status['VmRSS'].split()[0], status['VmHWM'].split()[0]);"
        "top=app.state.settings.batch_max;"
        "[m.run(np.zeros((b, 3, m.input_spec.size, m.input_spec.size), np.float32), with_features=True,"
        " max_batch=m.images_per_run(top)) for b in range(1, 17) for m in models];"
        "status=dict(l.split(':',1) for l in open('/proc/self/status'));"
        "print(top, status['VmRSS'].split()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {
        "startup_s": float(out[0]),
        "rss_mb": float(out[1]) / 1024,
        "peak_rss_mb": float(out[2]) / 1024,
        "batch_max": int(out[3]),
        "rss_after_batches_mb": float(out[4]) / 1024,
    }


def timings(package: ModelPackage, repeats: int) -> dict[str, float]:
    """Batch-1 p50/p95 and batch-8/32 images/s of one loaded package."""
    size = package.input_spec.size
    rng = np.random.default_rng(0)
    single = rng.normal(size=(1, 3, size, size)).astype(np.float32)
    for _ in range(10):
        package.run(single)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        package.run(single)
        times.append(time.perf_counter() - start)
    row: dict[str, float] = percentiles_ms(times)
    for batch in (8, 32):
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        package.run(x)
        runs = max(3, repeats // batch)
        start = time.perf_counter()
        for _ in range(runs):
            package.run(x)
        row[f"img/s@{batch}"] = batch * runs / (time.perf_counter() - start)
    return row


def int8_copy(package: ModelPackage, calibration_dir: Path | None, folder: Path) -> tuple[Path, Int8Info]:
    """An int8 file of ``package`` in ``folder`` (the recipe of `oncolens quantize`) and what it was calibrated on."""
    dataset = calibration_dir / package.id if calibration_dir is not None else None
    if dataset is not None and (dataset / "manifest.csv").is_file():
        samples, split = calibration_samples(dataset, package, 200), "train"
    else:
        files = sorted((SAMPLES / package.id).glob("*.*"))
        samples = [Sample(f, "", "sample", f.stem) for f in files if f.suffix.lower() in {".jpg", ".png"}]
        split = "samples/"
    out = folder / f"{package.id}.int8.onnx"
    quantize(package, samples, out)
    info = Int8Info(passed=False, method=METHOD, calibration={"split": split, "images": len(samples)})
    return out, info


def builds() -> list[dict[str, object]]:
    """Each ensemble package against the one-network build it keeps: one image through each file,
    taking turns in the same run (the served graph may cost at most its recipe's max_cost times the
    one-network build)."""
    rows: list[dict[str, object]] = []
    zoo = Zoo()
    for model_id in zoo.ids():
        served = zoo.paths[model_id]
        single = one_network_build(served)
        if single is None:
            continue
        card = ModelPackage.load(served, precision="fp32").card
        size = card.input.size
        ms = p50_ms({"served": served / "model.onnx", "one-network": single / "model.onnx"}, size, 100)
        cost = card.training["ensemble"]["cost"]
        rows.append(
            {
                "model": model_id,
                "served": card.build,
                "p50_ms": ms["served"],
                "one-network p50_ms": ms["one-network"],
                "ratio": ms["served"] / ms["one-network"],
                "budget": cost["max_ratio"],
                "ratio at build": cost["ratio"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--builds-only",
        action="store_true",
        help="only time each ensemble against its kept one-network build (one image, same run)",
    )
    parser.add_argument("--calibration-dir", type=Path, default=None)
    parser.add_argument("--spinning", action="store_true", help="ONNX Runtime threads spin (ONCOLENS_SPINNING)")
    parser.add_argument("--save", default="model", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    compared = builds()
    print_table("Served ensemble against its one-network build (one image, p50, files taking turns)", compared)
    if args.builds_only:
        save(args.save, {"builds": compared})
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for package in Zoo(spinning=args.spinning).load_all():
            fp32 = timings(package, args.repeats)
            file, info = int8_copy(package, args.calibration_dir, Path(tmp))
            with staged_int8(package.directory, file, info, args.spinning) as int8:  # timed whatever its gate says
                fast = timings(int8, args.repeats)
            source = f"{info.calibration['images']} images ({info.calibration['split']})"
            rows.append(
                {
                    "model": package.id,
                    "input": f"{package.input_spec.size}px",
                    "views": len(package.card.input.test_time_views),
                    **{f"fp32 {k}": v for k, v in fp32.items()},
                    **{f"int8 {k}": v for k, v in fast.items()},
                    "int8 speed-up@1": fp32["p50_ms"] / fast["p50_ms"],
                    "int8 gate": "passed" if package.card.int8 is not None and package.card.int8.passed else "failed",
                    "calibrated on": source,
                }
            )
    spin = "threads spinning" if args.spinning else "threads sleeping when idle"
    print_table(f"Model latency (ONNX Runtime, CPU, all threads, {spin}): fp32 as shipped and an int8 copy", rows)
    process = startup_and_rss()
    print_table(
        "Start-up (import + create_app + load every model), memory of that process, and its memory after "
        "every model ran batches of 1 to 16 images in runs of at most batch_max backbone passes",
        [process],
    )
    save(args.save, {"spinning": args.spinning, "models": rows, "process": process, "builds": compared})


if __name__ == "__main__":
    main()
