"""How a move is written: validated by the state machine, then one compare-and-set of the
task row plus its audit row (one statement on PostgreSQL, one transaction elsewhere).

:mod:`orchestration.store.transitions` is the store callers use; this module holds what
it runs. Values are made storable by :mod:`orchestration.values`' rules first.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Executable, bindparam, select, text
from statemachine.event import Event
from statemachine.exceptions import TransitionNotAllowed

from orchestration.constants import MAX_NOTE_CHARS
from orchestration.models import TaskStatus, events_table, tasks_table, utcnow
from orchestration.moves import EFFECTS, Effects, Input, Move
from orchestration.state_machine import TaskStateMachine, move_fields
from orchestration.store.db import Database
from orchestration.values import StoredJson, encode_payload, encode_result, storable_text


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    STALE = "stale"  # the row was not in the expected state: another worker won, or a duplicate
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class TransitionResult:
    outcome: Outcome
    task_id: int
    event: str
    from_status: TaskStatus | None = None
    to_status: TaskStatus | None = None
    row: Mapping[str, Any] = field(default_factory=dict)
    agent: str | None = None  # the agent the audit event names
    detail: str | None = None  # the audit event's detail (the reason, as stored)
    actor: str | None = None  # who made the move (the audit event's actor)

    @property
    def applied(self) -> bool:
        return self.outcome is Outcome.APPLIED


TransitionListener = Callable[[TransitionResult], None]


class _Draft:
    """The task as the state machine sees it during one transition."""


_local = threading.local()


def _machine() -> tuple[TaskStateMachine, _Draft]:
    """A thread's reusable machine; building one costs more than validating a move."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        draft = _Draft()
        draft.status = TaskStatus.PENDING  # type: ignore[attr-defined]
        pair = _local.pair = (TaskStateMachine(task=draft), draft)
    return pair


def plan(from_status: TaskStatus, event: str, **kwargs: Any) -> tuple[TaskStatus, dict[str, Any]]:
    """Validate ``event`` from ``from_status`` with the state machine.

    The thread's :class:`TaskStateMachine`, bound to a draft task in ``from_status``,
    lists the events enabled there (python-statemachine's ``enabled_events``, guards
    included, with ``kwargs``); ``event`` must be one of them, and the machine's
    transition for it from that state gives the target. The machine has one
    transition per (state, event) and no guards, so this is the verdict ``send`` would
    reach, without running the event through the engine's SCXML steps (~5x the cost,
    a quarter of a short hop's CPU): ``tests/unit/store/test_transitions.py`` checks
    both agree on every pair.

    Returns the target status and the lifecycle fields the move sets
    (:func:`move_fields`: ``assigned_agent``, ``completed_at``, ...). Raises
    TransitionNotAllowed.
    """
    return _verdict(from_status, event, **kwargs), move_fields(event, kwargs.get("agent"))


def _verdict(from_status: TaskStatus, event: str, **kwargs: Any) -> TaskStatus:
    """The target of ``event`` from ``from_status``. Raises TransitionNotAllowed."""
    sm, draft = _machine()
    draft.status = from_status  # type: ignore[attr-defined]
    if not any(enabled.id == event for enabled in sm.enabled_events(**kwargs)):
        declared = getattr(sm, event, None)
        refused = declared if isinstance(declared, Event) else Event(event, name=event)
        raise TransitionNotAllowed(refused, sm.configuration)
    return _target(from_status, event)


def _target(from_status: TaskStatus, event: str) -> TaskStatus:
    """Where the machine's transition for ``event`` out of ``from_status`` leads."""
    for transition in TaskStateMachine.states_map[from_status].transitions:
        if transition.match(event):
            return TaskStatus(transition.target.value)
    raise LookupError(f"no transition for {event!r} from {from_status}")  # enabled: unreachable


class _Increment:
    """A column value that adds one to the column in the same write."""

    def __repr__(self) -> str:
        return "INCREMENT"


_INCREMENT: Any = _Increment()
_NO_EFFECTS = Effects()  # an unknown event: refused before any write


