"""A screening programme's database: seed N cases (and 3 audit events each) by SQL from one real case
into a fresh PostgreSQL database, then time the lists and pages through a running `oncolens serve`.

    python benchmarks/bench_scale.py --cases 1000000 [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
                                     [--writes 1000] [--reuse]

Prints p50 / p95 over ``--repeats`` requests of each: the API case list (first page, deep by cursor,
deep by offset, filtered), the audit log (first page, deep by cursor, filtered), a model's monitoring,
and the web case list, dashboard, audit trail and model pages. Then makes ``--writes`` mixed creates,
reviews and deletes through the API and checks every kept count against a full recount. Seeding a
million cases takes a few minutes on a 2-core machine; ``--reuse`` times the database a run before left.
"""

from __future__ import annotations

import argparse
import os
import random
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


# Per model: a malignant and a benign class id, given as the reference class of reviewed cases.
REFERENCE = {
    "skin-ham10000": ("mel", "nv"),
    "skin-isic9": ("melanoma", "nevus"),
    "oral-photo": ("cancer", "non_cancer"),
    "thyroid-us": ("tirads_4_5", "tirads_2_3"),
    "breast-us": ("malignant", "benign"),
    "cervical-herlev": ("carcinoma_in_situ", "normal_intermediate"),
}


