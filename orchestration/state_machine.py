"""The task lifecycle as a python-statemachine machine, bound to the task's ``status``.

::

    pending -assign-> assigned -start-> in_progress -complete-> completed
    assigned, in_progress -fail-> failed -retry-> pending
    assigned, in_progress -escalate-> escalated
    escalated -resolve-> completed, -reopen-> pending, -reject-> failed   (a person)
    escalated -claim->, -unclaim-> escalated                      (a person; no change)
    pending, assigned, in_progress -cancel-> cancelled

What each move writes besides the status is one table, :data:`orchestration.moves.EFFECTS`.

The machine starts from the task's stored status (``model=task, state_field="status"``);
it never resets a task to pending. ``completed`` and ``cancelled`` are final.
``failed`` and ``escalated`` are not declared final (python-statemachine rejects a final
state with an outgoing transition) but only a person's explicit event moves them:
``retry`` a failed task; ``resolve``, ``reopen`` or ``reject`` an escalated one.
``claim`` and ``unclaim`` are self-transitions of ``escalated``: audited like every
move, validated by the machine, but the status stays.

An event that is not allowed from the current state raises ``TransitionNotAllowed``
before any callback runs, so the task object is left untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from statemachine import State, StateMachine
from statemachine.exceptions import TransitionNotAllowed

from orchestration.models import TaskStatus
from orchestration.moves import EFFECTS, LIFECYCLE_COLUMNS, Input

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
    escalated = State(value=TaskStatus.ESCALATED)
    cancelled = State(final=True, value=TaskStatus.CANCELLED)

    assign = pending.to(assigned)
    start = assigned.to(in_progress)
    complete = in_progress.to(completed)
    fail = in_progress.to(failed) | assigned.to(failed)
    escalate = in_progress.to(escalated) | assigned.to(escalated)
    retry = failed.to(pending)
    # A person's moves.
    resolve = escalated.to(completed)
    reopen = escalated.to(pending)
    reject = escalated.to(failed)
    claim = escalated.to.itself(internal=True)
    unclaim = escalated.to.itself(internal=True)
    cancel = pending.to(cancelled) | assigned.to(cancelled) | in_progress.to(cancelled)

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

    def on_resolve(self) -> None:
        self._apply_fields("resolve")

    def on_reopen(self) -> None:
        self._apply_fields("reopen")

    def _apply_fields(self, event: str, agent: str | None = None) -> None:
        for name, value in move_fields(event, agent).items():
            setattr(self.task, name, value)


# assign, start, complete, fail, escalate, retry, resolve, reopen, reject, claim,
# unclaim, cancel
EVENTS: tuple[str, ...] = tuple(EFFECTS)
# The events a person sends (the CLI, the console, the API's people's calls).
PEOPLE_EVENTS: tuple[str, ...] = (
    "retry",
    "resolve",
    "reopen",
    "reject",
    "claim",
    "unclaim",
    "cancel",
)


def move_fields(event: str, agent: str | None = None) -> dict[str, Any]:
    """The lifecycle fields a move sets on the task besides ``status``.

    The lifecycle part (:data:`~orchestration.moves.LIFECYCLE_COLUMNS`) of the event's
    row in :data:`orchestration.moves.EFFECTS`. The machine's callbacks (``on_assign``,
    ``on_complete``, ``on_retry``) apply exactly these; the transition store writes the
    whole row.
    """
    effects = EFFECTS.get(event)
    if effects is None:
        return {}
    values = effects.values({Input.AGENT: agent})
    return {name: value for name, value in values.items() if name in LIFECYCLE_COLUMNS}


def create_state_machine(task: Any, session: Session | None = None) -> TaskStateMachine:
    """A :class:`TaskStateMachine` bound to ``task``, starting from its stored status."""
    return TaskStateMachine(task=task, session=session)


__all__ = [
    "EVENTS",
    "PEOPLE_EVENTS",
    "TaskStateMachine",
    "TransitionNotAllowed",
    "create_state_machine",
    "move_fields",
]
