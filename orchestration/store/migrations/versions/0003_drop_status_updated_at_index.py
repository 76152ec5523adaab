"""drop the (status, updated_at) index: the partial index of active tasks serves the sweeper

Every transition changes both columns, so this index took a new entry on every hop,
and its pages are where concurrent workers' writes meet: measured on the benchmark
machine it doubled PostgreSQL's CPU per hop. The sweeper and the stuck-task summary
read active tasks by age, which ``ix_tasks_active_updated_at`` (0002) answers; counts
by status read the table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_tasks_status_updated_at", table_name="tasks")


def downgrade() -> None:
    op.create_index("ix_tasks_status_updated_at", "tasks", ["status", "updated_at"])
