"""sweeper_runs: the sweeper's last pass (when, how many re-driven, how long)

One row per sweeper, rewritten by every pass, so ``taskrail status`` and the metrics
endpoint can tell whether the sweeper runs at all with one primary-key read.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

from orchestration.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeper_runs",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("last_run_at", UTCDateTime(), nullable=False),
        sa.Column("redriven", sa.Integer(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sweeper_runs")
