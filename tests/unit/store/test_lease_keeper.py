"""The lease keeper on the embedded SQLite database: renews what is due, and only that;
stops a watched run once its task is cancelled (or its lease lost).

A fake clock drives the keeper; its wake-ups are passes of :meth:`LeaseKeeper.wake_once`
whose wait advances that clock (no thread, no sleep).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, select, update
from structlog.testing import capture_logs

from orchestration import api
from orchestration.errors import DatabaseUnavailable
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


# -- telling a running handler that its task was cancelled (issue 21) -------------------------


class _Statements:
    """Counts the statements sent to a database's engine, by their first word."""

    def __init__(self, trail: api.Taskrail) -> None:
        self.sql: list[str] = []
        event.listen(trail.db.engine, "before_cursor_execute", self._heard)

    def _heard(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sql.append(statement.split(None, 1)[0].upper())

    def selects(self) -> int:
        return self.sql.count("SELECT")


def _keeper(trail: api.Taskrail, clock: FakeClock, ttl_s: float = 30.0) -> LeaseKeeper:
    return LeaseKeeper(trail.db, ttl_s=ttl_s, cancel_poll_s=1.0, clock=clock, background=False)


def test_a_watched_run_is_stopped_at_the_first_check_after_its_task_is_cancelled(
    embedded,
) -> None:
    # Given a keeper (checks every 1 s, TTL 30 s) holding a watched run's lease and a
    # run of another task
    trail = api.client()
    clock = FakeClock()
    keeper = _keeper(trail, clock)
    now = clock.now
    running = _leased(trail, "r:running", now + 30.0)
    other = _leased(trail, "r:other", now + 30.0)
    stop, other_stop = threading.Event(), threading.Event()
    statements = _Statements(trail)
    with (
        keeper.hold(running, "r:running", now + 30.0, stop=stop),
        keeper.hold(other, "r:other", now + 30.0, stop=other_stop),
    ):
        # Then the keeper wakes for a check a poll period after the hold began, not for
        # the renewal 20 s away
        assert keeper.next_wait_s() == 1.0
        assert keeper.wake_once(clock.wait) == 0
        assert not stop.is_set() and statements.selects() == 1
        # When the task is cancelled while its handler runs
        trail.cancel(running, reason="client withdrew", by="ops")
        statements.sql.clear()
        with capture_logs() as log:
            keeper.wake_once(clock.wait)
        # Then the next check (one statement, a poll period later) stops that run only
        assert clock.waits == [1.0, 1.0]
        assert statements.sql == ["SELECT"]
        assert stop.is_set() and not other_stop.is_set()
        assert [e["event"] for e in log] == ["run_cancelled"] and log[0]["task_id"] == running
        # and its lease is no longer renewed; the other one is, when it is due
        clock.advance(20.0)
        assert keeper.renew_due() == 1
        assert _expires(trail, other) == clock.now + 30.0
    # And once nothing watched is held the keeper sleeps until a renewal would be due
    assert keeper.next_wait_s() == 30.0


def test_a_run_whose_lease_went_to_another_worker_is_stopped(embedded) -> None:
    trail = api.client()
    clock = FakeClock()
    keeper = _keeper(trail, clock)
    task_id = _leased(trail, "r:mine", clock.now + 30.0)
    stop = threading.Event()
    with keeper.hold(task_id, "r:mine", clock.now + 30.0, stop=stop):
        # When another worker takes the run over (this one stalled past its lease)
        with trail.db.begin() as conn:
            conn.execute(
                update(tasks_table)
                .where(tasks_table.c.id == task_id)
                .values(lease_owner="r:theirs")
            )
        with capture_logs() as log:
            keeper.wake_once(clock.wait)
        # Then this run is told to stop: what it returns would be discarded
        assert stop.is_set()
        [lost] = [e for e in log if e["event"] == "lease_lost"]
        assert (lost["task_id"], lost["status"], lost["leased_by"]) == (
            task_id,
            "in_progress",
            "r:theirs",
        )


def test_runs_shorter_than_the_poll_period_cost_no_check(embedded) -> None:
    # Given a keeper, and handlers that each end within a poll period of their start
    trail = api.client()
    clock = FakeClock()
    keeper = _keeper(trail, clock)
    ids = [_leased(trail, f"r:short{i}", clock.now + 30.0) for i in range(5)]
    statements = _Statements(trail)
    for i, task_id in enumerate(ids):
        with keeper.hold(task_id, f"r:short{i}", stop=threading.Event()):
            clock.advance(0.5)
            assert keeper.check_cancelled() == []
        clock.advance(0.6)
    # Then no statement was sent for them
    assert statements.sql == []
    # and a lease held without a stop event (an outcome's write) is never checked
    with keeper.hold(ids[0], "r:short0"):
        clock.advance(10.0)
        assert keeper.check_cancelled() == []
        assert keeper.next_wait_s() == 10.0  # its renewal, not a check
    assert statements.sql == []


def test_a_failed_check_is_logged_and_made_again_a_poll_period_later(embedded) -> None:
    trail = api.client()
    clock = FakeClock()
    keeper = _keeper(trail, clock)
    task_id = _leased(trail, "r:mine", clock.now + 30.0)
    stop = threading.Event()
    with keeper.hold(task_id, "r:mine", clock.now + 30.0, stop=stop):
        # Given a database that refuses the first check
        real_connect = keeper.db.connect
        failures = iter([DatabaseUnavailable("sqlite file x", "down")])

        def flaky_connect(**kwargs: Any) -> Any:
            failure = next(failures, None)
            if failure is not None:
                raise failure
            return real_connect(**kwargs)

        keeper.db.connect = flaky_connect  # type: ignore[method-assign]
        with capture_logs() as log:
            assert keeper.wake_once(clock.wait) == 0  # the renewals go on
        assert [e["event"] for e in log] == ["cancel_check_failed"]
        trail.cancel(task_id, by="ops")
        # When the next period comes the check is made again and stops the run
        keeper.wake_once(clock.wait)
        assert stop.is_set()
        assert clock.waits == [1.0, 1.0]
