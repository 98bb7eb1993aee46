"""The concept preset of each exposure (so the report can be broken down by concept).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("exposures", sa.Column("concept", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("exposures", "concept")
