"""Every migration keeps the audit trail: on SQLite a batch rebuild of ``tasks`` with
foreign keys on would delete every task's events (ON DELETE CASCADE)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text

from orchestration.store import migrate
from orchestration.store.db import Database

REVISIONS = ["0001", "0002", "0003", "0004", "0005", "0006"]


def _events(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [
            (int(r[0]), str(r[1]))
            for r in conn.execute(text("SELECT task_id, event FROM task_events ORDER BY id"))
        ]


def _seed(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (id, client_id, task_type, status, payload, attempts, "
                "created_at, updated_at) VALUES (1, 42, 'payroll', 'assigned', '{}', 0, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO task_events (task_id, event, from_status, to_status, worker, at) "
                "VALUES (1, 'assign', 'pending', 'assigned', 'w1', CURRENT_TIMESTAMP)"
            )
        )


@pytest.mark.parametrize("start", REVISIONS[:-1])
def test_upgrading_from_each_revision_keeps_every_event(tmp_path: Path, start: str) -> None:
    # Given an embedded database (foreign keys on, as taskrail connects) at `start`,
    # with a task and its event
    db = Database(f"sqlite:///{tmp_path / 'old.db'}", auto_upgrade=False)
    try:
        migrate.upgrade(db.engine, start)
        _seed(db.engine)

        # When it is upgraded to the head, then downgraded back and upgraded again
        migrate.upgrade(db.engine)
        after_upgrade = _events(db.engine)
        command.downgrade(migrate.alembic_config(db.engine), start)
        after_downgrade = _events(db.engine)
        migrate.upgrade(db.engine)

        # Then the event is there at every step
        assert after_upgrade == [(1, "assign")]
        assert after_downgrade == [(1, "assign")]
        assert _events(db.engine) == [(1, "assign")]
    finally:
        db.dispose()
