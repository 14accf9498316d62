"""A screening programme's database: seed N cases (and 3 audit events each) by SQL from one real case
into a fresh PostgreSQL database, then time the lists and pages through a running `oncolens serve`.

    python benchmarks/bench_scale.py --cases 1000000 [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

Prints p50 / p95 over ``--repeats`` requests of each: the API case list (first page, deep by cursor,
deep by offset, filtered), the audit log (first page, deep by cursor), the web case list and the
dashboard. Seeding a million cases takes a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))
from _common import live_server, percentiles_ms, print_table, save

SAMPLE = Path(__file__).parents[1] / "samples" / "skin-ham10000" / "ISIC_0025316.jpg"
PASSWORD = "scale-benchmark-password"
SECRET = "scale-benchmark-secret-key-0123456789-abcdefghijklmnop"
MODELS = ["skin-ham10000", "skin-isic9", "oral-photo", "thyroid-us", "breast-us", "cervical-herlev"]


def fresh_database(base: str, name: str) -> str:
    url = make_url(base)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def seed(url: str, cases: int, audit_per_case: int) -> float:
    """Copy the one real case N times (models, risk levels, statuses and days varied) and write
    ``audit_per_case`` events for each; then recount the dashboard's counts and ANALYZE."""
    start = time.perf_counter()
    engine = create_engine(url)
    models = "ARRAY[" + ", ".join(f"'{m}'" for m in MODELS) + "]"
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO cases (id, owner_id, model_id, model_version, patient_ref, patient_name, "
                "patient_age, patient_sex, patient_email, clinical_notes, status, top_class, p_malignant, "
                "risk_level, recommendation, aggregation_rule, result_json, confirmed_diagnosis, review_notes, "
                "created_at, updated_at) "
                f"SELECT md5(g::text || 'scale'), c.owner_id, ({models})[1 + g % 6], c.model_version, 'S-' || g, '', "
                "c.patient_age, c.patient_sex, '', '', (ARRAY['pending_review','reviewed','confirmed'])[1 + g % 3], "
                "c.top_class, c.p_malignant, (ARRAY['low','borderline','moderate','high','indeterminate'])[1 + g % 5], "
                "c.recommendation, c.aggregation_rule, c.result_json, '', '', "
                "now() - (g * interval '30 seconds'), now() - (g * interval '30 seconds') "
                "FROM generate_series(1, :n) AS g, (SELECT * FROM cases LIMIT 1) AS c"
            ),
            {"n": cases},
        )
        connection.execute(
            text(
                "INSERT INTO audit_events (at, user_id, actor, action, case_id, detail, client) "
                "SELECT now() - (g * interval '10 seconds'), 1, 'admin@scale.org', "
                "(ARRAY['view','image_view','report'])[1 + g % 3], md5((g / :k)::text || 'scale'), '', '127.0.0.1' "
                "FROM generate_series(1, :m) AS g"
            ),
            {"m": cases * audit_per_case, "k": audit_per_case},
        )
        connection.execute(text("DELETE FROM case_counts"))
        connection.execute(
            text(
                "INSERT INTO case_counts (day, model_id, risk_level, status, n) "
                "SELECT (created_at AT TIME ZONE 'UTC')::date, model_id, risk_level, status, count(*) "
                "FROM cases GROUP BY 1, 2, 3, 4"
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - start


def deep_cursor(url: str, kind: str, position: int) -> str:
    """The next_cursor a client holds after ``position`` rows of the list."""
    from oncolens.services.paging import encode_cursor

    engine = create_engine(url)
    with engine.connect() as connection:
        if kind == "cases":
            when, case_id = connection.execute(
                text("SELECT created_at, id FROM cases ORDER BY created_at DESC, id OFFSET :p LIMIT 1"), {"p": position}
            ).one()
            cursor = encode_cursor("cases", when.isoformat(), case_id)
        else:
            (event,) = connection.execute(
                text("SELECT id FROM audit_events ORDER BY id DESC OFFSET :p LIMIT 1"), {"p": position}
            ).one()
            cursor = encode_cursor("audit", event)
    engine.dispose()
    return cursor


def timed(client: httpx.Client, path: str, repeats: int, **params: Any) -> dict[str, float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        answer = client.get(path, params=params)
        seconds.append(time.perf_counter() - start)
        answer.raise_for_status()
    return percentiles_ms(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--audit-per-case", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("ONCOLENS_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    url = fresh_database(args.database_url, "oncolens_scale")
    env = {"ONCOLENS_DATABASE_URL": url, "ONCOLENS_SECRET_KEY": SECRET, "ONCOLENS_PRELOAD_MODELS": "false"}
    subprocess.run(
        [sys.executable, "-m", "oncolens.cli.main", "users", "create", "--admin", "--email", "admin@scale.org",
         "--password-stdin"],
        input=PASSWORD.encode(), env=os.environ | env, check=True, capture_output=True,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    with live_server(env) as server:
        api = httpx.Client(base_url=server.base, timeout=120)
        token = api.post("/api/v1/auth/token", data={"username": "admin@scale.org", "password": PASSWORD}).json()
        api.headers["Authorization"] = f"Bearer {token['access_token']}"
        files = [("files", (SAMPLE.name, SAMPLE.read_bytes(), "image/jpeg"))]
        api.post(
            "/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": "S-0"}, files=files
        ).raise_for_status()
        seeded_s = seed(url, args.cases, args.audit_per_case)
        print(f"seeded {args.cases:,} cases and {args.cases * args.audit_per_case:,} audit events in {seeded_s:.0f} s")
        deep = int(args.cases * 0.9)
        case_cursor, audit_cursor = deep_cursor(url, "cases", deep), deep_cursor(url, "audit", deep * 3)
        checks: list[tuple[str, str, dict[str, Any]]] = [
            ("API cases, first page (limit 50)", "/api/v1/cases", {"limit": 50}),
            (f"API cases, deep by cursor (row {deep:,})", "/api/v1/cases", {"limit": 50, "cursor": case_cursor}),
            (f"API cases, deep by offset ({deep:,})", "/api/v1/cases", {"limit": 50, "offset": deep}),
            ("API cases, risk_level=high", "/api/v1/cases", {"limit": 50, "risk_level": "high"}),
            ("API cases, model_id=thyroid-us", "/api/v1/cases", {"limit": 50, "model_id": "thyroid-us"}),
            ("API audit, first page (limit 50)", "/api/v1/audit", {"limit": 50}),
            ("API audit, deep by cursor", "/api/v1/audit", {"limit": 50, "cursor": audit_cursor}),
        ]  # fmt: skip
        for name, path, params in checks:
            rows.append({"request": name} | timed(api, path, args.repeats, **params))
        web = httpx.Client(base_url=server.base, timeout=120)
        login = web.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
        assert csrf is not None
        web.post("/login", data={"email": "admin@scale.org", "password": PASSWORD, "csrf_token": csrf.group(1)})
        for name, path in (("web /cases", "/cases"), ("web /admin (dashboard)", "/admin")):
            rows.append({"request": name} | timed(web, path, args.repeats))
    print_table(f"{args.cases:,} cases, {args.cases * args.audit_per_case:,} audit events (PostgreSQL)", rows)
    save(
        "scale",
        {"cases": args.cases, "audit_events": args.cases * args.audit_per_case, "seed_s": seeded_s, "rows": rows},
    )


if __name__ == "__main__":
    main()
