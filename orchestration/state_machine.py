"""The task lifecycle as a python-statemachine machine, bound to the task's ``status``.

::

    pending -assign-> assigned -start-> in_progress -complete-> completed
    assigned, in_progress -fail-> failed -retry-> pending
    assigned, in_progress -escalate-> escalated

The machine starts from the task's stored status (``model=task, state_field="status"``);
it never resets a task to pending. ``completed`` and ``escalated`` are final. ``failed``
is not declared final (python-statemachine rejects a final state with an outgoing
transition) but only an explicit ``retry`` moves it.

An event that is not allowed from the current state raises ``TransitionNotAllowed``
before any callback runs, so the task object is left untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from statemachine import State, StateMachine
from statemachine.exceptions import TransitionNotAllowed

from orchestration.models import TaskStatus, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class TaskStateMachine(StateMachine):
    """Validates lifecycle moves of one task and applies their field changes to it.

    The callbacks change only the bound object; persisting it is the transition
    store's job (:mod:`orchestration.store.transitions`).
    """

    pending = State(initial=True, value=TaskStatus.PENDING)
    assigned = State(value=TaskStatus.ASSIGNED)
    in_progress = State(value=TaskStatus.IN_PROGRESS)
    completed = State(final=True, value=TaskStatus.COMPLETED)
    failed = State(value=TaskStatus.FAILED)
    escalated = State(final=True, value=TaskStatus.ESCALATED)

    assign = pending.to(assigned)
    start = assigned.to(in_progress)
    complete = in_progress.to(completed)
    fail = in_progress.to(failed) | assigned.to(failed)
    escalate = in_progress.to(escalated) | assigned.to(escalated)
    retry = failed.to(pending)

    def __init__(self, task: Any, session: Session | None = None, **kwargs: Any) -> None:
        self.task = task
        self.session = session
        super().__init__(model=task, state_field="status", **kwargs)

    def on_assign(self, agent: str) -> None:
        self._apply_fields("assign", agent)

    def on_complete(self) -> None:
        self._apply_fields("complete")

    def on_retry(self) -> None:
        self._apply_fields("retry")

    def _apply_fields(self, event: str, agent: str | None = None) -> None:
        for name, value in move_fields(event, agent).items():
            setattr(self.task, name, value)


EVENTS: tuple[str, ...] = ("assign", "start", "complete", "fail", "escalate", "retry")


def move_fields(event: str, agent: str | None = None) -> dict[str, Any]:
    """The fields a move sets on the task besides ``status``.

    The machine's callbacks (``on_assign``, ``on_complete``, ``on_retry``) apply exactly
    these; the transition store writes them with the status.
    """
    if event == "assign":
        return {"assigned_agent": agent}
    if event == "complete":
        return {"completed_at": utcnow()}
    if event == "retry":
        return {"assigned_agent": None, "completed_at": None, "attempts": 0}
    return {}


def create_state_machine(task: Any, session: Session | None = None) -> TaskStateMachine:
    """A :class:`TaskStateMachine` bound to ``task``, starting from its stored status."""
    return TaskStateMachine(task=task, session=session)


__all__ = [
    "EVENTS",
    "TaskStateMachine",
    "TransitionNotAllowed",
    "create_state_machine",
    "move_fields",
]
