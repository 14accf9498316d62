"""Accounts by e-mail and a second factor: verified addresses, approval of self-sign-ups, TOTP,
single-use e-mail tokens, recovery codes and the e-mail request throttle.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _when(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(_when("email_verified_at", nullable=True))
        batch.add_column(sa.Column("approved", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("totp_secret", sa.String(255), nullable=True))
        batch.add_column(_when("totp_enabled_at", nullable=True))
        batch.add_column(sa.Column("totp_last_step", sa.BigInteger(), nullable=True))
    op.create_table(
        "account_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        _when("created_at"),
        _when("expires_at"),
        _when("used_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_account_tokens_user_id", "account_tokens", ["user_id"])
    op.create_table(
        "recovery_codes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        _when("used_at", nullable=True),
    )
    op.create_index("ix_recovery_codes_user_id", "recovery_codes", ["user_id"])
    op.create_table(
        "request_throttle",
        sa.Column("key", sa.String(300), primary_key=True),
        _when("window_start"),
        sa.Column("count", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("request_throttle")
    op.drop_table("recovery_codes")
    op.drop_table("account_tokens")
    with op.batch_alter_table("users") as batch:
        for column in ("totp_last_step", "totp_enabled_at", "totp_secret", "approved", "email_verified_at"):
            batch.drop_column(column)
