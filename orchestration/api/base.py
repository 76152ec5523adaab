"""What every part of :class:`~orchestration.api.Taskrail` stands on: the database and
the broker it was built with, reading a task back, and sending first hops."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import func, select

from orchestration import constants as c
from orchestration.agents import load_agent_modules
from orchestration.errors import BrokerUnavailable, TaskNotFound
from orchestration.logging import get_logger
from orchestration.messaging.dispatch import Dispatcher, make_celery
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.settings import Settings, get_settings
from orchestration.store.db import ConnectionTimeouts, Database
from orchestration.store.records import EventRecord, TaskRecord
from orchestration.store.transitions import TransitionStore

log = get_logger("taskrail.api")

# Task ids are BIGINT: an id outside 1 .. 2**63-1 names no task.
_MAX_TASK_ID = 2**63 - 1
_API_WORKER = "api"  # the audit rows' worker for a person's moves


def _check_task_id(task_id: Any) -> int:
    """``task_id`` if a task could have it; raises TaskNotFound without asking otherwise."""
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TaskNotFound(task_id)
    if not 0 < task_id <= _MAX_TASK_ID:
        raise TaskNotFound(task_id)
    return int(task_id)


class HopSender(Protocol):
    """What sends first hops: a :class:`Dispatcher`, or the async API's stand-in."""

    def send_many(self, hop: str, args_list: Iterable[Sequence[Any]]) -> int: ...


D = TypeVar("D", bound=Database)


def producer_database(settings: Settings, kind: type[D]) -> D:
    """A producer's database of class ``kind`` from ``settings``.

    pre_ping: a producer outlives server restarts; a pooled connection that died with
    one is replaced on checkout instead of failing the caller.
    """
    return kind(
        settings.effective_database_url,
        pool_size=settings.db_pool_size,
        timeouts=ConnectionTimeouts.from_settings(settings),
        pre_ping=True,
    )


class TaskrailBase:
    """A producer's handle on one database and one broker: reads, and first hops sent.

    ``hops`` sends the first hops (default: the ``dispatcher``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        db: Database | None = None,
        dispatcher: Dispatcher | None = None,
        hops: HopSender | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        load_agent_modules(self.settings.agents)
        self.db = db or producer_database(self.settings, Database)
        self.dispatcher = dispatcher or Dispatcher(make_celery(self.settings))
        self.hops: HopSender = hops or self.dispatcher

    # -- reading ----------------------------------------------------------------

    def get(self, task_id: int) -> TaskRecord:
        """The task's current record. Raises TaskNotFound."""
        task_id = _check_task_id(task_id)
        with self.db.connect() as conn:
            row = (
                conn.execute(select(tasks_table).where(tasks_table.c.id == task_id))
                .mappings()
                .first()
            )
        if row is None:
            raise TaskNotFound(task_id)
        return TaskRecord.from_row(row)

    def history(self, task_id: int) -> list[EventRecord]:
        """The task's transitions, oldest first. Raises TaskNotFound."""
        task_id = _check_task_id(task_id)
        with self.db.connect() as conn:
            exists = conn.execute(
                select(tasks_table.c.id).where(tasks_table.c.id == task_id)
            ).first()
            if exists is None:
                raise TaskNotFound(task_id)
            rows = (
                conn.execute(
                    select(events_table)
                    .where(events_table.c.task_id == task_id)
                    .order_by(events_table.c.id)
                )
                .mappings()
                .all()
            )
        return [EventRecord.from_row(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """Number of tasks in each status (every status listed, zeros included)."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(tasks_table.c.status, func.count()).group_by(tasks_table.c.status)
            ).all()
        counts = {status.value: 0 for status in TaskStatus}
        counts.update({TaskStatus(status).value: n for status, n in rows})
        return counts

    def close(self) -> None:
        self.db.dispose()

    # -- for the moves ------------------------------------------------------------

    def _enqueue_first_hops(self, tasks: list[tuple[int, str]]) -> None:
        """Send each (task id, task type)'s assign hop; a broker that cannot take them
        leaves the tasks pending for the sweeper (logged, not raised)."""
        if not tasks:
            return
        try:
            self.hops.send_many(
                c.HOP_ASSIGN, ([task_id, task_type] for task_id, task_type in tasks)
            )
        except BrokerUnavailable as err:
            log.warning(
                "enqueue_deferred",
                count=len(tasks),
                first_task_id=tasks[0][0],
                error=str(err),
                note="tasks are recorded as pending; the sweeper will send them",
            )

    def _store(self) -> TransitionStore:
        """The transition store a person's moves are written through (worker "api")."""
        return TransitionStore(self.db, worker=_API_WORKER)
