"""The learning loop: a reference standard on every review, installed model versions, shadow results.

- ``cases.reference_class`` / ``reference_standard`` / ``reference_date``: the diagnosis a review
  records as the reference (one of the model's class ids), how it was established and when. Existing
  reviewed cases whose free-text ``confirmed_diagnosis`` is exactly one of their model's class ids or
  class names (as the built-in cards name them) get it as their reference class, with no standard
  (it was not recorded) and the review's date.
- ``cases.shadow_version`` / ``shadow_result_json``: a shadow version's answer, never shown to clinicians.
- ``package_blobs``, ``model_versions``: model packages installed into the database, which every
  replica reads; ``model_deployments``: which version serves and which runs in shadow, step by step.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import json
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The built-in packages (oncolens/zoo/<id>/card.json), read as plain JSON: a migration never imports the app.
ZOO = Path(__file__).resolve().parents[4] / "zoo"


def _class_names() -> dict[str, dict[str, str]]:
    """model id -> {lower-case class id or name: class id}."""
    names: dict[str, dict[str, str]] = {}
    for card_file in sorted(ZOO.glob("*/card.json")):
        try:
            card = json.loads(card_file.read_text(encoding="utf-8"))
            names[str(card["id"])] = {
                str(text).strip().lower(): str(c["id"]) for c in card["classes"] for text in (c["id"], c["name"])
            }
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return names


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("reference_class", sa.String(64), nullable=True))
        batch.add_column(sa.Column("reference_standard", sa.String(32), nullable=True))
        batch.add_column(sa.Column("reference_date", sa.Date(), nullable=True))
        batch.add_column(sa.Column("shadow_version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("shadow_result_json", sa.Text(), nullable=True))
    op.create_index("ix_cases_model_created", "cases", ["model_id", "created_at"])
    op.create_table(
        "package_blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("card_json", sa.Text(), nullable=False),
        sa.Column("files_json", sa.Text(), nullable=False),
        sa.Column("gate_passed", sa.Boolean(), nullable=True),
        sa.Column("installed_by", sa.String(255), nullable=False, server_default=""),
        sa.Column("installed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_model_versions_model_id", "model_versions", ["model_id"])
    op.create_index("ux_model_versions_model_version", "model_versions", ["model_id", "version"], unique=True)
    op.create_table(
        "model_deployments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("live_version", sa.String(64), nullable=False),
        sa.Column("shadow_version", sa.String(64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("by", sa.String(255), nullable=False, server_default=""),
        sa.Column("why", sa.Text(), nullable=False, server_default=""),
    )
    op.create_index("ix_model_deployments_model_id", "model_deployments", ["model_id"])
    _backfill_reference_classes()


def _backfill_reference_classes() -> None:
    connection = op.get_bind()
    cases = sa.table(
        "cases",
        sa.column("id", sa.String),
        sa.column("model_id", sa.String),
        sa.column("status", sa.String),
        sa.column("confirmed_diagnosis", sa.String),
        sa.column("reviewed_at", sa.DateTime(timezone=True)),
        sa.column("reference_class", sa.String),
        sa.column("reference_date", sa.Date),
    )
    names = _class_names()
    rows = connection.execute(
        sa.select(cases.c.id, cases.c.model_id, cases.c.confirmed_diagnosis, cases.c.reviewed_at).where(
            cases.c.status != "pending_review", cases.c.confirmed_diagnosis != ""
        )
    ).all()
    for case_id, model_id, diagnosis, reviewed_at in rows:
        found = names.get(model_id, {}).get(str(diagnosis).strip().lower())
        if found is not None:
            connection.execute(
                sa.update(cases)
                .where(cases.c.id == case_id)
                .values(reference_class=found, reference_date=reviewed_at.date() if reviewed_at else None)
            )


def downgrade() -> None:
    op.drop_index("ix_model_deployments_model_id", table_name="model_deployments")
    op.drop_table("model_deployments")
    op.drop_index("ux_model_versions_model_version", table_name="model_versions")
    op.drop_index("ix_model_versions_model_id", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("package_blobs")
    op.drop_index("ix_cases_model_created", table_name="cases")
    with op.batch_alter_table("cases") as batch:
        for column in (
            "shadow_result_json",
            "shadow_version",
            "reference_date",
            "reference_standard",
            "reference_class",
        ):
            batch.drop_column(column)
