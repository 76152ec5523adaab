"""The producer API: submit work, read it back, retry what failed.

::

    from orchestration import api

    task_id = api.submit("personal_tax", client_id=42, payload={"year": 2025})
    api.get(task_id).status          # TaskStatus.PENDING ... COMPLETED
    api.history(task_id)             # one EventRecord per transition
    api.retry(task_id)               # failed -> pending, and back to the workers
    api.list_tasks(status="escalated", since="1d")   # newest first; after=<last id>
    api.claim(task_id, by="ana")     # an escalation: claim, then resolve / reopen / reject
    api.resolve(task_id, {"refund": 120}, by="ana", note="W-2 read from the scan")
    api.cancel(task_id, reason="client withdrew")
    api.retry_many(status="failed", task_type="personal_tax", dry_run=True)

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from orchestration import constants as c
from orchestration.agents import load_agent_modules, registry
from orchestration.errors import (
    AlreadyClaimed,
    BrokerUnavailable,
    InputError,
    InvalidFilter,
    InvalidPayload,
    InvalidTaskItem,
    NotClaimed,
    NotRetryable,
    ResultRejected,
    TaskNotFound,
    WriteConflict,
    WrongState,
    short_repr,
)
from orchestration.filters import TaskFilter, check_actor, check_limit, check_text
from orchestration.logging import get_logger
from orchestration.messaging.dispatch import Dispatcher, make_celery
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.moves import Move
from orchestration.settings import Settings, get_settings
from orchestration.store import listing
from orchestration.store.db import ConnectionTimeouts, Database
from orchestration.store.inserts import NewRow, insert_tasks
from orchestration.store.records import EventRecord, TaskRecord
from orchestration.store.transitions import (
    Outcome,
    TransitionNotAllowed,
    TransitionResult,
    TransitionStore,
    plan,
)
from orchestration.values import (
    check_client_id,
    check_idempotency_key,
    check_task_type,
    encode_payload,
    encode_result,
    escape_text,
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


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk retry or cancel did (or, in a dry run, would do)."""

    event: str
    matched: int  # tasks the filter matched
    moved: int  # tasks moved (0 in a dry run)
    skipped: int  # matched, but moved on before their batch was written
    first_ids: tuple[int, ...]  # the first (newest) ids moved, or matched in a dry run
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "dry_run": self.dry_run,
            "matched": self.matched,
            "moved": self.moved,
            "skipped": self.skipped,
            "first_ids": list(self.first_ids),
        }


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


_API_WORKER = "api"  # the audit rows' worker for a person's moves
_MOVE_TRIES = 5
_CANCELLED = "cancelled"  # a cancel's reason when none is given
_BULK_EVENTS = ("retry", "cancel")
# What each person's event needs, said in a WrongState error.
_ALLOWED = {
    "retry": "only failed tasks can be retried",
    "resolve": "only escalated tasks can be resolved",
    "reopen": "only escalated tasks can be reopened",
    "reject": "only escalated tasks can be rejected",
    "claim": "only escalated tasks can be claimed",
    "unclaim": "only escalated tasks can be unclaimed",
    "cancel": "only pending, assigned or in_progress tasks can be cancelled",
}


def _allowed_from(event: str, status: TaskStatus) -> bool:
    try:
        plan(status, event)
    except TransitionNotAllowed:
        return False
    return True