@dataclass(frozen=True, slots=True)
class _Write:
    """A move as the back-ends write it: its row of EFFECTS resolved, values storable."""

    task_id: int
    event: str
    expected: TaskStatus | None
    agent: str | None
    reason: str | None
    worker: str | None
    actor: str | None  # the audit row's actor: the move's, else the worker
    note: str | None
    values: dict[str, Any]  # column -> value, or _INCREMENT; not status or updated_at
    guard: dict[str, Any]  # column -> value the row must hold (None: IS NULL)
    returning: tuple[str, ...]

    @classmethod
    def of(cls, move: Move, worker: str | None) -> _Write:
        """Raises ResultRejected, InvalidPayload."""
        reason = storable_text(move.reason) if move.reason is not None else None
        note = storable_text(move.note, MAX_NOTE_CHARS) if move.note is not None else None
        actor = storable_text(move.actor) if move.actor is not None else worker
        result = encode_result(move.result) if move.result is not None else None
        effects = EFFECTS.get(move.event, _NO_EFFECTS)
        inputs = {
            Input.AGENT: move.agent,
            Input.REASON: reason,
            Input.RESULT: result,
            Input.PRECLAIM: move.preclaim,
            Input.PRECLAIM_UNTIL: move.preclaim_until,
            Input.ACTOR: actor,
        }
        values = effects.values(inputs)
        for column in effects.increments:
            values[column] = _INCREMENT
        if move.extra_columns:
            values.update(_storable(move.extra_columns))
        return cls(
            move.task_id,
            move.event,
            move.expected,
            move.agent,
            reason,
            worker,
            actor,
            note,
            values,
            move.guard(),
            move.returning,
        )

    def event_agent(self) -> str | None:
        """The agent the audit row names, if known before the write."""
        return self.agent if self.agent is not None else self.values.get("assigned_agent")


_JSON_COLUMNS = frozenset({"payload", "result"})
_TEXT_COLUMNS = frozenset({"last_error"})


def _storable(set_: Mapping[str, Any]) -> Mapping[str, Any]:
    """``set_`` with its JSON values encoded and its free text made storable."""
    if _JSON_COLUMNS.isdisjoint(set_) and _TEXT_COLUMNS.isdisjoint(set_):
        return set_
    values = dict(set_)
    if "result" in values:
        values["result"] = encode_result(values["result"])
    if "payload" in values:
        values["payload"] = encode_payload(values["payload"])
    if values.get("last_error") is not None:
        values["last_error"] = storable_text(values["last_error"])
    return values


# -- PostgreSQL: one statement on the DB-API connection --------------------------------


_NOW: Any = object()  # a value written as the statement's now()


def _literal(word: str) -> str:
    """An event name or status as an SQL string literal (they are fixed, short words)."""
    if not word.replace("_", "").isalnum():
        raise ValueError(f"not a plain word: {word!r}")
    return f"'{word}'"


def _pg_sets(value_cols: tuple[tuple[str, Any], ...], to_status: str) -> str:
    """The SET list of a compare-and-set: one parameter per value, except counts and now."""

    def assignment(column: str, kind: Any) -> str:
        if kind is _INCREMENT:
            return f"{column} = tasks.{column} + 1"
        return f"{column} = now()" if kind is _NOW else f"{column} = %s"

    return ", ".join(
        [assignment(c, kind) for c, kind in value_cols] + [f"status = {_literal(to_status)}"]
    )


@functools.lru_cache(maxsize=512)
def _pg_statement(
    event: str,
    from_status: str,
    to_status: str,
    value_cols: tuple[tuple[str, Any], ...],
    guard_cols: tuple[tuple[str, bool], ...],
    returning: tuple[str, ...],
) -> tuple[str, tuple[str, ...]]:
    """The compare-and-set and audit insert of one shape of transition, as one statement.

    ``value_cols``: (column, _INCREMENT, _NOW or None for a parameter); ``guard_cols``:
    (column, is_null). The event and statuses are literals and the timestamps the
    transaction's ``now()``, so each shape is one prepared statement with few
    parameters. Returns the SQL and the names of the RETURNING columns.
    """
    sets = _pg_sets(value_cols, to_status)
    where = " AND ".join(
        ["id = %s", f"status = {_literal(from_status)}"]
        + [f"{c} IS NULL" if is_null else f"{c} = %s" for c, is_null in guard_cols]
    )
    cols = tuple(dict.fromkeys(["id", "assigned_agent", *returning]))
    ret = ", ".join(cols)
    audit_cols = ", ".join(_AUDIT_COLUMNS)
    event_lit, from_lit, to_lit = _literal(event), _literal(from_status), _literal(to_status)
    sql = (
        f"WITH changed AS (UPDATE tasks SET {sets} WHERE {where} RETURNING {ret}), "
        f"audited AS (INSERT INTO task_events (task_id, {audit_cols}) "
        f"SELECT id, {event_lit}, {from_lit}, {to_lit}, COALESCE(%s, assigned_agent), "
        f"%s, %s, %s, %s, now() FROM changed) "
        f"SELECT {ret} FROM changed"
    )
    return sql, cols


