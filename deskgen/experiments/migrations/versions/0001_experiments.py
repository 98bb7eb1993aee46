"""Experiments, exposures and feedback.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("split", sa.JSON, nullable=False),
        sa.Column("salt", sa.String(200), nullable=False),
        sa.Column("mixes", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "exposures",
        sa.Column("image_id", sa.String(64), primary_key=True),
        sa.Column("experiment_id", sa.String(32), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("user_id", sa.String(200), nullable=True),
        sa.Column("arm", sa.String(100), nullable=True),
        sa.Column("mix_id", sa.String(300), nullable=False),
        sa.Column("mix_source", sa.String(16), nullable=False),
        sa.Column("style", sa.String(200), nullable=True),
        sa.Column("seed", sa.BigInteger, nullable=True),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_exposures_experiment_id", "exposures", ["experiment_id"])
    op.create_index("ix_exposures_user_id", "exposures", ["user_id"])
    op.create_table(
        "feedback",
        sa.Column("image_id", sa.String(64), sa.ForeignKey("exposures.image_id"), primary_key=True),
        sa.Column("event", sa.String(16), primary_key=True),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("user_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_index("ix_exposures_user_id", "exposures")
    op.drop_index("ix_exposures_experiment_id", "exposures")
    op.drop_table("exposures")
    op.drop_table("experiments")
