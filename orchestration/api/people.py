"""A person's moves on one task: retry, claim, unclaim, resolve, reopen, reject, cancel.

Each reads the task, checks that its event may leave the status it is in, and writes
the move with its audit event (the actor, the note) as a compare-and-set on what it
read (:meth:`PeopleMoves._move`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestration import constants as c
from orchestration.api.base import TaskrailBase, _check_task_id
from orchestration.errors import (
    AlreadyClaimed,
    InvalidPayload,
    NotClaimed,
    NotRetryable,
    ResultRejected,
    WriteConflict,
    WrongState,
)
from orchestration.filters import check_actor, check_text
from orchestration.models import TaskStatus
from orchestration.moves import Move
from orchestration.store.records import TaskRecord
from orchestration.store.transitions import (
    Outcome,
    TransitionNotAllowed,
    TransitionResult,
    plan,
)
from orchestration.values import encode_payload, encode_result, escape_text

_MOVE_TRIES = 5
_CANCELLED = "cancelled"  # a cancel's reason when none is given
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


def _cancel_reason(reason: Any) -> str:
    """A cancel's reason: "cancelled" when none is given. Raises InvalidField."""
    why = check_text(reason, "reason", max_chars=c.MAX_REASON_CHARS, blank=False)
    return _CANCELLED if why is None else why


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a person's move writes and checks besides its event's own effects, worked
    out from the task as read (raw columns: :attr:`Move.extra_columns`, ``extra_guard``)."""

    columns: Mapping[str, Any] = field(default_factory=dict)
    guard: Mapping[str, Any] = field(default_factory=dict)


_PLAIN = _Shape()


class PeopleMoves(TaskrailBase):
    """:class:`~orchestration.api.Taskrail`'s moves on one task, by a person."""

    def retry(self, task_id: int, *, by: str | None = None, note: str | None = None) -> None:
        """Move a failed task back to pending and send it to the workers again.

        ``by`` is who asks (default: the OS user); ``note`` goes to the audit event.
        Raises TaskNotFound, NotRetryable (the task is not failed), InvalidField.
        """
        moved = self._move(task_id, "retry", by=by, note=note, returning=("task_type",))
        self._enqueue_first_hops([(moved.task_id, moved.row["task_type"])])

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