def seed(url: str, cases: int, audit_per_case: int) -> float:
    """Copy the one real case N times (models, risk levels, statuses, days and P(malignant) varied;
    reviewed cases given a reference class, malignant with probability P) and write ``audit_per_case``
    events for each, as SQL; then ANALYZE. The kept counts are rebuilt after (``refresh_stats``)."""
    start = time.perf_counter()
    engine = create_engine(url)
    models = "ARRAY[" + ", ".join(f"'{m}'" for m in MODELS) + "]"
    malignant = "ARRAY[" + ", ".join(f"'{REFERENCE[m][0]}'" for m in MODELS) + "]"
    benign = "ARRAY[" + ", ".join(f"'{REFERENCE[m][1]}'" for m in MODELS) + "]"
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO cases (id, owner_id, model_id, model_version, patient_ref, patient_name, "
                "patient_age, patient_sex, patient_email, clinical_notes, status, top_class, p_malignant, "
                "risk_level, recommendation, aggregation_rule, result_json, confirmed_diagnosis, review_notes, "
                "reference_class, reference_standard, created_at, updated_at) "
                f"SELECT md5(g::text || 'scale'), c.owner_id, ({models})[1 + g % 6], c.model_version, 'S-' || g, '', "
                "c.patient_age, c.patient_sex, '', '', (ARRAY['pending_review','reviewed','confirmed'])[1 + g % 3], "
                "c.top_class, r.p, (ARRAY['low','borderline','moderate','high','indeterminate'])[1 + g % 5], "
                "c.recommendation, c.aggregation_rule, c.result_json, '', '', "
                f"CASE WHEN g % 3 = 0 THEN NULL WHEN r.u < r.p THEN ({malignant})[1 + g % 6] "
                f"ELSE ({benign})[1 + g % 6] END, CASE WHEN g % 3 = 0 THEN NULL ELSE 'histopathology' END, "
                "now() - (g * interval '30 seconds'), now() - (g * interval '30 seconds') "
                "FROM (SELECT g, random() AS p, random() AS u FROM generate_series(1, :n) AS g) AS r, "
                "(SELECT * FROM cases LIMIT 1) AS c"
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
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - start


def refresh_stats(url: str) -> float:
    """``oncolens db refresh-stats`` on the seeded database: every kept count rebuilt from the rows."""
    start = time.perf_counter()
    env = os.environ | {"ONCOLENS_DATABASE_URL": url, "ONCOLENS_SECRET_KEY": SECRET}
    subprocess.run([sys.executable, "-m", "oncolens.cli.main", "db", "refresh-stats"], env=env, check=True)
    return time.perf_counter() - start


def seeded_cases(url: str) -> int:
    """How many cases a kept benchmark database holds (0 when there is none)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM cases")).scalar_one())
    except Exception:
        return 0
    finally:
        engine.dispose()


RECOUNTS = {
    "dashboard (model, risk, status)": (
        "SELECT model_id, risk_level, status, count(*) FROM cases GROUP BY 1, 2, 3",
        "SELECT model_id, risk_level, status, sum(n) FROM case_counts GROUP BY 1, 2, 3 HAVING sum(n) <> 0",
    ),
    "dashboard (day, risk)": (
        "SELECT (created_at AT TIME ZONE 'UTC')::date, risk_level, count(*) FROM cases GROUP BY 1, 2",
        "SELECT day, risk_level, sum(n) FROM case_counts GROUP BY 1, 2 HAVING sum(n) <> 0",
    ),
    "monitoring (model, P bin, reference)": (
        "SELECT model_id, LEAST(FLOOR(p_malignant * 100), 99)::int, COALESCE(reference_class, ''), count(*) "
        "FROM cases GROUP BY 1, 2, 3",
        "SELECT model_id, p_bin, reference_class, sum(n) FROM monitor_counts WHERE span = 'd' GROUP BY 1, 2, 3 "
        "HAVING sum(n) <> 0",
    ),
    "monitoring, months = their days": (
        "SELECT model_id, day - (extract(day from day)::int - 1), p_bin, reference_class, sum(n) FROM monitor_counts "
        "WHERE span = 'd' GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0",
        "SELECT model_id, day, p_bin, reference_class, sum(n) FROM monitor_counts WHERE span = 'm' "
        "GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0",
    ),
    "monitoring, weeks = their days": (
        "SELECT model_id, day - (extract(isodow from day)::int - 1), p_bin, reference_class, sum(n) "
        "FROM monitor_counts WHERE span = 'd' GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0",
        "SELECT model_id, day, p_bin, reference_class, sum(n) FROM monitor_counts WHERE span = 'w' "
        "GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0",
    ),
    "audit (action, user)": (
        "SELECT action, COALESCE(user_id, 0), count(*) FROM audit_events GROUP BY 1, 2",
        "SELECT action, user_id, sum(n) FROM audit_counts GROUP BY 1, 2 HAVING sum(n) <> 0",
    ),
}


def recounts_agree(url: str) -> dict[str, bool]:
    """Each kept count against a full recount of the rows."""
    engine = create_engine(url)
    with engine.connect() as connection:
        agree = {
            name: sorted(map(tuple, connection.execute(text(rows)).all()))
            == sorted(map(tuple, connection.execute(text(kept)).all()))
            for name, (rows, kept) in RECOUNTS.items()
        }
    engine.dispose()
    return agree


def mixed_writes(api: httpx.Client, writes: int, seed: int = 0) -> dict[str, int]:
    """``writes`` creates, reviews (status and reference class) and deletes through the API, at random."""
    rng = random.Random(seed)
    files = [("files", (SAMPLE.name, SAMPLE.read_bytes(), "image/jpeg"))]
    made: list[str] = []
    done = {"create": 0, "review": 0, "delete": 0}
    for step in range(writes):
        action = rng.choice(["create", "create", "review", "review", "delete"]) if made else "create"
        if action == "create":
            answer = api.post(
                "/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": f"W-{step}"}, files=files
            )
            made.append(answer.json()["id"])
        elif action == "review":
            reference = rng.choice(["mel", "nv", None])
            change = {
                "status": rng.choice(["pending_review", "reviewed", "confirmed"]),
                "reference_class": reference,
                "reference_standard": "histopathology" if reference else None,
            }
            answer = api.patch(f"/api/v1/cases/{rng.choice(made)}", json=change)
        else:
            answer = api.delete(f"/api/v1/cases/{made.pop(rng.randrange(len(made)))}")
        answer.raise_for_status()
        done[action] += 1
    return done


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
    parser.add_argument("--writes", type=int, default=1000, help="mixed API writes before the recount check")
    parser.add_argument(
        "--reuse", action="store_true", help="time the database a run before seeded (kept), if it holds --cases"
    )
    args = parser.parse_args()
    url = make_url(args.database_url).set(database="oncolens_scale").render_as_string(hide_password=False)
    reuse = args.reuse and seeded_cases(url) >= args.cases
    if not reuse:
        url = fresh_database(args.database_url, "oncolens_scale")
    env = {"ONCOLENS_DATABASE_URL": url, "ONCOLENS_SECRET_KEY": SECRET, "ONCOLENS_PRELOAD_MODELS": "false"}
    subprocess.run(
        [sys.executable, "-m", "oncolens.cli.main", "users", "create", "--admin", "--email", "admin@scale.org",
         "--password-stdin"],
        input=PASSWORD.encode(), env=os.environ | env, check=not reuse, capture_output=True,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {"cases": args.cases, "audit_events": args.cases * args.audit_per_case}
    with live_server(env) as server:
        api = httpx.Client(base_url=server.base, timeout=120)
        token = api.post("/api/v1/auth/token", data={"username": "admin@scale.org", "password": PASSWORD}).json()
        api.headers["Authorization"] = f"Bearer {token['access_token']}"
        if not reuse:
            files = [("files", (SAMPLE.name, SAMPLE.read_bytes(), "image/jpeg"))]
            api.post(
                "/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": "S-0"}, files=files
            ).raise_for_status()
            figures["seed_s"] = seed(url, args.cases, args.audit_per_case)
            figures["refresh_stats_s"] = refresh_stats(url)
            print(
                f"seeded {args.cases:,} cases and {args.cases * args.audit_per_case:,} audit events in "
                f"{figures['seed_s']:.0f} s; oncolens db refresh-stats took {figures['refresh_stats_s']:.0f} s"
            )
        deep = int(args.cases * 0.9)
        case_cursor, audit_cursor = deep_cursor(url, "cases", deep), deep_cursor(url, "audit", deep * 3)
        checks: list[tuple[str, str, dict[str, Any]]] = [
            ("API cases, first page (limit 50)", "/api/v1/cases", {"limit": 50}),
            (f"API cases, deep by cursor (row {deep:,})", "/api/v1/cases", {"limit": 50, "cursor": case_cursor}),
            (f"API cases, deep by offset ({deep:,})", "/api/v1/cases", {"limit": 50, "offset": deep}),
            ("API cases, risk_level=high", "/api/v1/cases", {"limit": 50, "risk_level": "high"}),
            ("API cases, model_id=thyroid-us", "/api/v1/cases", {"limit": 50, "model_id": "thyroid-us"}),
            ("API cases, status=confirmed", "/api/v1/cases", {"limit": 50, "status": "confirmed"}),
            ("API audit, first page (limit 50)", "/api/v1/audit", {"limit": 50}),
            ("API audit, deep by cursor", "/api/v1/audit", {"limit": 50, "cursor": audit_cursor}),
            ("API audit, action=report", "/api/v1/audit", {"limit": 50, "action": "report"}),
            ("API audit, user_id=1", "/api/v1/audit", {"limit": 50, "user_id": 1}),
            ("API monitoring, skin-ham10000 by month", "/api/v1/models/skin-ham10000/monitoring", {}),
            ("API monitoring, skin-ham10000 by week", "/api/v1/models/skin-ham10000/monitoring", {"period": "week"}),
        ]  # fmt: skip
        for name, path, params in checks:
            rows.append({"request": name} | timed(api, path, args.repeats, **params))
        web = httpx.Client(base_url=server.base, timeout=120)
        login = web.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
        assert csrf is not None
        web.post("/login", data={"email": "admin@scale.org", "password": PASSWORD, "csrf_token": csrf.group(1)})
        pages = (
            ("web /cases", "/cases"),
            ("web /admin (dashboard)", "/admin"),
            ("web /admin/audit", "/admin/audit"),
            ("web /admin/models (versions and flags)", "/admin/models"),
            ("web /admin/models/skin-ham10000 (monitoring)", "/admin/models/skin-ham10000"),
        )
        for name, path in pages:
            rows.append({"request": name} | timed(web, path, args.repeats))
        if args.writes:
            start = time.perf_counter()
            figures["writes"] = mixed_writes(api, args.writes)
            figures["writes_s"] = time.perf_counter() - start
            figures["recounts_agree"] = recounts_agree(url)
            print(f"after {args.writes:,} mixed writes {figures['writes']}: kept counts equal a recount: "
                  f"{figures['recounts_agree']}")  # fmt: skip
    print_table(f"{args.cases:,} cases, {args.cases * args.audit_per_case:,} audit events (PostgreSQL)", rows)
    save("scale", figures | {"rows": rows})


if __name__ == "__main__":
    main()
