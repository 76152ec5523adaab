"""Execution leases: who runs a task's handler now, and until when.

The ``execute`` hop claims a lease before it calls the handler: one statement that
checks the task is in_progress, at the attempt the message names, and not leased by
a live worker; it counts the attempt and returns what the handler needs. A claim
that matches nothing means a duplicate or stale message, or a worker already on it.
The sweeper re-drives a task whose lease expired (its worker died).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Executable, bindparam, func, literal, select, text, update

from orchestration.db import Database
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, tasks_table, utcnow

log = get_logger("taskrail.leases")


@dataclass(frozen=True, slots=True)
class Claim:
    """A claimed execution: the lease token and what the handler needs."""

    task_id: int
    token: str
    attempt: int  # 1 for the first call of the handler
    client_id: int
    task_type: str
    payload: dict[str, Any]
    agent: str | None


@functools.lru_cache(maxsize=1)
def _claim_sql() -> Executable:
    t = tasks_table.c
    return (
        text(
            "UPDATE tasks SET lease_owner = :token, lease_expires_at = :expires, "
            "attempts = attempts + 1, updated_at = :now "
            "WHERE id = :task_id AND status = :status AND attempts = :attempts "
            "AND (lease_expires_at IS NULL OR lease_expires_at < :now) "
            "RETURNING id, attempts, client_id, task_type, payload, assigned_agent"
        )
        .bindparams(
            bindparam("token", type_=t.lease_owner.type),
            bindparam("expires", type_=t.lease_expires_at.type),
            bindparam("now", type_=t.updated_at.type),
            bindparam("task_id", type_=t.id.type),
            bindparam("status", type_=t.status.type),
            bindparam("attempts", type_=t.attempts.type),
        )
        .columns(t.id, t.attempts, t.client_id, t.task_type, t.payload, t.assigned_agent)
    )


def claim(db: Database, task_id: int, attempts: int, token: str, ttl_s: float) -> Claim | None:
    """Claim the handler run of ``task_id`` after ``attempts`` earlier attempts."""
    now = utcnow()
    params = {
        "token": token,
        "expires": now + timedelta(seconds=ttl_s),
        "now": now,
        "task_id": task_id,
        "status": TaskStatus.IN_PROGRESS,
        "attempts": attempts,
    }
    with db.connect(autocommit=True) if db.is_postgres else db.begin() as conn:
        row = conn.execute(_claim_sql(), params).mappings().first()
    if row is None:
        return None
    return Claim(
        task_id=task_id,
        token=token,
        attempt=row["attempts"],
        client_id=row["client_id"],
        task_type=row["task_type"],
        payload=row["payload"] or {},
        agent=row["assigned_agent"],
    )


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
        values["last_error"] = error
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
    """The row's status, attempts and lease, to explain why a hop had nothing to do."""
    t = tasks_table.c
    with db.connect() as conn:
        row = (
            conn.execute(
                select(t.status, t.attempts, t.lease_owner, t.lease_expires_at).where(
                    t.id == task_id
                )
            )
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


class LeaseKeeper:
    """Renews the leases of the handlers running in this process.

    One background thread per process renews every held lease in a single statement
    every ``ttl_s / 3``; a handler shorter than that costs no renewal at all. When the
    process dies the renewals stop, the leases expire and the sweeper re-drives.
    """

    def __init__(self, db: Database, ttl_s: float) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def hold(self, task_id: int, token: str) -> Iterator[None]:
        """Keep the lease ``token`` on ``task_id`` alive while the block runs."""
        with self._lock:
            self._held[token] = task_id
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="taskrail-lease-keeper", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(token, None)

    def renew_all(self) -> int:
        """Renew every held lease now; returns how many rows were extended."""
        with self._lock:
            tokens = list(self._held)
        if not tokens:
            return 0
        t = tasks_table
        with self.db.connect(autocommit=True) if self.db.is_postgres else self.db.begin() as conn:
            result = conn.execute(
                update(t)
                .where(t.c.lease_owner.in_(tokens))
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.ttl_s))
            )
        return result.rowcount

    def _run(self) -> None:
        while True:
            self._wake.wait(self.ttl_s / 3)
            try:
                self.renew_all()
            except Exception as err:  # keep renewing; the next pass may work
                log.warning("lease_renewal_failed", error=str(err))


def defer(db: Database, task_id: int, attempts: int, retry_at: Any) -> Any | None:
    """Record that the next attempt waits until ``retry_at`` (an open breaker).

    Consumes no attempt and changes no status. Returns since when the task has been
    deferred (the first deferral's time), or None when the task moved on meanwhile.
    """
    now = utcnow()
    t = tasks_table
    with db.connect(autocommit=True) if db.is_postgres else db.begin() as conn:
        row = conn.execute(
            update(t)
            .where(
                t.c.id == task_id,
                t.c.status == TaskStatus.IN_PROGRESS,
                t.c.attempts == attempts,
                (t.c.lease_expires_at.is_(None)) | (t.c.lease_expires_at < now),
            )
            .values(
                not_before=retry_at,
                deferred_since=func.coalesce(
                    t.c.deferred_since, literal(now, t.c.deferred_since.type)
                ),
                updated_at=now,
            )
            .returning(t.c.deferred_since)
        ).first()
    return row[0] if row is not None else None
