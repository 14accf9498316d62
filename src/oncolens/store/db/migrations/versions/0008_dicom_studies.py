"""The DICOM listener's studies (received, routed, analysed once) and the study a case came from.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_id", sa.String(64), nullable=True),
        sa.Column("case_id", sa.String(32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_dicom_studies_state", "dicom_studies", ["state"])
    op.add_column("cases", sa.Column("dicom_study_uid", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("cases", "dicom_study_uid")
    op.drop_index("ix_dicom_studies_state", table_name="dicom_studies")
    op.drop_table("dicom_studies")
