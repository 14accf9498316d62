"""Case counts kept, not recomputed, and the case list's keyset index.

- ``case_counts`` (day, model, risk level, status -> n): filled from the existing cases here and kept up
  to date in the transaction of every case write.
- ``ix_cases_created_id`` on (created_at, id): a cursor page of the case list as cheap deep down as on top.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The case list's keyset: (created_at, id) in one index, for a cursor page as cheap deep down as on top.
    op.create_index("ix_cases_created_id", "cases", ["created_at", "id"])
    op.create_table(
        "case_counts",
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("model_id", sa.String(64), primary_key=True),
        sa.Column("risk_level", sa.String(16), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    day = "(created_at AT TIME ZONE 'UTC')::date" if op.get_bind().dialect.name == "postgresql" else "date(created_at)"
    op.execute(
        "INSERT INTO case_counts (day, model_id, risk_level, status, n) "
        f"SELECT {day}, model_id, risk_level, status, count(*) FROM cases GROUP BY 1, 2, 3, 4"
    )


def downgrade() -> None:
    op.drop_table("case_counts")
    op.drop_index("ix_cases_created_id", table_name="cases")
