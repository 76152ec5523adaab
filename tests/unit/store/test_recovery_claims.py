"""Sweeper claims on the embedded SQLite database (the Postgres path runs in integration)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from orchestration import api
from orchestration.models import TaskStatus, tasks_table, utcnow
from orchestration.ops.status import categories
from orchestration.store.recovery import claim_stuck


def _age(trail: api.Taskrail, ids: list[int], seconds: float, **values: object) -> None:
    t = tasks_table
    with trail.db.begin() as conn:
        conn.execute(
            update(t)
            .where(t.c.id.in_(ids))
            .values(updated_at=utcnow() - timedelta(seconds=seconds), **values)
        )


def test_claims_each_stuck_task_once_with_the_hop_that_drives_it(embedded) -> None:
    # Given one old task in each active state, one fresh, one leased and one resting
    trail = api.client()
    ids = trail.submit_many([{"task_type": "payroll", "client_id": i} for i in range(6)])
    pending, assigned, running, fresh, leased, done = ids
    _age(trail, [pending], 60)
    _age(trail, [assigned], 60, status=TaskStatus.ASSIGNED, assigned_agent="payroll_agent")
    _age(
        trail,
        [running],
        60,
        status=TaskStatus.IN_PROGRESS,
        assigned_agent="payroll_agent",
        attempts=1,
        lease_owner="dead",
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    _age(
        trail,
        [leased],
        60,
        status=TaskStatus.IN_PROGRESS,
        assigned_agent="payroll_agent",
        attempts=1,
        lease_owner="alive",
        lease_expires_at=utcnow() + timedelta(seconds=30),
    )
    _age(trail, [done], 60, status=TaskStatus.COMPLETED)
    assert categories(trail.db, redrive_after_s=15).stuck.count == 3  # not the leased one
    # When the sweeper claims
    first = claim_stuck(trail.db, redrive_after_s=15, batch=100)
    # Then each stuck task comes with its hop and arguments, the rest are left alone
    assert {(r.task_id, r.hop, tuple(r.args)) for r in first} == {
        (pending, "taskrail.assign", (pending, "payroll")),
        (assigned, "taskrail.start", (assigned,)),
        (running, "taskrail.execute", (running, 0, "payroll_agent", "dead")),
    }
    assert fresh not in {r.task_id for r in first}
    # and a second pass right after claims nothing: a task is re-driven once per delay
    assert claim_stuck(trail.db, redrive_after_s=15, batch=100) == []


def test_batch_limits_a_pass(embedded) -> None:
    trail = api.client()
    ids = trail.submit_many([{"task_type": "payroll", "client_id": i} for i in range(30)])
    _age(trail, ids, 60)
    assert len(claim_stuck(trail.db, redrive_after_s=15, batch=10)) == 10
    assert len(claim_stuck(trail.db, redrive_after_s=15, batch=100)) == 20
