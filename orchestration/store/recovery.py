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
- no pending retry or deferral: ``not_before`` passed ``redrive_after_s`` ago;
- while the execute queue holds messages, its lease was not a pre-claim
  (``lease_owner`` starting with ``PRECLAIM_TOKEN_PREFIX``): the start hop leased the
  attempt for an execute message that is most likely still queued. Once that queue is
  empty such a message was lost, and the task is re-driven.

Every pass records when it ran, how many tasks it re-drove and how long it took
(:func:`record_sweep`) in the database, the one store every deployment has (the
embedded default has no Redis): ``taskrail status`` and the metrics endpoint read it
with one primary-key lookup to tell whether the sweeper runs at all.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Executable, bindparam, select, text
from sqlalchemy.dialects import postgresql, sqlite

from orchestration import constants as c
from orchestration.logging import get_logger
from orchestration.models import (
    ACTIVE_STATUSES,
    TaskStatus,
    sweeper_runs_table,
    tasks_table,
    utcnow,
)
from orchestration.store.db import Database

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
# A lease the start hop pre-claimed for an execute message (no handler ever ran it).
PRECLAIMED = "substr(lease_owner, 1, :preclaim_len) = :preclaim_prefix"
_NOT_PRECLAIMED = f" AND (lease_owner IS NULL OR NOT {PRECLAIMED})"
# The bind parameters of PRECLAIMED.
PRECLAIM_PARAMS = {
    "preclaim_len": len(c.PRECLAIM_TOKEN_PREFIX),
    "preclaim_prefix": c.PRECLAIM_TOKEN_PREFIX,
}
# The name of the row in sweeper_runs that every sweep pass rewrites.
SWEEPER_NAME = "sweeper"


def stuck_condition(statuses: tuple[TaskStatus, ...] = ACTIVE_STATUSES) -> str:
    """The SQL condition of a stuck task (binds ``:cutoff`` and ``:now``)."""
    return _STUCK.format(statuses=", ".join(f"'{s.value}'" for s in statuses))


