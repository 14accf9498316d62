"""Monitoring and audit counts kept, not recomputed; the audit log's filters indexed with its order.

- ``monitor_counts`` (model, span, first day, P bin, called, indeterminate, reference class -> n, images,
  out-of-domain and quality-warned images, sum of P): each case in its day, week and month; the
  monitoring page reads these, filled here from the cases.
- ``audit_counts`` (day, action, user -> n): the audit log's totals, filled here from the events.
- The audit log's single-column indexes on user, action and case become (column, id): a filtered page
  reads 50 index entries in the page's order instead of sorting every match.

The recount SQL is written out here as it was at this revision (``store.stats`` keeps the live copy):
a later change to the tables must not change what this migration does.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_MONITOR = (
    "INSERT INTO monitor_counts (day, model_id, p_bin, called, indeterminate, reference_class, n, images, "
    "images_out, images_warned, p_sum, span) "
)
_ROLLUP = (
    "INSERT INTO monitor_counts (span, day, model_id, p_bin, called, indeterminate, reference_class, n, images, "
    "images_out, images_warned, p_sum) SELECT '{span}', {start}, model_id, p_bin, called, indeterminate, "
    "reference_class, sum(n), sum(images), sum(images_out), sum(images_warned), sum(p_sum) FROM monitor_counts "
    "WHERE span = 'd' GROUP BY 2, 3, 4, 5, 6, 7"
)
STARTS = {
    "postgresql": {
        "w": "day - (extract(isodow from day)::int - 1)",
        "m": "day - (extract(day from day)::int - 1)",
    },
    "sqlite": {"w": "date(day, 'weekday 0', '-6 days')", "m": "date(day, 'start of month')"},
}
FILL = {
    "postgresql": (
        _MONITOR
        + "SELECT (c.created_at AT TIME ZONE 'UTC')::date, c.model_id, LEAST(FLOOR(c.p_malignant * 100), 99)::int, "
        "COALESCE((c.result_json::json ->> 'is_malignant') = 'true', false), c.risk_level = 'indeterminate', "
        "COALESCE(c.reference_class, ''), count(*), COALESCE(sum(i.images), 0), COALESCE(sum(i.images_out), 0), "
        "COALESCE(sum(i.images_warned), 0), sum(c.p_malignant), 'd' "
        "FROM cases c LEFT JOIN (SELECT case_id, count(*) AS images, "
        "sum(CASE WHEN (result_json::json -> 'domain' ->> 'in_domain') = 'false' THEN 1 ELSE 0 END) AS images_out, "
        "sum(CASE WHEN json_typeof(result_json::json -> 'quality') = 'array' "
        "AND json_array_length(result_json::json -> 'quality') > 0 THEN 1 ELSE 0 END) AS images_warned "
        "FROM case_images GROUP BY case_id) i ON i.case_id = c.id GROUP BY 1, 2, 3, 4, 5, 6",
        "INSERT INTO audit_counts (day, action, user_id, n) SELECT (at AT TIME ZONE 'UTC')::date, action, "
        "COALESCE(user_id, 0), count(*) FROM audit_events GROUP BY 1, 2, 3",
    ),
    "sqlite": (
        _MONITOR + "SELECT date(c.created_at), c.model_id, MIN(CAST(c.p_malignant * 100 AS INTEGER), 99), "
        "COALESCE(json_extract(c.result_json, '$.is_malignant') = 1, 0), c.risk_level = 'indeterminate', "
        "COALESCE(c.reference_class, ''), count(*), COALESCE(sum(i.images), 0), COALESCE(sum(i.images_out), 0), "
        "COALESCE(sum(i.images_warned), 0), sum(c.p_malignant), 'd' "
        "FROM cases c LEFT JOIN (SELECT case_id, count(*) AS images, "
        "sum(CASE WHEN json_extract(result_json, '$.domain.in_domain') = 0 THEN 1 ELSE 0 END) AS images_out, "
        "sum(CASE WHEN json_array_length(result_json, '$.quality') > 0 THEN 1 ELSE 0 END) AS images_warned "
        "FROM case_images GROUP BY case_id) i ON i.case_id = c.id GROUP BY 1, 2, 3, 4, 5, 6",
        "INSERT INTO audit_counts (day, action, user_id, n) "
        "SELECT date(at), action, COALESCE(user_id, 0), count(*) FROM audit_events GROUP BY 1, 2, 3",
    ),
}
AUDIT_INDEXES = ("user_id", "action", "case_id")


def upgrade() -> None:
    op.create_table(
        "monitor_counts",
        sa.Column("model_id", sa.String(64), primary_key=True),  # first: a page reads one model's rows
        sa.Column("span", sa.String(1), primary_key=True),  # d, w or m: a case counts in its day, week and month
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("p_bin", sa.SmallInteger(), primary_key=True),
        sa.Column("called", sa.Boolean(), primary_key=True),
        sa.Column("indeterminate", sa.Boolean(), primary_key=True),
        sa.Column("reference_class", sa.String(64), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("images_out", sa.Integer(), nullable=False),
        sa.Column("images_warned", sa.Integer(), nullable=False),
        sa.Column("p_sum", sa.Float(), nullable=False),
    )
    op.create_table(
        "audit_counts",
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("action", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.Integer(), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    for column in AUDIT_INDEXES:
        op.drop_index(f"ix_audit_events_{column}", table_name="audit_events")
        op.create_index(f"ix_audit_events_{column}_id", "audit_events", [column, "id"])
    dialect = op.get_bind().dialect.name
    for statement in FILL[dialect]:
        op.execute(statement)
    for span, start in STARTS[dialect].items():
        op.execute(_ROLLUP.format(span=span, start=start))


def downgrade() -> None:
    for column in AUDIT_INDEXES:
        op.drop_index(f"ix_audit_events_{column}_id", table_name="audit_events")
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])
    op.drop_table("audit_counts")
    op.drop_table("monitor_counts")
