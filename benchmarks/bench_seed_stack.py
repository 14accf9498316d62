"""Throughput at 16 clients: every served OncoLens model against the seed apps' stack, same run.

The five apps OncoLens replaces (../shared/seeds) each served a Keras network from one web worker,
calling ``model.predict`` per request. This benchmark stands one up as they did: FastAPI on one uvicorn
worker, a Keras MobileNetV2 at 224 x 224 (random weights: the speed is the architecture's, nothing is
downloaded), the upload decoded with PIL, resized, scaled to [0, 1] and passed to ``model.predict``.
It then sends the same sample images from 16 concurrent clients to it and to ``oncolens serve``
(one worker, the models as shipped: ensembles where their card says so), one model at a time, and
prints images per second and the ratio.

TensorFlow is not an OncoLens dependency: give a Python that has ``tensorflow-cpu``, ``fastapi``,
``uvicorn``, ``python-multipart`` and ``pillow`` installed, e.g.

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu fastapi uvicorn \\
        python-multipart pillow
    python benchmarks/bench_seed_stack.py --seed-python /tmp/tfvenv/bin/python [--requests 160]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _common import free_port, live_server, print_table, save
from bench_http import run_level

SAMPLES = Path(__file__).parents[1] / "samples"
CLIENTS = 16

SEED_APP = """
import io
import numpy as np
import tensorflow as tf
from fastapi import FastAPI, File, UploadFile
from PIL import Image

model = tf.keras.applications.MobileNetV2(weights=None, classes=7, input_shape=(224, 224, 3))
app = FastAPI()
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@app.get("/health")
def health():
    return {"status": "ok"}


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    image = Image.open(io.BytesIO(await file.read())).convert("RGB").resize((224, 224))
    x = np.expand_dims(np.asarray(image, dtype=np.float32) / 255.0, 0)
    probs = model.predict(x)[0]
    top = int(np.argmax(probs))
    return {"class": CLASSES[top], "confidence": float(probs[top])}
"""


def seed_server(python: str) -> tuple[subprocess.Popen[bytes], str]:
    """The seed stack on 127.0.0.1 at a free port (one uvicorn worker); waits for /health."""
    folder = Path(tempfile.mkdtemp(prefix="seed-stack-"))
    (folder / "seed_app.py").write_text(SEED_APP)
    port = free_port()
    process = subprocess.Popen(
        [python, "-m", "uvicorn", "seed_app:app", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > 120 or process.poll() is not None:
            process.terminate()
            raise SystemExit(f"the seed stack did not start with {python} (is tensorflow-cpu installed there?)")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed-python", required=True, help="a Python with tensorflow-cpu, fastapi, uvicorn")
    parser.add_argument("--requests", type=int, default=160, help="requests per measurement (16 clients)")
    parser.add_argument("--models", nargs="*", default=None, help="model ids (default every served model)")
    parser.add_argument("--save", default="seed-stack", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    rows = []
    with live_server({"ONCOLENS_PRECISION": "fp32"}) as oncolens:
        listed = {m["id"]: m for m in httpx.get(f"{oncolens.base}/api/v1/models", timeout=10).json()}
        models = args.models or sorted(listed)
        process, seed_base = seed_server(args.seed_python)
        try:
            for model in models:
                images = [p.read_bytes() for p in sorted((SAMPLES / model).glob("*.jpg"))]
                seed = asyncio.run(run_level(f"{seed_base}/predict", images, CLIENTS, args.requests, process.pid))
                ours = asyncio.run(
                    run_level(
                        f"{oncolens.base}/api/v1/models/{model}/predict",
                        images,
                        CLIENTS,
                        args.requests,
                        oncolens.process.pid,
                    )
                )
                rows.append(
                    {
                        "model": model,
                        "build": listed[model].get("build", ""),
                        "oncolens img/s": ours["img/s"],
                        "oncolens p50 ms": ours["p50_ms"],
                        "seed img/s": seed["img/s"],
                        "seed p50 ms": seed["p50_ms"],
                        "ratio": ours["img/s"] / seed["img/s"],
                    }
                )
        finally:
            process.terminate()
            process.wait(10)
    print_table(f"{CLIENTS} clients, {args.requests} requests each side, same run (seed: Keras MobileNetV2)", rows)
    save(args.save, {"clients": CLIENTS, "requests": args.requests, "rows": rows})


if __name__ == "__main__":
    main()
