"""The lease keeper on the embedded SQLite database: renews what is due, and only that."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import select, update

from orchestration import api
from orchestration.models import TaskStatus, tasks_table
from orchestration.store.leases import LeaseKeeper


def _leased(trail: api.Taskrail, token: str, expires: float) -> int:
    (task_id,) = trail.submit_many([{"task_type": "payroll", "client_id": 1}])
    with trail.db.begin() as conn:
        conn.execute(
            update(tasks_table)
            .where(tasks_table.c.id == task_id)
            .values(
                status=TaskStatus.IN_PROGRESS,
                lease_owner=token,
                lease_expires_at=datetime.fromtimestamp(expires, UTC),
            )
        )
    return task_id


def _expires(trail: api.Taskrail, task_id: int) -> float:
    with trail.db.connect() as conn:
        value = conn.execute(
            select(tasks_table.c.lease_expires_at).where(tasks_table.c.id == task_id)
        ).scalar_one()
    return value.replace(tzinfo=value.tzinfo or UTC).timestamp()


def test_a_lease_due_before_the_others_is_renewed_in_time(embedded) -> None:
    # Given a keeper (TTL 3 s: renewal when 1 s is left) holding a lease with its full TTL
    trail = api.client()
    keeper = LeaseKeeper(trail.db, ttl_s=3.0)
    now = time.time()
    late = _leased(trail, "late", now + 3.0)
    soon = _leased(trail, "soon", now + 1.5)
    with keeper.hold(late, "late", now + 3.0):
        time.sleep(0.1)  # the keeper sleeps until the first lease is due (~2 s from now)
        # When a second lease, due before that, is held (a pre-claim that waited in a queue)
        with keeper.hold(soon, "soon", now + 1.5):
            time.sleep(1.0)
            # Then it is renewed to a full TTL before it lapses; the other is not due yet
            assert _expires(trail, soon) > now + 3.0
            assert abs(_expires(trail, late) - (now + 3.0)) < 0.001
    # And after both are released nothing renews them any more
    renewed = _expires(trail, soon)
    assert keeper.renew_due(everything=True) == 0
    assert _expires(trail, soon) == renewed


def test_a_lease_due_after_the_others_does_not_wake_the_keeper(embedded) -> None:
    trail = api.client()
    keeper = LeaseKeeper(trail.db, ttl_s=30.0)
    now = time.time()
    first = _leased(trail, "first", now + 30.0)
    with keeper.hold(first, "first", now + 30.0):
        time.sleep(0.1)
        keeper._wake.clear()
        second = _leased(trail, "second", now + 31.0)
        with keeper.hold(second, "second", now + 31.0):
            assert not keeper._wake.is_set()
