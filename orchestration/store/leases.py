"""Execution leases: who runs a task's handler now, and until when.

A handler runs under a lease on its task (``lease_owner``, ``lease_expires_at``),
renewed while it runs (``keeper.LeaseKeeper``). The database grants every lease, in one
statement that also reads what the handler needs (:func:`take`); an execute message
only names the lease it asks for, so a forged or duplicate message runs nothing.

- **Pre-claimed** (the common case): the ``start`` transition counts the first attempt
  and leases it to a ``q:`` token that travels in the execute message; the hop that
  takes the message adopts it under a ``r:`` token of its own (one copy wins).
- **Next attempt** (retries, deferrals): the attempt after the ones done, if no live
  lease holds the task.
- **Take-over**: a ``r:`` lease that expired belonged to a worker that died while the
  handler ran; the same attempt is taken over and runs isolated from then on.

Attempts are counted as ``attempts``: the attempts done before the run a function
takes, gives back or defers (the row's ``attempts`` column counts a run once its lease
is taken). The writes here change ``attempts``, ``not_before`` and the lease of an
in-progress task without a transition and without an audit row: bookkeeping, as the
docstring of :mod:`orchestration.moves` says why.
"""

from __future__ import annotations

import enum
import functools
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Executable, bindparam, func, literal, select, text, update

from orchestration import constants as c
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, tasks_table, utcnow
from orchestration.store.db import Database
from orchestration.values import storable_text

log = get_logger("taskrail.leases")


@dataclass(frozen=True, slots=True)
class Claim:
    """A claimed execution: the lease token and what the handler needs."""

    task_id: int
    token: str
    attempts: int  # attempts done before this run: 0 for the first call of the handler
    client_id: int
    task_type: str
    payload: dict[str, Any]
    agent: str | None
    isolated: bool = False  # run the handler in a process of its own
    expires_at: float | None = None  # epoch seconds; None: a full TTL from the claim


def preclaim_token(worker: str) -> str:
    """A token for an attempt that is counted but whose handler has not started."""
    return f"{c.PRECLAIM_TOKEN_PREFIX}{worker}/{uuid.uuid4().hex[:12]}"


def run_token(worker: str) -> str:
    """A token for a handler run: this worker and a random part (one per run)."""
    return f"{c.RUN_TOKEN_PREFIX}{worker}/{uuid.uuid4().hex[:12]}"


def is_run_token(token: str) -> bool:
    """Whether ``token`` was taken by a running handler (not a pre-claim)."""
    return token.startswith(c.RUN_TOKEN_PREFIX)


# Ends the token of a run that took over a dead worker's run without being isolated
# (:func:`take`'s ``isolate=False``): if that run's worker dies too, it is.
TAKEN_OVER_MARK = "+t"


def taken_over_token(worker: str) -> str:
    """A run token that says the run took over a dead worker's run."""
    return run_token(worker) + TAKEN_OVER_MARK


def took_over(token: str | None) -> bool:
    """Whether ``token`` names a run that had taken over a dead worker's run."""
    return token is not None and is_run_token(token) and token.endswith(TAKEN_OVER_MARK)


class Take(enum.Enum):
    """How :func:`take` may take a task's lease."""

    NEXT = "next"  # count the next attempt; the lease is free or expired
    ADOPT = "adopt"  # take over a pre-claim by its token, expired or not
    TAKE_OVER = "take_over"  # the handler's worker died: its expired run lease, isolated


_TAKE_WHERE = {
    Take.NEXT: "AND (lease_expires_at IS NULL OR lease_expires_at < :now)",
    Take.ADOPT: "AND lease_owner = :prior",
    Take.TAKE_OVER: "AND lease_owner = :prior AND lease_expires_at < :now",
}
_TAKE_SET = {
    Take.NEXT: ", attempts = attempts + 1",
    Take.ADOPT: "",
    Take.TAKE_OVER: ", isolated = (isolated OR :isolated)",
}


@functools.lru_cache(maxsize=4)
def _take_sql(how: Take) -> Executable:
    t = tasks_table.c
    sql = text(
        "UPDATE tasks SET lease_owner = :token, lease_expires_at = :expires, "
        f"updated_at = :now{_TAKE_SET[how]} "
        "WHERE id = :task_id AND status = :status AND attempts = :attempts "
        f"{_TAKE_WHERE[how]} "
        "RETURNING id, attempts, client_id, task_type, payload, assigned_agent, isolated"
    )
    params = [
        bindparam("token", type_=t.lease_owner.type),
        bindparam("expires", type_=t.lease_expires_at.type),
        bindparam("now", type_=t.updated_at.type),
        bindparam("task_id", type_=t.id.type),
        bindparam("status", type_=t.status.type),
        bindparam("attempts", type_=t.attempts.type),
    ]
    if how is not Take.NEXT:
        params.append(bindparam("prior", type_=t.lease_owner.type))
    if how is Take.TAKE_OVER:
        params.append(bindparam("isolated", type_=t.isolated.type))
    return sql.bindparams(*params).columns(
        t.id, t.attempts, t.client_id, t.task_type, t.payload, t.assigned_agent, t.isolated
    )


