"""The lease keeper on the embedded SQLite database: renews what is due, and only that.

A fake clock drives the keeper; its wake-ups are passes of :meth:`LeaseKeeper.wake_once`
whose wait advances that clock (no thread, no sleep).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update

from orchestration import api
from orchestration.models import TaskStatus, tasks_table
from orchestration.store.keeper import LeaseKeeper
from tests.fake_clock import FakeClock


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
    clock = FakeClock()
    keeper = LeaseKeeper(trail.db, ttl_s=3.0, clock=clock, background=False)
    now = clock.now
    late = _leased(trail, "late", now + 3.0)
    soon = _leased(trail, "soon", now + 1.5)
    with keeper.hold(late, "late", now + 3.0):
        assert keeper.next_wait_s() == 2.0  # the keeper sleeps until the first lease is due
        # When a second lease, due before that, is held (a pre-claim that waited in a queue)
        with keeper.hold(soon, "soon", now + 1.5):
            assert keeper.wake_requested  # the keeper wakes up and recomputes
            renewed = keeper.wake_once(clock.wait)
            # Then it is renewed to a full TTL before it lapses; the other is not due yet
            assert clock.waits == [0.5] and renewed == 1
            assert _expires(trail, soon) > now + 3.0
            assert abs(_expires(trail, late) - (now + 3.0)) < 0.001
            # And the next pass renews the other one when a third of its TTL is left
            assert keeper.wake_once(clock.wait) == 1
            assert clock.waits == [0.5, 1.5]
            assert _expires(trail, late) == clock.now + 3.0
    # And after both are released nothing renews them any more
    renewed_at = _expires(trail, soon)
    assert keeper.renew_due(everything=True) == 0
    assert _expires(trail, soon) == renewed_at


def test_a_lease_due_after_the_others_does_not_wake_the_keeper(embedded) -> None:
    trail = api.client()
    clock = FakeClock()
    keeper = LeaseKeeper(trail.db, ttl_s=30.0, clock=clock, background=False)
    now = clock.now
    first = _leased(trail, "first", now + 30.0)
    with keeper.hold(first, "first", now + 30.0):
        assert keeper.next_wait_s() == 20.0
        clock.advance(0.1)
        second = _leased(trail, "second", now + 31.0)
        with keeper.hold(second, "second", now + 31.0):
            assert not keeper.wake_requested
