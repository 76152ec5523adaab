"""The lease keeper's two statements on both back-ends, with many runs held: the renewal
extends exactly the held leases, and the cancel check finds exactly the runs whose task
was cancelled or taken over (on PostgreSQL both take their ids and tokens as arrays)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from orchestration.models import TaskStatus, tasks_table, utcnow
from orchestration.store.db import Database
from orchestration.store.keeper import LeaseKeeper

RUNS = 600  # held at once: the async executor holds thousands


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_db")
        return
    db = Database(f"sqlite:///{tmp_path / 'taskrail.db'}")
    db.upgrade()
    yield db
    db.dispose()


def _in_progress(db: Database, tokens: list[str], expires: datetime) -> list[int]:
    with db.begin() as conn:
        conn.execute(
            insert(tasks_table),
            [
                {
                    "client_id": n + 1,
                    "task_type": "payroll",
                    "payload": {},
                    "attempts": 1,
                    "status": TaskStatus.IN_PROGRESS,
                    "lease_owner": token,
                    "lease_expires_at": expires,
                    "created_at": utcnow(),
                    "updated_at": utcnow(),
                }
                for n, token in enumerate(tokens)
            ],
        )
        rows = conn.execute(select(tasks_table.c.id, tasks_table.c.lease_owner)).all()
    by_token = {owner: task_id for task_id, owner in rows}
    return [by_token[token] for token in tokens]


def test_many_held_leases_are_renewed_and_checked_in_one_statement_each(any_db: Database) -> None:
    # Given RUNS in-progress tasks leased to runs this keeper holds, and one it does not
    old = utcnow() + timedelta(seconds=2)
    tokens = [f"r:host:1/{n:012x}" for n in range(RUNS)]
    ids = _in_progress(any_db, [*tokens, "r:elsewhere:2/000000000000"], old)
    other = ids.pop()
    keeper = LeaseKeeper(any_db, ttl_s=30.0, background=False)
    stops = {token: threading.Event() for token in tokens}
    with contextlib.ExitStack() as held:
        for task_id, token in zip(ids, tokens, strict=True):
            held.enter_context(keeper.hold(task_id, token, stop=stops[token]))
        # When the keeper renews every held lease
        assert keeper.renew_all() == RUNS
        # Then exactly those were extended to a full TTL
        with any_db.connect() as conn:
            rows = dict(
                conn.execute(select(tasks_table.c.id, tasks_table.c.lease_expires_at)).all()
            )
        aware = {k: v.replace(tzinfo=v.tzinfo or UTC) for k, v in rows.items()}
        assert all(aware[i] > old + timedelta(seconds=20) for i in ids)
        assert aware[other] < old + timedelta(seconds=1)
        # When one task is cancelled and another taken over by another worker
        with any_db.begin() as conn:
            conn.execute(
                update(tasks_table)
                .where(tasks_table.c.id == ids[7])
                .values(status=TaskStatus.CANCELLED, lease_owner=None, lease_expires_at=None)
            )
            conn.execute(
                update(tasks_table)
                .where(tasks_table.c.id == ids[400])
                .values(lease_owner="r:thief:3/ffffffffffff")
            )
        stopped = keeper.check_cancelled(everything=True)
        # Then exactly those two runs are stopped, each for its reason, and no longer renewed
        assert {(s.task_id, s.cancelled) for s in stopped} == {(ids[7], True), (ids[400], False)}
        assert [t for t, e in stops.items() if e.is_set()] == [tokens[7], tokens[400]]
        assert keeper.renew_all() == RUNS - 2
        # and a second check finds nothing more
        assert keeper.check_cancelled(everything=True) == []
