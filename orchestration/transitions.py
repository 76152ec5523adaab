"""The transition store: the one place a task's status changes.

:func:`apply_transition` validates an event with :class:`TaskStateMachine` *before*
writing, then writes atomically: a compare-and-set update of the task row
(``WHERE id = :id AND status = :from``) and the ``task_events`` row, committed
together. On PostgreSQL that is a single statement (a data-modifying CTE), so one
round trip per transition; on SQLite it is an UPDATE ... RETURNING and an INSERT in
one transaction.

Outcomes are values, not exceptions: a lost race or a duplicate message is
``Outcome.STALE``; an unknown id is ``Outcome.NOT_FOUND``. An event the state machine
forbids raises ``TransitionNotAllowed`` and writes nothing.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Executable, bindparam, select, text
from statemachine.exceptions import TransitionNotAllowed

from orchestration import metrics
from orchestration.db import Database
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, events_table, tasks_table, utcnow
from orchestration.state_machine import TaskStateMachine

log = get_logger("taskrail.transitions")

__all__ = ["Outcome", "TransitionNotAllowed", "TransitionResult", "apply_transition", "plan"]


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

    @property
    def applied(self) -> bool:
        return self.outcome is Outcome.APPLIED


class _Draft:
    """The task as the state machine sees it during one transition."""


_local = threading.local()


def _machine() -> tuple[TaskStateMachine, _Draft]:
    """A thread's reusable machine; building one costs more than firing an event."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        draft = _Draft()
        draft.status = TaskStatus.PENDING  # type: ignore[attr-defined]
        pair = _local.pair = (TaskStateMachine(task=draft), draft)
    return pair


def plan(from_status: TaskStatus, event: str, **kwargs: Any) -> tuple[TaskStatus, dict[str, Any]]:
    """Validate ``event`` from ``from_status`` with the state machine.

    Returns the target status and the fields the machine's callbacks set
    (``assigned_agent``, ``completed_at``, ...). Raises TransitionNotAllowed.
    """
    sm, draft = _machine()
    draft.__dict__.clear()
    draft.status = from_status  # type: ignore[attr-defined]
    try:
        sm.send(event, **kwargs)
    except TransitionNotAllowed:
        raise
    except Exception:
        _local.pair = None
        raise
    changes = dict(draft.__dict__)
    to_status = TaskStatus(changes.pop("status"))
    if sm.is_terminated:  # a final state stops a machine for good; build a new one next time
        _local.pair = None
    return to_status, changes


def apply_transition(
    db: Database,
    task_id: int,
    event: str,
    *,
    expected: TaskStatus | None = None,
    agent: str | None = None,
    reason: str | None = None,
    worker: str | None = None,
    set_: Mapping[str, Any] | None = None,
    guard: Mapping[str, Any] | None = None,
    returning: Sequence[str] = (),
) -> TransitionResult:
    """Apply ``event`` to task ``task_id``: validate, compare-and-set, audit, commit.

    ``expected`` is the status the caller believes the task is in (a hop knows it); it
    saves loading the row. Without it the row is read first. ``set_`` adds column
    values to the update, ``guard`` adds equality conditions to the compare-and-set,
    ``returning`` names task columns to hand back in ``result.row``.

    Raises TransitionNotAllowed (nothing written) and DatabaseUnavailable.
    """
    # Postgres: each statement commits on its own (the write is one statement).
    # SQLite: load, update and audit share one transaction.
    with db.connect(autocommit=True) if db.is_postgres else db.begin() as conn:
        from_status = expected
        if from_status is None:
            stored = conn.execute(
                select(tasks_table.c.status).where(tasks_table.c.id == task_id)
            ).scalar_one_or_none()
            if stored is None:
                return TransitionResult(Outcome.NOT_FOUND, task_id, event)
            from_status = TaskStatus(stored)

        to_status, changes = plan(from_status, event, agent=agent, reason=reason)
        now = utcnow()
        values: dict[str, Any] = {**changes, **(set_ or {}), "status": to_status, "updated_at": now}
        guard = dict(guard or {})
        audit = {
            "event": event,
            "from_status": from_status,
            "to_status": to_status,
            "agent": agent if agent is not None else values.get("assigned_agent"),
            "detail": reason,
            "worker": worker,
            "at": now,
        }
        statements = _statements(
            db.is_postgres,
            tuple(sorted(values)),
            tuple(sorted((k, v is None) for k, v in guard.items())),
            tuple(returning),
        )
        params = {"task_id": task_id, "from_status": from_status}
        params.update({f"v_{k}": v for k, v in values.items()})
        params.update({f"g_{k}": v for k, v in guard.items() if v is not None})
        params.update({f"e_{k}": v for k, v in audit.items()})
        found = conn.execute(statements[0], params).mappings().first()
        row = dict(found) if found is not None else None
        if row is not None:
            audit["agent"] = audit["agent"] or row["assigned_agent"]
            if len(statements) > 1:
                params["e_agent"] = audit["agent"]
                conn.execute(statements[1], params)

    if row is None:
        return TransitionResult(Outcome.STALE, task_id, event, from_status, to_status)
    metrics.transition(event, audit["agent"])
    log.info(
        "task_transition",
        task_id=task_id,
        transition=event,
        from_status=from_status.value,
        to_status=to_status.value,
        agent=audit["agent"],
        detail=reason,
    )
    return TransitionResult(Outcome.APPLIED, task_id, event, from_status, to_status, row)


