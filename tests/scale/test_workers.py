"""``oncolens serve --workers 2``: one port, two processes, and ``/metrics`` sums both (Prometheus
multiprocess mode), whichever worker answers the scrape."""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.scale.replicas import replicas

HEALTH = re.compile(r'^oncolens_http_requests_total\{method="GET",route="/api/v1/models",status="200"\} (\S+)$', re.M)
MEMORY = re.compile(r'^oncolens_resident_memory_bytes\{pid="(\d+)"\} (\S+)$', re.M)


def test_metrics_sum_every_worker(tmp_path: Path) -> None:
    folder = tmp_path / "prometheus"
    env = {
        "ONCOLENS_DATA_DIR": str(tmp_path / "data"),
        "ONCOLENS_PRELOAD_MODELS": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
    }
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"stale values of an earlier run")  # emptied at start
    with replicas(env, tmp_path, 1, "--workers", "2") as (server,):

        def hit(_: int) -> int:
            with httpx.Client() as client:  # a new connection each time, so the kernel spreads them
                return client.get(f"{server.url}/api/v1/models").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(hit, range(60)))
        assert statuses == [200] * 60
        scrapes = [httpx.get(f"{server.url}/metrics").text for _ in range(6)]
        totals = {float(HEALTH.findall(text)[0]) for text in scrapes}
        memory = dict(MEMORY.findall(scrapes[-1]))
        workers = {p.name.split("_")[1].split(".")[0] for p in folder.glob("counter_*.db")}
    assert "999999" not in workers
    assert len(workers) == 2, workers  # both workers served and keep their own values
    assert totals == {60.0}  # every scrape, answered by either worker, gives the one total of both
    assert set(memory) == workers  # each worker's resident memory, as its own series
    assert all(float(rss) > 30 * 2**20 for rss in memory.values()), memory
    assert "Started parent process" in server.output() and server.output().count("Application startup complete") == 2
