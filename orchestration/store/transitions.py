"""The transition store: the one place a task's status changes.

:class:`TransitionStore` applies a :class:`~orchestration.moves.Move`: it validates the
event with :class:`TaskStateMachine` *before* writing, then writes atomically what the
event's row of :data:`orchestration.moves.EFFECTS` says, as a compare-and-set update
of the task row (``WHERE id = :id AND status = :from`` and the move's guards) and the
``task_events`` row, committed together. On PostgreSQL that is a single statement (a
data-modifying CTE), so one round trip per transition; on SQLite it is an UPDATE ...
RETURNING and an INSERT in one transaction. After the commit each listener hears of
the transition (the log line by default; the worker runtime adds the metric).

Outcomes are values, not exceptions: a lost race or a duplicate message is
``Outcome.STALE``; an unknown id is ``Outcome.NOT_FOUND``. An event the state machine
forbids raises ``TransitionNotAllowed`` and writes nothing.

Every value is stored by :mod:`orchestration.values`' rules, whoever the caller: a
``reason`` and a ``last_error`` are cut to ``MAX_REASON_CHARS`` and escaped (NUL,
surrogates), a ``result`` or ``payload`` is encoded (or passed as a ``StoredJson``);
one that cannot be stored raises ResultRejected / InvalidPayload before anything is
written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from statemachine.exceptions import TransitionNotAllowed

from orchestration.logging import get_logger
from orchestration.models import TaskStatus
from orchestration.moves import Move
from orchestration.store.db import Database
from orchestration.store.writes import (
    Outcome,
    TransitionListener,
    TransitionResult,
    _apply_many_postgres,
    _apply_many_sqlalchemy,
    _apply_postgres,
    _apply_sqlalchemy,
    _Write,
    plan,
)

log = get_logger("taskrail.transitions")

__all__ = [
    "DEFAULT_LISTENERS",
    "Move",
    "Outcome",
    "TransitionListener",
    "TransitionNotAllowed",
    "TransitionResult",
    "TransitionStore",
    "apply_transition",
    "log_transition",
    "plan",
]


def log_transition(result: TransitionResult) -> None:
    """The ``task_transition`` log line of an applied transition."""
    assert result.from_status is not None and result.to_status is not None
    log.info(
        "task_transition",
        task_id=result.task_id,
        transition=result.event,
        from_status=result.from_status.value,
        to_status=result.to_status.value,
        agent=result.agent,
        detail=result.detail,
        actor=result.actor,
    )


# Every store logs its transitions unless told otherwise: hops, producers (a retry) and
# the CLI write transitions, and each must leave the same line as the audit row.
DEFAULT_LISTENERS: tuple[TransitionListener, ...] = (log_transition,)


class TransitionStore:
    """Applies moves to one database as ``worker`` and tells the listeners of each one.

    ``listeners`` are called, in order, with every transition applied, after its
    commit; one that raises is logged and the others still run (the transition
    stands). By default the store logs each transition (:func:`log_transition`).
    """

    def __init__(
        self,
        db: Database,
        *,
        worker: str | None = None,
        listeners: Iterable[TransitionListener] = DEFAULT_LISTENERS,
    ) -> None:
        self.db = db
        self.worker = worker
        self.listeners: tuple[TransitionListener, ...] = tuple(listeners)

    def apply(self, move: Move) -> TransitionResult:
        """Apply ``move``: validate, compare-and-set, audit, commit, then tell the listeners.

        Without ``move.expected`` the row's status is read first. Raises
        TransitionNotAllowed, ResultRejected, InvalidPayload (nothing written) and
        DatabaseUnavailable.
        """
        write = _Write.of(move, self.worker)
        if self.db.is_postgres:
            result = _apply_postgres(self.db, write)
        else:
            result = _apply_sqlalchemy(self.db, write)
        if result.outcome is Outcome.APPLIED:
            self._tell(result)
        return result

    def apply_many(
        self,
        move: Move,
        task_ids: Sequence[int],
        from_status: TaskStatus | Iterable[TaskStatus],
    ) -> list[TransitionResult]:
        """Apply ``move``'s event to every task of ``task_ids`` that is in ``from_status``
        (one status, or several the event leads from to one place) and passes the
        move's guards; the others are left as they are.

        One statement on PostgreSQL; each moved task gets its own audit row naming the
        status it left, and the listeners hear of each. ``move.task_id`` is ignored.
        Returns the applied transitions. Raises TransitionNotAllowed (nothing written)
        when the event may not leave one of the statuses.
        """
        statuses = (
            (from_status,)
            if isinstance(from_status, TaskStatus)
            else tuple(dict.fromkeys(from_status))
        )
        if not statuses:
            return []
        write = _Write.of(move, self.worker)
        apply = _apply_many_postgres if self.db.is_postgres else _apply_many_sqlalchemy
        to_status, rows = apply(self.db, write, list(task_ids), statuses)
        results = []
        for row in rows:
            left = row.pop("from_status")
            agent = write.event_agent() or row.get("assigned_agent")
            result = TransitionResult(
                Outcome.APPLIED,
                int(row["id"]),
                move.event,
                left,
                to_status,
                row,
                agent,
                write.reason,
                write.actor,
            )
            self._tell(result)
            results.append(result)
        return results

    def _tell(self, result: TransitionResult) -> None:
        for listener in self.listeners:
            try:
                listener(result)
            except Exception as err:
                log.warning(
                    "transition_listener_failed",
                    listener=getattr(listener, "__qualname__", repr(listener)),
                    task_id=result.task_id,
                    transition=result.event,
                    error=f"{type(err).__name__}: {err}",
                )


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
    """Apply ``event`` to task ``task_id`` through a :class:`TransitionStore` that logs.

    For producers, tools and tests. ``set_`` adds raw column values and ``guard``
    raw equality conditions (None: IS NULL) to the event's own writes
    (:attr:`Move.extra_columns`, :attr:`Move.extra_guard`); ``returning`` names task
    columns to hand back in ``result.row``. Raises as :meth:`TransitionStore.apply`.
    """
    move = Move(
        task_id,
        event,
        expected=expected,
        agent=agent,
        reason=reason,
        returning=tuple(returning),
        extra_columns=set_ or {},
        extra_guard=guard or {},
    )
    return TransitionStore(db, worker=worker).apply(move)
