"""The people's side: the cancelled state, claims, who made each move, list indexes

- ``cancelled`` is a status (the check constraint admits it);
- ``tasks.claimed_by`` / ``claimed_at``: the person handling an escalation;
- ``task_events.actor`` / ``note``: who made the move (a worker or a person) and what
  they said; existing events get their worker as actor;
- indexes for ``taskrail list`` and the console: newest first (by id) within a status,
  task type, status and type, client, agent or claimer, and by creation time for
  ``--since``; the escalations inbox (partial: escalated tasks, unclaimed or claimed).
  The single-column client index becomes (client_id, id).

On SQLite, changing the check constraint rebuilds ``tasks`` (copy, drop, rename); with
foreign keys on (as taskrail connects) dropping the old table would delete every
task's events (ON DELETE CASCADE), and the pragma cannot be turned off inside the
migration's transaction: the events are kept aside and put back
(:func:`orchestration.store.migrate.events_kept`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from orchestration.models import UTCDateTime
from orchestration.store.migrate import events_kept

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_OLD = "status IN ('pending','assigned','in_progress','completed','failed','escalated')"
_NEW = "status IN ('pending','assigned','in_progress','completed','failed','escalated','cancelled')"


_INBOX_INDEXES = {
    "ix_tasks_escalated_unclaimed": "IS NULL",
    "ix_tasks_escalated_claimed": "IS NOT NULL",
}


def upgrade() -> None:
    with events_kept("0006"), op.batch_alter_table("tasks") as batch:
        batch.drop_constraint("ck_tasks_status", type_="check")
        batch.create_check_constraint("ck_tasks_status", _NEW)
        batch.add_column(sa.Column("claimed_by", sa.String(255)))
        batch.add_column(sa.Column("claimed_at", UTCDateTime()))
    with op.batch_alter_table("task_events") as batch:
        batch.add_column(sa.Column("actor", sa.String(255)))
        batch.add_column(sa.Column("note", sa.Text()))
    op.execute("UPDATE task_events SET actor = worker WHERE actor IS NULL")
    op.drop_index("ix_tasks_client_id", table_name="tasks")
    op.create_index("ix_tasks_client_id_id", "tasks", ["client_id", "id"])
    op.create_index("ix_tasks_status_id", "tasks", ["status", "id"])
    op.create_index("ix_tasks_type_id", "tasks", ["task_type", "id"])
    op.create_index("ix_tasks_agent_id", "tasks", ["assigned_agent", "id"])
    op.create_index("ix_tasks_created_at", "tasks", ["created_at"])
    op.create_index(
        "ix_tasks_claimed_by_id",
        "tasks",
        ["claimed_by", "id"],
        postgresql_where=sa.text("claimed_by IS NOT NULL"),
        sqlite_where=sa.text("claimed_by IS NOT NULL"),
    )
    # A status and a type whose tasks all lie far back (an old incident's failures):
    # without it the planner walks the primary key through every newer task.
    op.create_index("ix_tasks_status_type_id", "tasks", ["status", "task_type", "id"])
    # The escalations inbox: unclaimed, then claimed, each by id; only escalated tasks
    # are in them, so the hops' writes never touch them.
    for name, claim in _INBOX_INDEXES.items():
        op.create_index(
            name,
            "tasks",
            ["id"],
            postgresql_where=sa.text(f"status = 'escalated' AND claimed_by {claim}"),
            sqlite_where=sa.text(f"status = 'escalated' AND claimed_by {claim}"),
        )


def downgrade() -> None:
    for name in (
        *_INBOX_INDEXES,
        "ix_tasks_status_type_id",
        "ix_tasks_claimed_by_id",
        "ix_tasks_created_at",
        "ix_tasks_agent_id",
        "ix_tasks_type_id",
        "ix_tasks_status_id",
        "ix_tasks_client_id_id",
    ):
        op.drop_index(name, table_name="tasks")
    op.create_index("ix_tasks_client_id", "tasks", ["client_id"])
    op.execute("DELETE FROM task_events WHERE from_status = 'cancelled' OR to_status = 'cancelled'")
    op.execute("DELETE FROM tasks WHERE status = 'cancelled'")
    with op.batch_alter_table("task_events") as batch:
        batch.drop_column("note")
        batch.drop_column("actor")
    with events_kept("0006"), op.batch_alter_table("tasks") as batch:
        batch.drop_column("claimed_at")
        batch.drop_column("claimed_by")
        batch.drop_constraint("ck_tasks_status", type_="check")
        batch.create_check_constraint("ck_tasks_status", _OLD)
