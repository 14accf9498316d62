"""Can the timing of the next request tell whether a password reset was for an existing account?
(issue 38, finding 6)

    python benchmarks/reset_timing.py [--pairs 30]

A live server (SQLite, e-mail to an SMTP sink on loopback, mail sent from the queue every 2 s) gets,
per pair, a reset for an existing address followed at once by a probe (``GET /api/v1/models``), and
a reset for a missing address followed at once by the same probe, in random order. Printed: the
share of pairs in which the probe after the existing address was slower (0.5 is "cannot tell"), and
the median probe times. Saves ``reset_timing.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller

from oncolens.config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.live import free_port, live_server


class Sink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 OK"


def measure(pairs: int) -> dict[str, Any]:
    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with tempfile.TemporaryDirectory() as data:
            settings = Settings(
                data_dir=Path(data),
                preload_models=False,
                public_url="https://oncolens.clinic.org",
                smtp_host="127.0.0.1",
                smtp_port=port,
                mail_max_per_hour=10_000,
            )
            with live_server(settings, {"known@clinic.org": "clinician"}) as (url, _), httpx.Client() as client:
                client.get(f"{url}/api/v1/models")
                after: dict[str, list[float]] = {"existing": [], "missing": []}
                slower = 0
                for n in range(pairs):
                    order = ["existing", "missing"]
                    random.shuffle(order)
                    times = {}
                    for kind in order:
                        email = "known@clinic.org" if kind == "existing" else f"nobody{n}@clinic.org"
                        client.post(f"{url}/api/v1/auth/password-reset", json={"email": email})
                        start = time.perf_counter()
                        client.get(f"{url}/api/v1/models")
                        times[kind] = time.perf_counter() - start
                        after[kind].append(times[kind])
                        time.sleep(0.3)
                    slower += times["existing"] > times["missing"]
                time.sleep(3)
    finally:
        controller.stop()
    return {
        "pairs": pairs,
        "share_slower_after_existing": slower / pairs,
        "median_probe_ms_after_existing": statistics.median(after["existing"]) * 1000,
        "median_probe_ms_after_missing": statistics.median(after["missing"]) * 1000,
        "mails_delivered": sink.count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30)
    result = measure(parser.parse_args().pairs)
    print(
        f"{result['pairs']} pairs: the probe after an existing address was slower in "
        f"{result['share_slower_after_existing']:.2f} of them (0.5 = cannot tell); median probe "
        f"{result['median_probe_ms_after_existing']:.1f} ms vs {result['median_probe_ms_after_missing']:.1f} ms; "
        f"{result['mails_delivered']} mails delivered"
    )
    (Path(__file__).parent / "reset_timing.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