class HopSender(Protocol):
    """What the sweep sends through (``orchestration.messaging.dispatch.Dispatcher``):
    the store does not import the transport."""

    def send(self, hop: str, args: Sequence[Any]) -> None:
        """Publish one hop message. Raises BrokerUnavailable."""

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``, or None if the transport cannot tell."""


@dataclass(frozen=True, slots=True)
class Redrive:
    """A claimed stuck task and the hop message that drives it on."""

    task_id: int
    status: TaskStatus
    hop: str
    args: list[Any]
    agent: str | None


@functools.lru_cache(maxsize=16)
def _claim_sql(
    skip_locked: bool, statuses: tuple[TaskStatus, ...], skip_preclaimed: bool
) -> Executable:
    t = tasks_table.c
    stuck = stuck_condition(statuses) + (_NOT_PRECLAIMED if skip_preclaimed else "")
    pick = f"SELECT id FROM tasks WHERE {stuck} ORDER BY updated_at LIMIT :batch"
    returning = (
        "RETURNING tasks.id, tasks.status, tasks.task_type, tasks.attempts, "
        "tasks.assigned_agent, tasks.lease_owner"
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
        .columns(t.id, t.status, t.task_type, t.attempts, t.assigned_agent, t.lease_owner)
    )


def claim_stuck(
    db: Database,
    *,
    redrive_after_s: float,
    batch: int,
    statuses: tuple[TaskStatus, ...] = ACTIVE_STATUSES,
    skip_preclaimed: bool = False,
) -> list[Redrive]:
    """Claim up to ``batch`` stuck tasks in ``statuses``, oldest first, with their hops.

    ``skip_preclaimed``: leave tasks whose expired lease is a pre-claim (their execute
    message is most likely still queued). An in_progress task with a lease owner is
    re-driven as ``[task_id, attempts - 1, agent, lease_owner]``, so the execute hop
    takes over that very attempt; without one as ``[task_id, attempts, agent]``.
    """
    now = utcnow()
    params: dict[str, Any] = {
        "now": now,
        "cutoff": now - timedelta(seconds=redrive_after_s),
        "batch": batch,
    }
    if skip_preclaimed:
        params.update(PRECLAIM_PARAMS)
    sql = _claim_sql(db.is_postgres, statuses, skip_preclaimed)
    with db.begin() as conn:
        rows = conn.execute(sql, params).mappings().all()
    redrives = []
    for row in sorted(rows, key=lambda r: r["id"]):
        status = TaskStatus(row["status"])
        if status is TaskStatus.PENDING:
            args: list[Any] = [row["id"], row["task_type"]]
        elif status is TaskStatus.ASSIGNED:
            args = [row["id"]]
        elif row["lease_owner"]:
            args = [row["id"], row["attempts"] - 1, row["assigned_agent"], row["lease_owner"]]
        else:
            args = [row["id"], row["attempts"], row["assigned_agent"]]
        redrives.append(
            Redrive(row["id"], status, HOP_FOR_STATUS[status], args, row["assigned_agent"])
        )
    return redrives


def sweep(
    db: Database, dispatcher: HopSender, *, redrive_after_s: float, batch: int
) -> list[Redrive]:
    """Claim stuck tasks and send the hop that drives each through ``dispatcher``.
    Returns what was re-driven.

    A message that cannot be sent stays claimed; the task is picked up again after
    ``redrive_after_s``. Raises BrokerUnavailable after claiming if the broker is down,
    DatabaseUnavailable if the database is. A pass that completes is recorded
    (:func:`record_sweep`).

    While the hops queue holds a backlog (more than ``batch`` messages), pending and
    assigned tasks are most likely still queued, not lost: only in_progress tasks are
    re-driven, so a backlog is not sent again on every pass. Likewise, while the
    execute queue holds any message, a task whose expired lease is a pre-claim is left
    alone: its message is waiting there. Messages a worker has reserved but not yet
    acknowledged are not counted (the Redis transport keeps every queue's in one hash):
    a pre-claim waiting in a prefetch buffer while the queue is empty is re-driven, and
    its copy takes over the same attempt by its lease owner.
    """
    started = time.perf_counter()
    statuses: tuple[TaskStatus, ...] = ACTIVE_STATUSES
    backlog = dispatcher.queue_depth(c.QUEUE_HOPS)
    if backlog is not None and backlog > batch:
        statuses = (TaskStatus.IN_PROGRESS,)
        log.info("sweep_backlog", queue=c.QUEUE_HOPS, messages=backlog)
    queued = dispatcher.queue_depth(c.QUEUE_EXECUTE)
    skip_preclaimed = bool(queued)
    if skip_preclaimed:
        log.info("sweep_backlog", queue=c.QUEUE_EXECUTE, messages=queued)
    redrives = claim_stuck(
        db,
        redrive_after_s=redrive_after_s,
        batch=batch,
        statuses=statuses,
        skip_preclaimed=skip_preclaimed,
    )
    for redrive in redrives:
        dispatcher.send(redrive.hop, redrive.args)
        log.info(
            "task_redriven",
            task_id=redrive.task_id,
            status=redrive.status.value,
            hop=redrive.hop,
        )
    record_sweep(db, redriven=len(redrives), duration_s=time.perf_counter() - started)
    return redrives


@dataclass(frozen=True, slots=True)
class SweepRecord:
    """The sweeper's last pass, as :func:`record_sweep` wrote it."""

    last_run_at: datetime
    redriven: int
    duration_s: float


def record_sweep(
    db: Database, *, redriven: int, duration_s: float, at: datetime | None = None
) -> None:
    """Rewrite the sweeper's row: this pass ran ``at`` (default now). One statement."""
    values = {
        "name": SWEEPER_NAME,
        "last_run_at": at or utcnow(),
        "redriven": redriven,
        "duration_s": round(duration_s, 6),
    }
    dialect = postgresql if db.is_postgres else sqlite
    stmt = dialect.insert(sweeper_runs_table).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"],
        set_={k: stmt.excluded[k] for k in ("last_run_at", "redriven", "duration_s")},
    )
    with db.begin() as conn:
        conn.execute(stmt)


def last_sweep(db: Database) -> SweepRecord | None:
    """The sweeper's last recorded pass, or None if it never ran."""
    t = sweeper_runs_table.c
    with db.connect() as conn:
        row = conn.execute(
            select(t.last_run_at, t.redriven, t.duration_s).where(t.name == SWEEPER_NAME)
        ).first()
    return SweepRecord(row[0], int(row[1]), float(row[2])) if row is not None else None
