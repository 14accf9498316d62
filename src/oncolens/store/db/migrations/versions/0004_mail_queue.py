"""The e-mail queue (mail leaves the request that asked for it) and pending sign-up credentials.

- ``mail_queue``: letters written in the transaction of the request that asked for them and sent by
  the server's own drainer (claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so an answer's
  timing never depends on the mail work, and several workers or replicas never send one twice.
- ``account_tokens.payload``: what a sign-up code will set when it is used (the password hash and
  name chosen with it), so a second sign-up for a pending address cannot replace the first one's
  password.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mail_queue",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("recipient", sa.String(255), nullable=False),
        sa.Column("letter", sa.Text(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False, server_default=""),
    )
    op.create_index("ix_mail_queue_next_attempt_at", "mail_queue", ["next_attempt_at"])
    with op.batch_alter_table("account_tokens") as batch:
        batch.add_column(sa.Column("payload", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("account_tokens") as batch:
        batch.drop_column("payload")
    op.drop_index("ix_mail_queue_next_attempt_at", table_name="mail_queue")
    op.drop_table("mail_queue")
