"""Experiments that decide and act: each experiment's decision policy, the weights a bandit allocation
computed per cadence epoch (their history), each user's first assignment with the weights it was drawn
with (stickiness and the sample-ratio test under changing weights), and the API key that generated each
exposure (who may send feedback for it).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("experiments", sa.Column("policy", sa.JSON, nullable=True))
    op.add_column("exposures", sa.Column("api_key", sa.String(100), nullable=True))
    op.create_table(
        "allocations",
        sa.Column("experiment_id", sa.String(32), sa.ForeignKey("experiments.id"), primary_key=True),
        sa.Column("epoch", sa.BigInteger, primary_key=True),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("weights", sa.JSON, nullable=False),
        sa.Column("p_best", sa.JSON, nullable=False),
        sa.Column("users", sa.JSON, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "assignments",
        sa.Column("experiment_id", sa.String(32), sa.ForeignKey("experiments.id"), primary_key=True),
        sa.Column("user_id", sa.String(200), primary_key=True),
        sa.Column("arm", sa.String(100), nullable=False),
        sa.Column("weights", sa.JSON, nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("assignments")
    op.drop_table("allocations")
    op.drop_column("exposures", "api_key")
    op.drop_column("experiments", "policy")
