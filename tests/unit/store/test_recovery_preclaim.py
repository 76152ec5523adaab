"""The sweeper and pre-claimed leases (issue 18.11): a task whose execute message still
waits in the queue is not re-driven; on SQLite (file-system broker) and PostgreSQL (Redis)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from orchestration import api
from orchestration import constants as c
from orchestration.models import TaskStatus, tasks_table, utcnow
from orchestration.store.recovery import claim_stuck, sweep

AGENT = "payroll_agent"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def trail(request: pytest.FixtureRequest) -> api.Taskrail:
    """An API client on the embedded default, then on PostgreSQL and a Redis broker."""
    request.getfixturevalue("embedded" if request.param == "sqlite" else "server_settings")
    return api.client()


def _set(trail: api.Taskrail, task_id: int, **values: Any) -> None:
    t = tasks_table
    values.setdefault("updated_at", utcnow() - timedelta(seconds=60))
    with trail.db.begin() as conn:
        conn.execute(update(t).where(t.c.id == task_id).values(**values))


def _running(trail: api.Taskrail, task_id: int, owner: str | None, expires_in_s: float) -> None:
    _set(
        trail,
        task_id,
        status=TaskStatus.IN_PROGRESS,
        assigned_agent=AGENT,
        attempts=1,
        lease_owner=owner,
        lease_expires_at=utcnow() + timedelta(seconds=expires_in_s) if owner else None,
    )


def _purge_execute_queue(trail: api.Taskrail) -> None:
    with trail.dispatcher.app.connection_for_write() as conn:
        conn.default_channel.queue_purge(c.QUEUE_EXECUTE)


def _tasks(trail: api.Taskrail) -> tuple[int, int, int, int]:
    """In_progress tasks unchanged for a minute: a queued pre-claim, a dead handler's run
    lease, a live pre-claim and one with no lease (its retry's message was lost)."""
    ids = trail.submit_many([{"task_type": "payroll", "client_id": i} for i in range(4)])
    queued, dead, live, bare = ids
    _running(trail, queued, f"{c.PRECLAIM_TOKEN_PREFIX}w1@host/aaa", -5)
    _running(trail, dead, "r:w2@host/bbb", -5)
    _running(trail, live, f"{c.PRECLAIM_TOKEN_PREFIX}w1@host/ccc", 30)
    _running(trail, bare, None, 0)
    return queued, dead, live, bare


def test_claim_leaves_expired_preclaims_when_told_and_names_the_lease_owner(trail) -> None:
    # Given in_progress tasks, each unchanged for a minute
    queued, dead, live, bare = _tasks(trail)
    # When the sweeper claims while the execute queue holds messages
    first = claim_stuck(trail.db, redrive_after_s=15, batch=100, skip_preclaimed=True)
    # Then the queued pre-claim is left alone; the dead handler's attempt is re-driven
    # with its lease owner, so the execute hop takes over that very attempt
    assert {(r.task_id, tuple(r.args)) for r in first} == {
        (dead, (dead, 0, AGENT, "r:w2@host/bbb")),
        (bare, (bare, 1, AGENT)),
    }
    # When the execute queue is empty (the message was lost)
    second = claim_stuck(trail.db, redrive_after_s=15, batch=100, skip_preclaimed=False)
    # Then the pre-claimed task is re-driven too, with its pre-claim's owner
    assert [(r.task_id, r.hop, tuple(r.args)) for r in second] == [
        (queued, c.HOP_EXECUTE, (queued, 0, AGENT, f"{c.PRECLAIM_TOKEN_PREFIX}w1@host/aaa"))
    ]
    assert live not in {r.task_id for r in first + second}


def test_sweep_leaves_a_task_whose_execute_message_is_still_queued(trail) -> None:
    # Given a task whose pre-claim expired while its execute message waits in the queue
    queued, dead, _live, bare = _tasks(trail)
    _purge_execute_queue(trail)
    trail.dispatcher.send(
        c.HOP_EXECUTE, [queued, 0, AGENT, {"token": "stands for the pre-claim's message"}]
    )
    assert trail.dispatcher.queue_depth(c.QUEUE_EXECUTE) == 1
    # When the sweeper runs
    redriven = sweep(trail.db, trail.dispatcher, redrive_after_s=15, batch=100)
    # Then that task is not re-driven; the dead handler's and the bare one are
    assert {r.task_id for r in redriven} == {dead, bare}
    assert trail.dispatcher.queue_depth(c.QUEUE_EXECUTE) == 3
    # When the queue is empty (the message was lost) and the sweeper runs again
    _purge_execute_queue(trail)
    again = sweep(trail.db, trail.dispatcher, redrive_after_s=15, batch=100)
    # Then the task is re-driven, taking over its pre-claimed attempt
    assert [(r.task_id, r.args[-1]) for r in again] == [
        (queued, f"{c.PRECLAIM_TOKEN_PREFIX}w1@host/aaa")
    ]
