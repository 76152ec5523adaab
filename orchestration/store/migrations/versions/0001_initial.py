"""tasks and task_events

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from orchestration.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.BigInteger(), nullable=False),
        sa.Column("task_type", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("assigned_agent", sa.String(128)),
        sa.Column("payload", _json, nullable=False),
        sa.Column("result", _json),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text()),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime()),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_expires_at", UTCDateTime()),
        sa.Column("not_before", UTCDateTime()),
        sa.Column("deferred_since", UTCDateTime()),
        sa.Column("redriven_at", UTCDateTime()),
        sa.UniqueConstraint("idempotency_key", name="uq_tasks_idempotency_key"),
        sa.CheckConstraint(
            "status IN ('pending','assigned','in_progress','completed','failed','escalated')",
            name="ck_tasks_status",
        ),
    )
    op.create_index("ix_tasks_status_updated_at", "tasks", ["status", "updated_at"])
    op.create_index("ix_tasks_client_id", "tasks", ["client_id"])
    op.create_table(
        "task_events",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column(
            "task_id",
            sa.BigInteger(),
            sa.ForeignKey("tasks.id", ondelete="CASCADE", name="fk_task_events_task_id"),
            nullable=False,
        ),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=False),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("agent", sa.String(128)),
        sa.Column("detail", sa.Text()),
        sa.Column("worker", sa.String(255)),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_task_events_task_id", "task_events", ["task_id"])


def downgrade() -> None:
    op.drop_index("ix_task_events_task_id", table_name="task_events")
    op.drop_table("task_events")
    op.drop_index("ix_tasks_client_id", table_name="tasks")
    op.drop_index("ix_tasks_status_updated_at", table_name="tasks")
    op.drop_table("tasks")