def take(
    db: Database,
    task_id: int,
    attempts: int,
    token: str,
    ttl_s: float,
    *,
    how: Take = Take.NEXT,
    prior: str | None = None,
    isolate: bool = True,
) -> Claim | None:
    """Take the lease of ``task_id``'s handler run as ``token``; None if not to be had.

    ``attempts`` is the attempts done before the run taken: :attr:`Take.NEXT` counts
    that run on a row with ``attempts`` counted; :attr:`Take.ADOPT` and
    :attr:`Take.TAKE_OVER` (which need the ``prior`` owner) take a run already counted.
    A take-over marks the task isolated (``isolate=False``: not now; a task once
    isolated stays so). One statement; the row's payload comes back with it. Raises
    DatabaseUnavailable.
    """
    now = utcnow()
    params: dict[str, Any] = {
        "token": token,
        "expires": now + timedelta(seconds=ttl_s),
        "now": now,
        "task_id": task_id,
        "status": TaskStatus.IN_PROGRESS,
        "attempts": attempts if how is Take.NEXT else attempts + 1,
    }
    if how is not Take.NEXT:
        params["prior"] = prior
    if how is Take.TAKE_OVER:
        params["isolated"] = isolate
    with db.connect(autocommit=True) if db.is_postgres else db.begin() as conn:
        row = conn.execute(_take_sql(how), params).mappings().first()
    if row is None:
        return None
    return Claim(
        task_id=task_id,
        token=token,
        attempts=row["attempts"] - 1,
        client_id=row["client_id"],
        task_type=row["task_type"],
        payload=row["payload"] or {},
        agent=row["assigned_agent"],
        isolated=bool(row["isolated"]),
    )


def claim(db: Database, task_id: int, attempts: int, token: str, ttl_s: float) -> Claim | None:
    """Claim the handler run of ``task_id`` after ``attempts`` earlier attempts."""
    return take(db, task_id, attempts, token, ttl_s)


def adopt(
    db: Database, task_id: int, attempts: int, prior: str, token: str, ttl_s: float
) -> Claim | None:
    """Take over the pre-claim ``prior`` of the run after ``attempts`` as ``token``
    (may be the same).

    With a new token, of several copies of one message exactly one gets the lease.
    None when the task moved on or another worker took the lease.
    """
    return take(db, task_id, attempts, token, ttl_s, how=Take.ADOPT, prior=prior)


def renew(db: Database, task_id: int, token: str, ttl_s: float) -> bool:
    """Extend a held lease; False when it is no longer ours."""
    t = tasks_table
    with db.connect(autocommit=True) if db.is_postgres else db.begin() as conn:
        result = conn.execute(
            update(t)
            .where(t.c.id == task_id, t.c.lease_owner == token)
            .values(lease_expires_at=utcnow() + timedelta(seconds=ttl_s))
        )
    return result.rowcount == 1


def release(
    db: Database,
    task_id: int,
    token: str,
    retry_at: Any,
    *,
    error: str | None = None,
    attempt_used: bool = True,
    end_deferral: bool = True,
) -> bool:
    """Give the lease back; the next attempt is due at ``retry_at``. False if not ours.

    After a transient failure pass the ``error``. ``attempt_used=False`` gives the
    attempt back too (the handler was never called). ``end_deferral`` clears the record
    of a breaker deferral (the call went through a closed breaker); a failed half-open
    trial keeps it, so a long outage still ends in escalation after ``max_deferral_s``.
    """
    t = tasks_table
    values: dict[str, Any] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "not_before": retry_at,
        "updated_at": utcnow(),
    }
    if error is not None:
        values["last_error"] = storable_text(error)
    if not attempt_used:
        values["attempts"] = t.c.attempts - 1
    if end_deferral:
        values["deferred_since"] = None
    with db.connect(autocommit=True) if db.is_postgres else db.begin() as conn:
        result = conn.execute(
            update(t)
            .where(
                t.c.id == task_id, t.c.lease_owner == token, t.c.status == TaskStatus.IN_PROGRESS
            )
            .values(values)
        )
    return result.rowcount == 1


def describe(db: Database, task_id: int) -> dict[str, Any] | None:
    """The row's status, attempts, lease and agent: why a hop had nothing to do."""
    t = tasks_table.c
    with db.connect() as conn:
        row = (
            conn.execute(
                select(
                    t.status, t.attempts, t.lease_owner, t.lease_expires_at, t.assigned_agent
                ).where(t.id == task_id)
            )
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


def defer(
    db: Database, task_id: int, attempts: int, retry_at: Any, *, token: str | None = None
) -> Any | None:
    """Record that the next attempt waits until ``retry_at`` (an open breaker).

    Consumes no attempt and changes no status; a pre-claim (``token``) is given back
    with its attempt. Returns since when the task has been deferred (the first
    deferral's time), or None when the task moved on meanwhile.
    """
    now = utcnow()
    t = tasks_table
    values: dict[str, Any] = {
        "not_before": retry_at,
        "deferred_since": func.coalesce(t.c.deferred_since, literal(now, t.c.deferred_since.type)),
        "updated_at": now,
    }
    if token is None:
        where = [
            t.c.attempts == attempts,
            (t.c.lease_expires_at.is_(None)) | (t.c.lease_expires_at < now),
        ]
    else:
        where = [t.c.attempts == attempts + 1, t.c.lease_owner == token]
        values.update(attempts=t.c.attempts - 1, lease_owner=None, lease_expires_at=None)
    with db.connect(autocommit=True) if db.is_postgres else db.begin() as conn:
        row = conn.execute(
            update(t)
            .where(t.c.id == task_id, t.c.status == TaskStatus.IN_PROGRESS, *where)
            .values(values)
            .returning(t.c.deferred_since)
        ).first()
    return row[0] if row is not None else None