def _wrong_state(task_id: int, status: TaskStatus, event: str) -> WrongState:
    if event == "retry":
        return NotRetryable(task_id, status)
    return WrongState(task_id, status, _ALLOWED[event], event)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a person's move writes and checks besides its event's own effects, worked
    out from the task as read (raw columns: :attr:`Move.extra_columns`, ``extra_guard``)."""

    columns: Mapping[str, Any] = field(default_factory=dict)
    guard: Mapping[str, Any] = field(default_factory=dict)


_PLAIN = _Shape()


def _cancel_reason(reason: Any) -> str:
    """A cancel's reason: "cancelled" when none is given. Raises InvalidField."""
    why = check_text(reason, "reason", max_chars=c.MAX_REASON_CHARS, blank=False)
    return _CANCELLED if why is None else why


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

    def retry(self, task_id: int, *, by: str | None = None, note: str | None = None) -> None:
        """Move a failed task back to pending and send it to the workers again.

        ``by`` is who asks (default: the OS user); ``note`` goes to the audit event.
        Raises TaskNotFound, NotRetryable (the task is not failed), InvalidField.
        """
        moved = self._move(task_id, "retry", by=by, note=note, returning=("task_type",))
        self._enqueue_first_hops([(moved.task_id, moved.row["task_type"])])

    # -- a person's moves ---------------------------------------------------------

    def claim(self, task_id: int, *, by: str | None = None, note: str | None = None) -> None:
        """Take an escalated task: it shows as claimed by ``by`` (default: the OS user).

        Claiming a task one holds already does nothing (and writes nothing). Raises
        TaskNotFound, WrongState (not escalated), AlreadyClaimed (by someone else),
        InvalidField.
        """

        def shape(task: TaskRecord, actor: str) -> _Shape | None:
            if task.claimed_by == actor:
                return None
            if task.claimed_by is not None:
                raise AlreadyClaimed(task.id, task.claimed_by)
            return _Shape(guard={"claimed_by": None})

        self._move(task_id, "claim", by=by, note=note, shape=shape)

    def unclaim(self, task_id: int, *, by: str | None = None, note: str | None = None) -> None:
        """Give a claimed escalated task back to the inbox (anyone may; the audit says who).

        Raises TaskNotFound, WrongState (not escalated), NotClaimed, InvalidField.
        """

        def shape(task: TaskRecord, actor: str) -> _Shape:
            if task.claimed_by is None:
                raise NotClaimed(task.id)
            # The claim taken away is the one read (stored escaped, like all free text).
            return _Shape(guard={"claimed_by": escape_text(task.claimed_by)})

        self._move(task_id, "unclaim", by=by, note=note, shape=shape)

    def resolve(
        self, task_id: int, result: Any, *, by: str | None = None, note: str | None = None
    ) -> None:
        """Close an escalated task with the person's ``result`` (a JSON object):
        escalated -> completed. Raises TaskNotFound, WrongState, ResultRejected (not an
        object, or not storable: the reason says why), InvalidField."""
        if not isinstance(result, Mapping):
            raise ResultRejected(
                f"a resolution's result must be a JSON object, got {type(result).__name__}"
            )
        stored = encode_result(result)
        self._move(task_id, "resolve", by=by, note=note, result=stored)

    def reopen(
        self,
        task_id: int,
        *,
        payload: Mapping[str, Any] | None = None,
        by: str | None = None,
        note: str | None = None,
    ) -> None:
        """Hand an escalated task back to the agents: escalated -> pending, attempts from
        zero, no agent, the claim cleared, and its first hop sent. ``payload``'s fields
        are merged into the task's payload (the missing document); the merged payload
        must pass the payload's limits. Raises TaskNotFound, WrongState, InvalidPayload,
        InvalidField."""
        if payload is not None:
            if not isinstance(payload, Mapping):
                raise InvalidPayload(f"must be a JSON object, got {type(payload).__name__}")
            encode_payload(payload)  # its own fields must be storable, whatever the task

        def shape(task: TaskRecord, actor: str) -> _Shape:
            if not payload:
                return _PLAIN
            # The payload written is built from the one read: the move applies only to
            # the task as it was read (a reopen and a new escalation meanwhile would
            # change updated_at); otherwise it is read and merged again.
            return _Shape(
                columns={"payload": {**task.payload, **payload}},
                guard={"updated_at": task.updated_at},
            )

        moved = self._move(
            task_id, "reopen", by=by, note=note, returning=("task_type",), shape=shape
        )
        self._enqueue_first_hops([(moved.task_id, moved.row["task_type"])])

    def reject(
        self, task_id: int, reason: str, *, by: str | None = None, note: str | None = None
    ) -> None:
        """Close an escalated task as failed, with ``reason`` (required, not blank):
        escalated -> failed. Raises TaskNotFound, WrongState, InvalidField."""
        why = check_text(reason, "reason", max_chars=c.MAX_REASON_CHARS, required=True)
        self._move(task_id, "reject", by=by, note=note, reason=why)

    def cancel(
        self,
        task_id: int,
        *,
        reason: str | None = None,
        by: str | None = None,
        note: str | None = None,
    ) -> None:
        """Cancel a task that is pending, assigned or in progress: it becomes
        ``cancelled`` (final), with ``reason`` (default "cancelled") as its last error.
        A running handler's lease is released at once; the handler is told and its late
        result discarded. Raises TaskNotFound, WrongState, InvalidField."""
        self._move(task_id, "cancel", by=by, note=note, reason=_cancel_reason(reason))

    def _move(
        self,
        task_id: int,
        event: str,
        *,
        by: str | None,
        note: str | None,
        reason: str | None = None,
        result: Any = None,
        returning: tuple[str, ...] = (),
        shape: Callable[[TaskRecord, str], _Shape | None] | None = None,
    ) -> TransitionResult:
        """A person's ``event`` on one task, from the state it is in now.

        The task is read; the event must be allowed from its status (else WrongState
        naming that status; NotRetryable for a retry). ``shape(task, actor)`` may
        refuse the move (raise), find nothing to do (None: nothing is written) or add
        columns to write and to check. The write is a compare-and-set on the status
        read and the shape's checks: a task that changed in between (a hop ran, another
        person was first) is read and checked again, up to _MOVE_TRIES times in all
        (then WriteConflict). Returns the transition (not applied when there was
        nothing to do). Raises TaskNotFound, WrongState, InvalidField, what ``shape``
        raises, and ResultRejected / InvalidPayload for values that cannot be stored.
        """
        actor = check_actor(by)
        task_id = _check_task_id(task_id)
        note = check_text(note, "note")
        store = self._store()
        for _ in range(_MOVE_TRIES):
            task = self.get(task_id)
            if not _allowed_from(event, task.status):
                raise _wrong_state(task_id, task.status, event)
            extra = _PLAIN if shape is None else shape(task, actor)
            if extra is None:
                return TransitionResult(Outcome.STALE, task_id, event, task.status, task.status)
            moved = store.apply(
                Move(
                    task_id,
                    event,
                    expected=task.status,
                    actor=actor,
                    note=note,
                    reason=reason,
                    result=result,
                    returning=returning,
                    extra_columns=extra.columns,
                    extra_guard=extra.guard,
                )
            )
            if moved.applied:
                return moved
        raise WriteConflict(self.db.where, _MOVE_TRIES, f"task {task_id} kept changing")

    def _store(self) -> TransitionStore:
        return TransitionStore(self.db, worker=_API_WORKER)

    # -- many tasks at once --------------------------------------------------------

    def list_tasks(
        self,
        *,
        status: str | Iterable[Any] | None = None,
        task_type: str | None = None,
        client_id: int | None = None,
        agent: str | None = None,
        claimed_by: str | None = None,
        since: str | datetime | timedelta | None = None,
        limit: int = c.DEFAULT_LIST_LIMIT,
        after: int | None = None,
    ) -> list[TaskRecord]:
        """Tasks matching every given filter, newest first, at most ``limit``.

        ``status``: one name or several; ``since``: a duration back (``1h``, ``30m``,
        ``2d``), an ISO time or a datetime (by creation time); ``after``: the last id of
        the previous page (keyset pagination). Raises InvalidFilter, InvalidClientId.
        """
        flt = TaskFilter.build(
            status=status,
            task_type=task_type,
            client_id=client_id,
            agent=agent,
            claimed_by=claimed_by,
            since=since,
            after=after,
        )
        return listing.list_tasks(self.db, flt, check_limit(limit))

    def retry_many(
        self,
        *,
        status: str | Iterable[Any] | None = "failed",
        task_type: str | None = None,
        client_id: int | None = None,
        agent: str | None = None,
        since: str | datetime | timedelta | None = None,
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> BulkResult:
        """Retry every failed task matching the filters (see :meth:`bulk`)."""
        return self.bulk(
            "retry",
            TaskFilter.build(
                status=status, task_type=task_type, client_id=client_id, agent=agent, since=since
            ),
            dry_run=dry_run,
            by=by,
            note=note,
            progress=progress,
        )

    def cancel_many(
        self,
        *,
        status: str | Iterable[Any] | None,
        task_type: str | None = None,
        client_id: int | None = None,
        agent: str | None = None,
        since: str | datetime | timedelta | None = None,
        reason: str | None = None,
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> BulkResult:
        """Cancel every pending, assigned or in-progress task matching the filters
        (see :meth:`bulk`)."""
        return self.bulk(
            "cancel",
            TaskFilter.build(
                status=status, task_type=task_type, client_id=client_id, agent=agent, since=since
            ),
            reason=reason,
            dry_run=dry_run,
            by=by,
            note=note,
            progress=progress,
        )

    def bulk(
        self,
        event: str,
        flt: TaskFilter,
        *,
        reason: str | None = None,
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        batch: int = c.BULK_BATCH,
    ) -> BulkResult:
        """``event`` (``retry`` or ``cancel``) on every task matching ``flt``.

        The filter must name statuses, each one the event may leave (else
        InvalidFilter, nothing done). A dry run counts and shows the first ids and
        changes nothing. A real run walks the matching tasks newest first in batches of
        ``batch``; each batch is one statement on PostgreSQL that moves (and audits, one
        event per task, from the status it was in) the tasks still in a status the
        filter names; a task that moved on meanwhile is skipped and counted. Retried
        tasks are sent to the workers batch by batch. ``progress(done, total)`` is called
        after each batch. ``reason`` is each audit event's detail (a cancel's default:
        "cancelled"). Raises InvalidFilter, InvalidField.
        """
        if event not in _BULK_EVENTS:
            raise InvalidFilter(
                "event", f"bulk moves are {', '.join(_BULK_EVENTS)}, not {short_repr(event)}"
            )
        actor = check_actor(by)
        note = check_text(note, "note")
        if event == "cancel":
            reason = _cancel_reason(reason)
        else:
            reason = check_text(reason, "reason", max_chars=c.MAX_REASON_CHARS, blank=False)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidFilter("batch", f"expected a positive integer, got {short_repr(batch)}")
        if not isinstance(flt, TaskFilter):
            raise InvalidFilter("filter", f"expected a TaskFilter, got {type(flt).__name__}")
        if not flt.statuses:
            raise InvalidFilter("status", f"name the statuses to {event} (--status)")
        for status in flt.statuses:
            if not _allowed_from(event, status):
                raise InvalidFilter("status", f"{_ALLOWED[event]}, not {status.value} ones")
        total = listing.count_tasks(self.db, flt)
        if dry_run:
            first = next(listing.page_ids(self.db, flt, c.BULK_SHOWN_IDS), [])
            return BulkResult(event, total, 0, 0, tuple(first), dry_run=True)
        store = self._store()
        move = Move(0, event, actor=actor, note=note, reason=reason, returning=("task_type",))
        matched = moved = 0
        first_ids: list[int] = []
        for ids in listing.page_ids(self.db, flt, batch):
            matched += len(ids)
            done = store.apply_many(move, ids, flt.statuses)
            moved += len(done)
            if len(first_ids) < c.BULK_SHOWN_IDS:
                newest = sorted((r.task_id for r in done), reverse=True)
                first_ids += newest[: c.BULK_SHOWN_IDS - len(first_ids)]
            if event == "retry":
                self._enqueue_first_hops([(r.task_id, r.row["task_type"]) for r in done])
            if progress is not None:
                progress(matched, max(total, matched))
        return BulkResult(event, matched, moved, matched - moved, tuple(first_ids))

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


def retry(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.retry`."""
    client().retry(task_id, by=by, note=note)


def list_tasks(**filters: Any) -> list[TaskRecord]:
    """See :meth:`Taskrail.list_tasks`."""
    return client().list_tasks(**filters)


def claim(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.claim`."""
    client().claim(task_id, by=by, note=note)


def unclaim(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.unclaim`."""
    client().unclaim(task_id, by=by, note=note)


def resolve(task_id: int, result: Any, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.resolve`."""
    client().resolve(task_id, result, by=by, note=note)


def reopen(
    task_id: int,
    *,
    payload: Mapping[str, Any] | None = None,
    by: str | None = None,
    note: str | None = None,
) -> None:
    """See :meth:`Taskrail.reopen`."""
    client().reopen(task_id, payload=payload, by=by, note=note)


def reject(task_id: int, reason: str, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.reject`."""
    client().reject(task_id, reason, by=by, note=note)


def cancel(
    task_id: int, *, reason: str | None = None, by: str | None = None, note: str | None = None
) -> None:
    """See :meth:`Taskrail.cancel`."""
    client().cancel(task_id, reason=reason, by=by, note=note)


def retry_many(**filters: Any) -> BulkResult:
    """See :meth:`Taskrail.retry_many`."""
    return client().retry_many(**filters)


def cancel_many(**filters: Any) -> BulkResult:
    """See :meth:`Taskrail.cancel_many`."""
    return client().cancel_many(**filters)
