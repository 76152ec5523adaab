"""The producer API: submit work, read it back, retry what failed.

::

    from orchestration import api

    task_id = api.submit("personal_tax", client_id=42, payload={"year": 2025})
    api.get(task_id).status          # TaskStatus.PENDING ... COMPLETED
    api.history(task_id)             # one EventRecord per transition
    api.retry(task_id)               # failed -> pending, and back to the workers

The module functions use one :class:`Taskrail` built from the ``TASKRAIL_*``
environment on first use; build a :class:`Taskrail` yourself for other settings.
A task row is committed before its first hop is sent; if the broker cannot take the
message, the task stays pending and the sweeper sends it later (nothing is lost).

Every failure is a TaskrailError: an InputError (nothing written) for what
:mod:`orchestration.values` refuses, the same rules the worker checks a loaded row by,
or an InfrastructureError. Payloads, results and reasons read back as they were given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import func, select

from orchestration import constants as c
from orchestration.agents import load_agent_modules, registry
from orchestration.errors import (
    BrokerUnavailable,
    InputError,
    InvalidTaskItem,
    NotRetryable,
    TaskNotFound,
    short_repr,
)
from orchestration.logging import get_logger
from orchestration.messaging.dispatch import Dispatcher, make_celery
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.settings import Settings, get_settings
from orchestration.store.db import ConnectionTimeouts, Database
from orchestration.store.inserts import NewRow, insert_tasks
from orchestration.store.records import EventRecord, TaskRecord
from orchestration.store.transitions import Outcome, TransitionNotAllowed, apply_transition
from orchestration.values import (
    check_client_id,
    check_idempotency_key,
    check_task_type,
    encode_payload,
)

log = get_logger("taskrail.api")

MAX_KEY_LENGTH = c.MAX_IDEMPOTENCY_KEY_CHARS
# Task ids are BIGINT: an id outside 1 .. 2**63-1 names no task.
_MAX_TASK_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class NewTask:
    """One item of :meth:`Taskrail.submit_many`."""

    task_type: str
    client_id: int
    payload: Mapping[str, Any] | None = None
    idempotency_key: str | None = None


_FIELDS = tuple(f.name for f in fields(NewTask))
_REQUIRED = ("task_type", "client_id")


def _new_task(item: Any, index: int) -> NewTask:
    """``item`` of submit_many as a NewTask. Raises InvalidTaskItem."""
    if isinstance(item, NewTask):
        return item
    if not isinstance(item, Mapping):
        raise InvalidTaskItem(index, f"must be a NewTask or a mapping, got {type(item).__name__}")
    for name in item:
        if name not in _FIELDS:
            raise InvalidTaskItem(
                index, f"unknown field {short_repr(name)}; the fields are {', '.join(_FIELDS)}"
            )
    for name in _REQUIRED:
        if name not in item:
            raise InvalidTaskItem(index, f"missing field {name}")
    return NewTask(**item)


def _check(new: NewTask, known: set[str]) -> NewRow:
    """One task checked by the rules the worker applies to a loaded row; ``known`` holds
    the task types found in the registry so far (a batch looks each up once).

    Raises UnknownTaskType, InvalidClientId, InvalidPayload, InvalidIdempotencyKey.
    """
    task_type = check_task_type(new.task_type)
    if task_type not in known:
        registry.for_task_type(task_type)
        known.add(task_type)
    return NewRow(
        check_client_id(new.client_id),
        task_type,
        encode_payload(new.payload).text,
        check_idempotency_key(new.idempotency_key),
    )


def _at_item(err: InputError, index: int) -> InputError:
    """``err`` (of item ``index`` of a batch) with the index in its message."""
    if not isinstance(err, InvalidTaskItem):
        err.item = index  # type: ignore[attr-defined]
        err.args = (f"item {index}: {err}",)
    return err


def _check_task_id(task_id: Any) -> int:
    """``task_id`` if a task could have it; raises TaskNotFound without asking otherwise."""
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TaskNotFound(task_id)
    if not 0 < task_id <= _MAX_TASK_ID:
        raise TaskNotFound(task_id)
    return int(task_id)


class Taskrail:
    """A producer's handle on one database and one broker."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        db: Database | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        load_agent_modules(self.settings.agents)
        # pre_ping: a producer outlives server restarts; a pooled connection that died
        # with one is replaced on checkout instead of failing the caller.
        self.db = db or Database(
            self.settings.effective_database_url,
            pool_size=self.settings.db_pool_size,
            timeouts=ConnectionTimeouts.from_settings(self.settings),
            pre_ping=True,
        )
        self.dispatcher = dispatcher or Dispatcher(make_celery(self.settings))

    # -- writing ----------------------------------------------------------------

    def submit(
        self,
        task_type: str,
        client_id: int,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        """Record a new pending task and send its first hop; returns its id.

        With an ``idempotency_key`` already used, returns that task's id and creates
        nothing. Raises UnknownTaskType, InvalidClientId, InvalidPayload,
        InvalidIdempotencyKey (nothing written), DatabaseUnavailable, WriteConflict.
        """
        row = _check(NewTask(task_type, client_id, payload, idempotency_key), set())
        return self._submit_rows([row])[0]

    def submit_many(self, items: Iterable[NewTask | Mapping[str, Any]]) -> list[int]:
        """Submit many tasks in one transaction; returns their ids in input order.

        Every item is validated before anything is written: one bad item raises (its
        error names the item's index, from 0) and no task is created.
        """
        try:
            listed = list(items)
        except TypeError:
            raise InputError(
                f"submit_many takes NewTask items or mappings, got {type(items).__name__}"
            ) from None
        rows: list[NewRow] = []
        known: set[str] = set()
        for index, item in enumerate(listed):
            try:
                rows.append(_check(_new_task(item, index), known))
            except InputError as err:
                raise _at_item(err, index) from None
        return self._submit_rows(rows)

    def _submit_rows(self, rows: list[NewRow]) -> list[int]:
        if not rows:
            return []
        created = insert_tasks(self.db, rows)
        fresh = [
            (task_id, row.task_type)
            for (task_id, is_new), row in zip(created, rows, strict=True)
            if is_new
        ]
        self._enqueue_first_hops(fresh)
        return [task_id for task_id, _ in created]

    def _enqueue_first_hops(self, tasks: list[tuple[int, str]]) -> None:
        if not tasks:
            return
        try:
            self.dispatcher.send_many(
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

    def retry(self, task_id: int) -> None:
        """Move a failed task back to pending and send it to the workers again.

        Raises TaskNotFound, NotRetryable (the task is not failed).
        """
        task_id = _check_task_id(task_id)
        try:
            outcome = apply_transition(
                self.db, task_id, "retry", worker="api", returning=("task_type",)
            )
        except TransitionNotAllowed:
            raise NotRetryable(task_id, self.get(task_id).status) from None
        if outcome.outcome is Outcome.NOT_FOUND:
            raise TaskNotFound(task_id)
        if outcome.outcome is Outcome.STALE:
            raise NotRetryable(task_id, self.get(task_id).status)
        self._enqueue_first_hops([(task_id, outcome.row["task_type"])])

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


_default: Taskrail | None = None
_default_lock = threading.Lock()


def client() -> Taskrail:
    """The process-wide :class:`Taskrail`, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Taskrail()
        return _default


def reset_client() -> None:
    """Forget the process-wide client (settings changed, tests)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = None


def submit(
    task_type: str,
    client_id: int,
    payload: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
) -> int:
    """See :meth:`Taskrail.submit`."""
    return client().submit(task_type, client_id, payload, idempotency_key=idempotency_key)


def submit_many(items: Iterable[NewTask | Mapping[str, Any]]) -> list[int]:
    """See :meth:`Taskrail.submit_many`."""
    return client().submit_many(items)


def get(task_id: int) -> TaskRecord:
    """See :meth:`Taskrail.get`."""
    return client().get(task_id)


def history(task_id: int) -> list[EventRecord]:
    """See :meth:`Taskrail.history`."""
    return client().history(task_id)


def retry(task_id: int) -> None:
    """See :meth:`Taskrail.retry`."""
    client().retry(task_id)
