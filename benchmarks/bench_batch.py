"""Batch screening images/s: the local engine (threads decode, one ONNX session) against the Ray
engine (Ray Data reads, actors with one session each) on a local Ray cluster of this machine.

python benchmarks/bench_batch.py [--images 400] [--model skin-ham10000] [--folder DIR]

Without --folder it takes the first N test images of ../shared/datasets/skin-ham10000 when that
exists, else the committed samples copied N times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import print_table, save

from oncolens.batch.local import run_batch
from oncolens.config import Settings
from oncolens.zoo import Zoo

ROOT = Path(__file__).parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "skin-ham10000"


def gather(folder: Path, count: int, into: Path) -> str:
    """Fill ``into`` with ``count`` images; say where they came from."""
    into.mkdir(parents=True)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
        for path in files:
            os.symlink(path.resolve(), into / path.name)
        return f"{len(files)} images of {folder}"
    samples = sorted((ROOT / "samples" / "skin-ham10000").glob("*.jpg"))
    for i in range(count):
        shutil.copy(samples[i % len(samples)], into / f"{i:05d}-{samples[i % len(samples)].name}")
    return f"{count} copies of the {len(samples)} committed skin samples"


def row(engine: str, images: int, seconds: float, start_s: float) -> dict[str, object]:
    """One engine's figures: the run itself, and with the cluster's start-up (Ray only)."""
    return {
        "engine": engine,
        "images": images,
        "run s": seconds,
        "img/s": images / seconds if seconds else 0.0,
        "cluster start s": start_s,
        "img/s with start": images / (seconds + start_s) if seconds else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--model", default="skin-ham10000")
    parser.add_argument("--folder", type=Path, default=DATASET / "images")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    from oncolens.batch.ray_engine import run_batch_ray

    settings = Settings()
    package = Zoo.from_settings(settings).get(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = gather(args.folder, args.images, work / "images")
        summary = run_batch(package, work / "images", work / "local.jsonl", settings=settings)
        local = "local (2 decode threads, 1 session)"
        rows.append(row(local, summary.analysed, summary.seconds, 0.0))
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - start
        try:
            summary = run_batch_ray(package, str(work / "images"), work / "ray.jsonl", settings=settings)
        finally:
            ray.shutdown()
        rows.append(row(f"ray (local cluster, {args.cpus} CPUs)", summary.analysed, summary.seconds, init_s))
    print(f"source: {source}; model {package.id}")
    print_table("Batch screening (one machine)", rows)
    path = save("batch", {"source": source, "model": package.id, "cpus": args.cpus, "rows": rows})
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
