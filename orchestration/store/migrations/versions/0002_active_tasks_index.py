"""partial index of active tasks for the sweeper

The sweeper looks for active (pending, assigned, in_progress) tasks by age. Resting
tasks outnumber them by far in a long-lived deployment, so an index over the active
ones only stays small and answers in a few pages, whatever the table's size.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('pending', 'assigned', 'in_progress')")


def upgrade() -> None:
    op.create_index(
        "ix_tasks_active_updated_at",
        "tasks",
        ["updated_at"],
        postgresql_where=ACTIVE,
        sqlite_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_active_updated_at", table_name="tasks")