@functools.lru_cache(maxsize=128)
def _pg_many_statement(
    event: str,
    from_statuses: tuple[str, ...],
    to_status: str,
    value_cols: tuple[tuple[str, Any], ...],
    guard_cols: tuple[tuple[str, bool], ...],
    returning: tuple[str, ...],
) -> tuple[str, tuple[str, ...]]:
    """:func:`_pg_statement` for a list of tasks (the id parameter an array), each in one
    of ``from_statuses``: one statement moves them all, each with its audit row.

    The listed tasks in one of the statuses are locked in id order (two bulk moves
    over the same tasks wait for each other instead of deadlocking) and their status is
    read under the lock: nothing can change it before the update, which therefore
    matches on the id alone (the status in the statement's snapshot may be older: a
    hop that held the row moved it while the lock was awaited). So each audit row names
    the status its task left, also for a task a hop moved between two of the statuses;
    a task a hop moved out of them is not moved. The last RETURNING column is
    ``from_status``.
    """
    sets = _pg_sets(value_cols, to_status)
    statuses = ", ".join(_literal(s) for s in from_statuses)
    where = " AND ".join(
        ["tasks.id = old.id"]
        + [f"tasks.{c} IS NULL" if is_null else f"tasks.{c} = %s" for c, is_null in guard_cols]
    )
    cols = tuple(dict.fromkeys(["id", "assigned_agent", *returning]))
    audit_cols = ", ".join(_AUDIT_COLUMNS)
    ret = ", ".join(cols)
    sql = (
        f"WITH old AS (SELECT id, status FROM tasks WHERE id = ANY(%s) "
        f"AND status IN ({statuses}) ORDER BY id FOR UPDATE), "
        f"changed AS (UPDATE tasks SET {sets} FROM old WHERE {where} "
        f"RETURNING {', '.join(f'tasks.{c}' for c in cols)}, old.status AS from_status), "
        f"audited AS (INSERT INTO task_events (task_id, {audit_cols}) "
        f"SELECT id, {_literal(event)}, from_status, {_literal(to_status)}, "
        f"COALESCE(%s, assigned_agent), %s, %s, %s, %s, now() FROM changed) "
        f"SELECT {ret}, from_status FROM changed"
    )
    return sql, (*cols, "from_status")


def _as_is(text: str) -> str:
    return text


