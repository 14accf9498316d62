"""Memory and time of the worst requests the limits allow, against a real server.

Starts `oncolens serve` on 127.0.0.1 (a free port, a fresh data folder), warms it up, then sends one
at a time: predict with images that fill the per-request pixel limit (as 5 images at the per-image
limit and as 32 smaller ones), explain and analyze (with heat-maps) of one image at the per-image
limit, and a JSON body of base64 at the body limit. Solid-colour PNGs: a few hundred KB that decode
to the full pixel count, the attacker's cheapest request. Before each request the server's peak
RSS is reset (``/proc/PID/clear_refs``), after it the peak (VmHWM) and the settled RSS are read.
Loopback only. Needs Linux and permission to write the server's clear_refs (same user).

    python benchmarks/bench_worst_request.py
"""

from __future__ import annotations

import base64
import io
import math
import os
import time
from pathlib import Path

import httpx
from _common import live_server, print_table, rss_mb, save
from PIL import Image

from oncolens.config import Settings


def solid_png(pixels: int, colour: tuple[int, int, int] = (200, 120, 90)) -> bytes:
    side = math.isqrt(pixels)
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def measure(client: httpx.Client, pid: int, name: str, send: dict[str, object], url: str) -> dict[str, object]:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = rss_mb(pid, "VmRSS")
    start = time.perf_counter()
    response = client.post(url, **send)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    time.sleep(1.0)
    return {
        "request": name,
        "status": response.status_code,
        "seconds": seconds,
        "rss_before_mb": before,
        "peak_rss_mb": rss_mb(pid, "VmHWM"),
        "rss_after_mb": rss_mb(pid, "VmRSS"),
    }


def main() -> None:
    limits = Settings()
    per_image, per_request = limits.max_image_pixels, limits.max_request_pixels
    at_limit = solid_png(per_image)
    at_limit_side = math.isqrt(per_image)
    many = limits.max_images_per_request
    small = solid_png(per_request // many)
    fill = per_request // per_image
    rows: list[dict[str, object]] = []
    with live_server() as server, httpx.Client(timeout=300) as client:
        base = server.base
        model = f"{base}/api/v1/models/skin-ham10000"
        warm = solid_png(600 * 600)
        client.post(f"{model}/analyze", files={"file": ("w.png", warm, "image/png")})

        def images(count: int, data: bytes) -> dict[str, object]:
            return {"files": [("files", (f"{i}.png", data, "image/png")) for i in range(count)]}

        side = math.isqrt(per_request // many)
        body = b'{"image": "' + base64.b64encode(os.urandom(limits.max_request_bytes)) + b'"}'
        cases = [
            (f"predict {fill} x {at_limit_side}^2 px", images(fill, at_limit), f"{model}/predict"),
            (f"predict {many} x {side}^2 px", images(many, small), f"{model}/predict"),
            (f"explain 1 x {at_limit_side}^2 px", images(1, at_limit), f"{model}/explain"),
            (f"analyze+heatmap 1 x {at_limit_side}^2 px", images(1, at_limit), f"{model}/analyze?heatmap=true"),
            (
                f"predict {fill + 1} x {at_limit_side}^2 px (over: 413)",
                images(fill + 1, at_limit),
                f"{model}/predict",
            ),
            (
                "JSON, 64 MB of base64 (413)",
                {"content": body, "headers": {"content-type": "application/json"}},
                f"{model}/predict",
            ),
        ]
        for name, send, url in cases:
            rows.append(measure(client, server.process.pid, name, send, url))
    print_table("Worst allowed requests (one at a time, solid-colour PNGs)", rows)
    sizes = {
        "max_image_pixels": per_image,
        "max_request_pixels": per_request,
        "max_request_bytes": limits.max_request_bytes,
    }
    save("worst_request", {"limits": sizes, "rows": rows})


if __name__ == "__main__":
    main()