_AUDIT_COLUMNS = ("event", "from_status", "to_status", "agent", "detail", "worker", "at")


@functools.lru_cache(maxsize=256)
def _statements(
    one_statement: bool,
    value_cols: tuple[str, ...],
    guard_cols: tuple[tuple[str, bool], ...],
    returning: tuple[str, ...],
) -> tuple[Executable, ...]:
    """The compare-and-set and audit SQL for one shape of transition, built once.

    Plain SQL with typed bind parameters: building the same statement with Core on
    every call costs more than the round trip it makes.
    """
    t, ev = tasks_table.c, events_table.c
    sets = ", ".join(f"{c} = :v_{c}" for c in value_cols)
    where = " AND ".join(
        ["id = :task_id", "status = :from_status"]
        + [f"{c} IS NULL" if is_null else f"{c} = :g_{c}" for c, is_null in guard_cols]
    )
    ret = ", ".join(dict.fromkeys(["id", "assigned_agent", *returning]))
    cas = f"UPDATE tasks SET {sets} WHERE {where} RETURNING {ret}"
    audit_cols = ", ".join(_AUDIT_COLUMNS)
    # The event names the task's agent unless the caller names one.
    audit_vals = ", ".join(
        "COALESCE(:e_agent, assigned_agent)" if c == "agent" else f":e_{c}" for c in _AUDIT_COLUMNS
    )
    binds = [
        bindparam("task_id", type_=t.id.type),
        bindparam("from_status", type_=t.status.type),
        *(bindparam(f"v_{c}", type_=t[c].type) for c in value_cols),
        *(bindparam(f"g_{c}", type_=t[c].type) for c, is_null in guard_cols if not is_null),
        *(bindparam(f"e_{c}", type_=ev[c].type) for c in _AUDIT_COLUMNS),
    ]
    result_cols = [t[c] for c in dict.fromkeys(["id", "assigned_agent", *returning])]
    if one_statement:
        sql = (
            f"WITH changed AS ({cas}), audited AS ("
            f"INSERT INTO task_events (task_id, {audit_cols}) SELECT id, {audit_vals} FROM changed"
            f") SELECT {ret} FROM changed"
        )
        return (text(sql).bindparams(*binds).columns(*result_cols),)
    insert_sql = (
        f"INSERT INTO task_events (task_id, {audit_cols}) "
        f"VALUES (:task_id, {', '.join(f':e_{c}' for c in _AUDIT_COLUMNS)})"
    )
    audit_binds = [b for b in binds if b.key == "task_id" or b.key.startswith("e_")]
    cas_binds = [b for b in binds if not b.key.startswith("e_")]
    return (
        text(cas).bindparams(*cas_binds).columns(*result_cols),
        text(insert_sql).bindparams(*audit_binds),
    )
