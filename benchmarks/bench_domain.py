"""What knowing when not to answer costs per image: the out-of-domain score and the quality checks.

Times, for every shipped model, the per-image work added to the predict path (pooling the features,
the two domain tests, the quality statistics of the model input) and the end-to-end ``prepare`` +
model + ``case_result`` of one image with the checks on and off. Prints a table and writes
``benchmarks/results/domain.json``.

    python benchmarks/bench_domain.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from oncolens.config import Settings
from oncolens.decision import case_result
from oncolens.vision.domain import quality_stats
from oncolens.vision.prepare import RawImage, prepare
from oncolens.zoo import BUILTIN_DIR, ModelPackage, Zoo
from oncolens.zoo.preprocess import model_pixels

ROOT = Path(__file__).parents[1]


def p50_ms(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(package: ModelPackage, sample: Path, settings: Settings, repeats: int) -> dict[str, float]:
    raw = [RawImage(sample.read_bytes(), sample.name)]
    prepared = prepare(raw, package, settings)
    _, features = package.run(prepared.inputs, with_features=True)
    assert features is not None
    pixels = model_pixels(prepared.decoded[0].image, package.input_spec)[None]

    def checks() -> None:
        package.domain_checks(features)
        quality_stats(pixels)

    def predict(on: bool) -> None:
        ready = prepare(raw, package, settings)
        out, feats = package.run(ready.inputs, with_features=True)
        sizes = [(d.width, d.height) for d in ready.decoded]
        if on:
            case_result(package, out, sizes, features=feats, stats=ready.stats)
        else:
            case_result(package, out, sizes)

    off, on = p50_ms(lambda: predict(False), repeats), p50_ms(lambda: predict(True), repeats)
    return {"checks_ms": p50_ms(checks, repeats * 4), "predict_off_ms": off, "predict_on_ms": on}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    zoo, settings, rows = Zoo([BUILTIN_DIR], threads=1), Settings(), {}
    print(f"{'model':<17}{'checks ms':>10}{'predict off':>13}{'predict on':>12}{'added ms':>10}")
    for model_id in zoo.ids():
        sample = next((ROOT / "samples" / model_id).glob("*.jpg"))
        row = rows[model_id] = measure(zoo.get(model_id), sample, settings, args.repeats)
        off, on = row["predict_off_ms"], row["predict_on_ms"]
        print(f"{model_id:<17}{row['checks_ms']:>10.3f}{off:>13.2f}{on:>12.2f}{on - off:>10.2f}")
    out = ROOT / "benchmarks" / "results" / "domain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": 1, "repeats": args.repeats, "models": rows}, indent=2) + "\n")
    print(f"p50 over {args.repeats} runs, 1 ONNX thread; wrote {out}")


if __name__ == "__main__":
    main()
