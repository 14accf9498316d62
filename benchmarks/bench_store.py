"""Image store latency: write, read and remove of a case image in the data folder (FileStore) and in
S3-compatible object storage (a SeaweedFS server started here on loopback, as the tests do).

python benchmarks/bench_store.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import percentiles_ms, print_table, save

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from oncolens.config import Settings  # noqa: E402
from oncolens.store.images import FileStore, ImageStore, open_store  # noqa: E402
from tests.seaweed import seaweedfs  # noqa: E402

SAMPLE = ROOT / "samples" / "skin-ham10000" / "ISIC_0025316.jpg"


def measure(store: ImageStore, data: bytes, repeats: int) -> dict[str, object]:
    writes, reads, removes = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        name = store.write(data, "JPEG")
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert store.read(name) == data
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        store.remove([name])
        removes.append(time.perf_counter() - start)
    write, read, remove = percentiles_ms(writes), percentiles_ms(reads), percentiles_ms(removes)
    return {
        "write p50 ms": write["p50_ms"],
        "write p95 ms": write["p95_ms"],
        "read p50 ms": read["p50_ms"],
        "read p95 ms": read["p95_ms"],
        "remove p50 ms": remove["p50_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    data = SAMPLE.read_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append({"store": "file (fsync'd)", **measure(FileStore(work / "images"), data, args.repeats)})
        with seaweedfs(work / "seaweedfs") as server:
            server.bucket("bench")
            fields = {k.removeprefix("ONCOLENS_").lower(): v for k, v in server.env("bench").items()}
            store = open_store(Settings(data_dir=work, **fields))  # type: ignore[arg-type]
            rows.append({"store": "s3 (SeaweedFS, loopback)", **measure(store, data, args.repeats)})
    print(f"one {len(data) / 1024:.0f} KiB JPEG, {args.repeats} times")
    print_table("Image store latency", rows)
    path = save("store", {"image_bytes": len(data), "repeats": args.repeats, "rows": rows})
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
