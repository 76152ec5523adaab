"""Recovery: find the tasks nothing drives any more and claim them for a re-drive.

Each non-final state has exactly one hop that drives it forward::

    pending -> taskrail.assign    assigned -> taskrail.start    in_progress -> taskrail.execute

A task needs re-driving when its message was lost (a Redis restart, a worker killed
with prefetched messages, a crash between a hop's commit and its send) or the worker
running its handler died (its lease expired). :func:`claim_stuck` picks such tasks in
one atomic statement that stamps ``redriven_at``, so two sweepers never take the same
task and a task is re-driven at most once per ``redrive_after_s``. Re-driving a task
that is merely slow is harmless: hops are idempotent.

A task is stuck when all hold:

- it is pending, assigned or in_progress, and unchanged for ``redrive_after_s``;
- no sweep re-drove it within ``redrive_after_s``;
- no live lease: nobody is running its handler (or the lease expired);
- no pending retry or deferral: ``not_before`` passed ``redrive_after_s`` ago.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Executable, bindparam, func, select, text

from orchestration import constants as c
from orchestration.agents import registry
from orchestration.db import Database
from orchestration.dispatch import Dispatcher
from orchestration.logging import get_logger
from orchestration.models import ACTIVE_STATUSES, TaskStatus, tasks_table, utcnow

log = get_logger("taskrail.recovery")

HOP_FOR_STATUS = {
    TaskStatus.PENDING: c.HOP_ASSIGN,
    TaskStatus.ASSIGNED: c.HOP_START,
    TaskStatus.IN_PROGRESS: c.HOP_EXECUTE,
}

_STUCK = (
    "status IN ({statuses}) "
    "AND updated_at < :cutoff "
    "AND (redriven_at IS NULL OR redriven_at < :cutoff) "
    "AND (lease_expires_at IS NULL OR lease_expires_at < :now) "
    "AND (not_before IS NULL OR not_before < :cutoff)"
)


@dataclass(frozen=True, slots=True)
class Redrive:
    """A claimed stuck task and the hop message that drives it on."""

    task_id: int
    status: TaskStatus
    hop: str
    args: list[Any]
    agent: str | None


@functools.lru_cache(maxsize=8)
def _claim_sql(skip_locked: bool, statuses: tuple[TaskStatus, ...]) -> Executable:
    t = tasks_table.c
    stuck = _STUCK.format(statuses=", ".join(f"'{s.value}'" for s in statuses))
    pick = f"SELECT id FROM tasks WHERE {stuck} ORDER BY updated_at LIMIT :batch"
    returning = (
        "RETURNING tasks.id, tasks.status, tasks.task_type, tasks.attempts, tasks.assigned_agent"
    )
    if skip_locked:
        # PostgreSQL: lock the picked rows in a CTE, so the LIMIT holds (an IN (subquery)
        # may be re-run by the planner) and a concurrent sweeper skips them.
        sql = (
            f"WITH picked AS ({pick} FOR UPDATE SKIP LOCKED) "
            "UPDATE tasks SET redriven_at = :now FROM picked WHERE tasks.id = picked.id "
            + returning
        )
    else:  # SQLite: one writer at a time; the subquery runs once
        sql = f"UPDATE tasks SET redriven_at = :now WHERE id IN ({pick}) " + returning
    return (
        text(sql)
        .bindparams(
            bindparam("now", type_=t.updated_at.type),
            bindparam("cutoff", type_=t.updated_at.type),
        )
        .columns(t.id, t.status, t.task_type, t.attempts, t.assigned_agent)
    )


def claim_stuck(
    db: Database,
    *,
    redrive_after_s: float,
    batch: int,
    statuses: tuple[TaskStatus, ...] = ACTIVE_STATUSES,
) -> list[Redrive]:
    """Claim up to ``batch`` stuck tasks in ``statuses``, oldest first, with their hops."""
    now = utcnow()
    params = {"now": now, "cutoff": now - timedelta(seconds=redrive_after_s), "batch": batch}
    with db.begin() as conn:
        rows = conn.execute(_claim_sql(db.is_postgres, statuses), params).mappings().all()
    redrives = []
    for row in sorted(rows, key=lambda r: r["id"]):
        status = TaskStatus(row["status"])
        if status is TaskStatus.PENDING:
            args: list[Any] = [row["id"], row["task_type"]]
        elif status is TaskStatus.ASSIGNED:
            args = [row["id"]]
        else:
            args = [row["id"], row["attempts"], row["assigned_agent"]]
        redrives.append(
            Redrive(row["id"], status, HOP_FOR_STATUS[status], args, row["assigned_agent"])
        )
    return redrives


@dataclass(frozen=True, slots=True)
class StuckSummary:
    count: int
    oldest_updated_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        oldest = self.oldest_updated_at
        return {
            "count": self.count,
            "oldest_updated_at": oldest.isoformat() if oldest else None,
            "oldest_age_s": round((utcnow() - oldest).total_seconds(), 1) if oldest else None,
        }


def stuck_summary(db: Database, *, redrive_after_s: float) -> StuckSummary:
    """How many active tasks have not moved for ``redrive_after_s``, and the oldest one."""
    t = tasks_table.c
    cutoff = utcnow() - timedelta(seconds=redrive_after_s)
    with db.connect() as conn:
        count, oldest = conn.execute(
            select(func.count(), func.min(t.updated_at)).where(
                t.status.in_(ACTIVE_STATUSES), t.updated_at < cutoff
            )
        ).one()
    return StuckSummary(count, oldest)


def sweep(
    db: Database, dispatcher: Dispatcher, *, redrive_after_s: float, batch: int
) -> list[Redrive]:
    """Claim stuck tasks and send the hop that drives each. Returns what was re-driven.

    A message that cannot be sent stays claimed; the task is picked up again after
    ``redrive_after_s``. Raises BrokerUnavailable after claiming if the broker is down.

    While the hops queue holds a backlog (more than ``batch`` messages), pending and
    assigned tasks are most likely still queued, not lost: only tasks whose handler's
    worker died (in_progress, lease expired) are re-driven, so a backlog is not sent
    again on every pass.
    """
    statuses: tuple[TaskStatus, ...] = ACTIVE_STATUSES
    backlog = dispatcher.queue_depth(c.QUEUE_HOPS)
    if backlog is not None and backlog > batch:
        statuses = (TaskStatus.IN_PROGRESS,)
        log.info("sweep_backlog", queue=c.QUEUE_HOPS, messages=backlog)
    redrives = claim_stuck(db, redrive_after_s=redrive_after_s, batch=batch, statuses=statuses)
    for redrive in redrives:
        options: dict[str, Any] = {}
        if redrive.hop == c.HOP_EXECUTE and redrive.agent:
            spec = registry.find(redrive.agent)
            options = spec.time_limits() if spec else {}
        dispatcher.send(redrive.hop, redrive.args, **options)
        log.info(
            "task_redriven",
            task_id=redrive.task_id,
            status=redrive.status.value,
            hop=redrive.hop,
        )
    return redrives