def _pg_param(column: str, value: Any) -> Any:
    if isinstance(value, StoredJson):
        return Jsonb(value.text, dumps=_as_is)
    if column in _JSON_COLUMNS:
        return Jsonb(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _applied(
    write: _Write,
    from_status: TaskStatus,
    to_status: TaskStatus,
    row: dict[str, Any],
    event_agent: str | None,
) -> TransitionResult:
    """``write`` applied from ``from_status``: ``row`` as the write returned it,
    ``event_agent`` the agent its audit event names."""
    return TransitionResult(
        Outcome.APPLIED,
        write.task_id,
        write.event,
        from_status,
        to_status,
        row,
        event_agent,
        write.reason,
        write.actor,
    )


def _apply_postgres(db: Database, write: _Write) -> TransitionResult:
    task_id, event = write.task_id, write.event
    with db.driver_connection() as conn:
        from_status = write.expected
        if from_status is None:
            stored = conn.execute("SELECT status FROM tasks WHERE id = %s", (task_id,)).fetchone()
            if stored is None:
                return TransitionResult(Outcome.NOT_FOUND, task_id, event)
            from_status = TaskStatus(stored[0])
        to_status = _verdict(from_status, event, agent=write.agent, reason=write.reason)
        values: dict[str, Any] = {**write.values, "updated_at": _NOW}
        guard = write.guard
        value_cols = tuple(
            (c, v if v is _INCREMENT or v is _NOW else None) for c, v in values.items()
        )
        guard_cols = tuple((c, v is None) for c, v in guard.items())
        sql, cols = _pg_statement(
            event, from_status.value, to_status.value, value_cols, guard_cols, write.returning
        )
        params: list[Any] = [
            _pg_param(c, v) for c, v in values.items() if v is not _INCREMENT and v is not _NOW
        ]
        params.append(task_id)
        params += [_pg_param(c, v) for c, v in guard.items() if v is not None]
        event_agent = write.event_agent()
        params += [event_agent, write.reason, write.worker, write.actor, write.note]
        found = conn.execute(sql, params, prepare=True).fetchone()
    if found is None:
        return TransitionResult(Outcome.STALE, task_id, event, from_status, to_status)
    row = dict(zip(cols, found, strict=True))
    if event_agent is None:
        event_agent = row["assigned_agent"]
    return _applied(write, from_status, to_status, row, event_agent)


def _many_target(write: _Write, from_statuses: tuple[TaskStatus, ...]) -> TaskStatus:
    """Where ``write``'s event leads from each of ``from_statuses`` (the same place).

    Raises TransitionNotAllowed when the event may not leave one of them.
    """
    targets = {
        _verdict(status, write.event, agent=write.agent, reason=write.reason)
        for status in from_statuses
    }
    if len(targets) != 1:
        raise ValueError(f"{write.event} leads to {sorted(targets)} from {from_statuses}")
    return targets.pop()


def _apply_many_postgres(
    db: Database, write: _Write, ids: list[int], from_statuses: tuple[TaskStatus, ...]
) -> tuple[TaskStatus, list[dict[str, Any]]]:
    """``write``'s event for every task of ``ids`` in one of ``from_statuses``: one
    statement (:func:`_pg_many_statement`).

    Returns the target status and the moved tasks' rows, each with its
    ``from_status``. Raises TransitionNotAllowed.
    """
    to_status = _many_target(write, from_statuses)
    if not ids:
        return to_status, []
    values: dict[str, Any] = {**write.values, "updated_at": _NOW}
    value_cols = tuple((c, v if v is _INCREMENT or v is _NOW else None) for c, v in values.items())
    guard_cols = tuple((c, v is None) for c, v in write.guard.items())
    sql, cols = _pg_many_statement(
        write.event,
        tuple(s.value for s in from_statuses),
        to_status.value,
        value_cols,
        guard_cols,
        write.returning,
    )
    # In the statement's order: the ids (old), the values (SET), the guards, the audit.
    params: list[Any] = [list(ids)]
    params += [_pg_param(c, v) for c, v in values.items() if v is not _INCREMENT and v is not _NOW]
    params += [_pg_param(c, v) for c, v in write.guard.items() if v is not None]
    params += [write.event_agent(), write.reason, write.worker, write.actor, write.note]
    with db.driver_connection() as conn:
        rows = conn.execute(sql, params).fetchall()
    moved = [dict(zip(cols, row, strict=True)) for row in rows]
    for row in moved:
        row["from_status"] = TaskStatus(row["from_status"])
    return to_status, moved


# -- SQLite (and any other dialect): SQLAlchemy, one transaction -----------------------


def _apply_sqlalchemy(db: Database, write: _Write) -> TransitionResult:
    task_id, event = write.task_id, write.event
    with db.begin() as conn:
        from_status = write.expected
        if from_status is None:
            stored = conn.execute(
                select(tasks_table.c.status).where(tasks_table.c.id == task_id)
            ).scalar_one_or_none()
            if stored is None:
                return TransitionResult(Outcome.NOT_FOUND, task_id, event)
            from_status = TaskStatus(stored)
        to_status = _verdict(from_status, event, agent=write.agent, reason=write.reason)
        now = utcnow()
        values = {**write.values, "status": to_status, "updated_at": now}
        guard = write.guard
        increments = tuple(sorted(c for c, v in values.items() if v is _INCREMENT))
        values = {c: v for c, v in values.items() if v is not _INCREMENT}
        cas, insert = _statements(
            tuple(sorted(values)),
            increments,
            tuple(sorted((k, v is None) for k, v in guard.items())),
            write.returning,
        )
        event_agent = write.event_agent()
        params: dict[str, Any] = {"task_id": task_id, "from_status": from_status}
        params.update({f"v_{k}": _sqlite_param(v) for k, v in values.items()})
        params.update({f"g_{k}": v for k, v in guard.items() if v is not None})
        found = conn.execute(cas, params).mappings().first()
        if found is None:
            return TransitionResult(Outcome.STALE, task_id, event, from_status, to_status)
        row = dict(found)
        if event_agent is None:
            event_agent = row["assigned_agent"]
        audit = {
            "task_id": task_id,
            "e_event": event,
            "e_from_status": from_status,
            "e_to_status": to_status,
            "e_agent": event_agent,
            "e_detail": write.reason,
            "e_worker": write.worker,
            "e_actor": write.actor,
            "e_note": write.note,
            "e_at": now,
        }
        conn.execute(insert, audit)
    return _applied(write, from_status, to_status, row, event_agent)


def _apply_many_sqlalchemy(
    db: Database, write: _Write, ids: list[int], from_statuses: tuple[TaskStatus, ...]
) -> tuple[TaskStatus, list[dict[str, Any]]]:
    """As :func:`_apply_many_postgres`: the listed tasks' statuses are read, then each
    task in one of ``from_statuses`` is moved by a compare-and-set on the status read,
    a transaction per task (the embedded default)."""
    to_status = _many_target(write, from_statuses)
    moved: list[dict[str, Any]] = []
    if not ids:
        return to_status, moved
    t = tasks_table.c
    with db.connect() as conn:
        found = conn.execute(
            select(t.id, t.status).where(t.id.in_(ids), t.status.in_(from_statuses)).order_by(t.id)
        ).all()
    for task_id, status in found:
        one = dataclasses.replace(write, task_id=task_id, expected=TaskStatus(status))
        result = _apply_sqlalchemy(db, one)
        if result.outcome is Outcome.APPLIED:
            moved.append({**result.row, "from_status": result.from_status})
    return to_status, moved


def _sqlite_param(value: Any) -> Any:
    """A StoredJson's text; a number at its top as bytes, which SQLite stores as they
    are (a JSON column's affinity would turn the text 1.0 into the integer 1)."""
    if not isinstance(value, StoredJson):
        return value
    text_ = value.text
    return text_.encode() if text_[0] in "-0123456789" else text_


_AUDIT_COLUMNS = (
    "event",
    "from_status",
    "to_status",
    "agent",
    "detail",
    "worker",
    "actor",
    "note",
    "at",
)


@functools.lru_cache(maxsize=256)
def _statements(
    value_cols: tuple[str, ...],
    increments: tuple[str, ...],
    guard_cols: tuple[tuple[str, bool], ...],
    returning: tuple[str, ...],
) -> tuple[Executable, Executable]:
    """The compare-and-set and the audit insert of one shape of transition, built once.

    Plain SQL with typed bind parameters (JSON columns take their stored text as it
    is): building the same statement with Core on every call costs more than the
    round trip it makes.
    """
    t, ev = tasks_table.c, events_table.c
    sets = ", ".join([f"{c} = :v_{c}" for c in value_cols] + [f"{c} = {c} + 1" for c in increments])
    where = " AND ".join(
        ["id = :task_id", "status = :from_status"]
        + [f"{c} IS NULL" if is_null else f"{c} = :g_{c}" for c, is_null in guard_cols]
    )
    cols = list(dict.fromkeys(["id", "assigned_agent", *returning]))
    cas = f"UPDATE tasks SET {sets} WHERE {where} RETURNING {', '.join(cols)}"
    cas_binds = [
        bindparam("task_id", type_=t.id.type),
        bindparam("from_status", type_=t.status.type),
        *(
            bindparam(f"v_{c}") if c in _JSON_COLUMNS else bindparam(f"v_{c}", type_=t[c].type)
            for c in value_cols
        ),
        *(bindparam(f"g_{c}", type_=t[c].type) for c, is_null in guard_cols if not is_null),
    ]
    insert_sql = (
        f"INSERT INTO task_events (task_id, {', '.join(_AUDIT_COLUMNS)}) "
        f"VALUES (:task_id, {', '.join(f':e_{c}' for c in _AUDIT_COLUMNS)})"
    )
    audit_binds = [bindparam("task_id", type_=t.id.type)] + [
        bindparam(f"e_{c}", type_=ev[c].type) for c in _AUDIT_COLUMNS
    ]
    return (
        text(cas).bindparams(*cas_binds).columns(*(t[c] for c in cols)),
        text(insert_sql).bindparams(*audit_binds),
    )
