"""tasks.isolated: run the task's handler in a process of its own

Set when a worker died while the task's handler ran (a takeover of its expired lease)
or the handler's own process died; every later attempt of the task runs isolated, so
a handler that kills its process cannot take its bystanders down with it again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from orchestration.store.migrate import events_kept

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with events_kept("0004"), op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("isolated", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with events_kept("0004"), op.batch_alter_table("tasks") as batch:
        batch.drop_column("isolated")
