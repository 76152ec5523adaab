"""What each lifecycle move writes, in one table, and the value object that asks for one.

::

    event     sets                                   clears                     counts up
    assign    assigned_agent <- agent
    start     lease_owner <- preclaim,                                          attempts
              lease_expires_at <- preclaim_until
    complete  completed_at <- now, result <- result  the run's lease and deferral
    fail      last_error <- reason                   the run's lease and deferral
    escalate  last_error <- reason                   the run's lease and deferral
    retry     attempts <- 0                          assigned_agent, completed_at,
                                                     the claim
    resolve   completed_at <- now, result <- result
    reopen    attempts <- 0                          assigned_agent, completed_at,
                                                     the claim
    reject    last_error <- reason
    claim     claimed_by <- actor, claimed_at <- now
    unclaim                                          the claim
    cancel    last_error <- reason                   the run's lease and deferral

"The claim" is :data:`CLAIM_COLUMNS`: a task sent back to the agents (retry, reopen)
is no longer anyone's; resolve and reject keep it on record. A person's move names its
``actor``; every move may carry a ``note``; both go to the audit row only (claim also
sets ``claimed_by``).

"The run's lease and deferral" is :data:`RUN_COLUMNS`. A set whose input the
:class:`Move` leaves None is not written. Every move also writes ``status`` and
``updated_at``. :class:`~orchestration.state_machine.TaskStateMachine` applies the
lifecycle part (:data:`LIFECYCLE_COLUMNS`) to a task object; the transition store
(:mod:`orchestration.store.transitions`) writes all of it with the compare-and-set and
the audit row.

Bookkeeping outside transitions: :mod:`orchestration.store.leases` changes
``attempts``, ``not_before``, ``deferred_since`` and the lease columns of an
in-progress task without a move: ``take`` counts the next attempt, ``release`` gives a
lease back with the next attempt's due time (and, unused, the attempt), ``defer``
records a breaker deferral (and gives a pre-claimed attempt back). None changes the
status, and the audit trail records status changes only, so they write no event; each
is one statement on a row the caller holds or that no live lease holds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestration.models import TaskStatus, utcnow

__all__ = [
    "CLAIM_COLUMNS",
    "EFFECTS",
    "LIFECYCLE_COLUMNS",
    "RUN_COLUMNS",
    "Effects",
    "Input",
    "Move",
]


class Input(enum.Enum):
    """Where a set column's value comes from: a field of the :class:`Move`, or the clock."""

    AGENT = "agent"
    REASON = "reason"
    RESULT = "result"
    PRECLAIM = "preclaim"
    PRECLAIM_UNTIL = "preclaim_until"
    ACTOR = "actor"
    NOW = "now"  # the time the move is planned (UTC)


@dataclass(frozen=True, slots=True)
class Effects:
    """One event's writes besides ``status`` and ``updated_at``."""

    sets: Mapping[str, Input | int] = field(default_factory=dict)  # column <- input or constant
    clears: tuple[str, ...] = ()  # columns set to NULL
    increments: tuple[str, ...] = ()  # columns counted up by one in the same write

    def values(self, inputs: Mapping[Input, Any]) -> dict[str, Any]:
        """The sets and clears as column values; a set whose input is None is left out."""
        values: dict[str, Any] = {}
        for column, source in self.sets.items():
            if not isinstance(source, Input):
                values[column] = source
            elif source is Input.NOW:
                values[column] = utcnow()
            elif (value := inputs.get(source)) is not None:
                values[column] = value
        for column in self.clears:
            values[column] = None
        return values


# A run's lease and its breaker deferral: a move that ends the run clears them.
RUN_COLUMNS = ("lease_owner", "lease_expires_at", "not_before", "deferred_since")
# Who handles an escalation: a retry or a reopen hands the task back to the agents.
CLAIM_COLUMNS = ("claimed_by", "claimed_at")

EFFECTS: Mapping[str, Effects] = {
    "assign": Effects(sets={"assigned_agent": Input.AGENT}),
    "start": Effects(
        sets={"lease_owner": Input.PRECLAIM, "lease_expires_at": Input.PRECLAIM_UNTIL},
        increments=("attempts",),
    ),
    "complete": Effects(
        sets={"completed_at": Input.NOW, "result": Input.RESULT}, clears=RUN_COLUMNS
    ),
    "fail": Effects(sets={"last_error": Input.REASON}, clears=RUN_COLUMNS),
    "escalate": Effects(sets={"last_error": Input.REASON}, clears=RUN_COLUMNS),
    "retry": Effects(
        sets={"attempts": 0}, clears=("assigned_agent", "completed_at", *CLAIM_COLUMNS)
    ),
    "resolve": Effects(sets={"completed_at": Input.NOW, "result": Input.RESULT}),
    "reopen": Effects(
        sets={"attempts": 0}, clears=("assigned_agent", "completed_at", *CLAIM_COLUMNS)
    ),
    "reject": Effects(sets={"last_error": Input.REASON}),
    "claim": Effects(sets={"claimed_by": Input.ACTOR, "claimed_at": Input.NOW}),
    "unclaim": Effects(clears=CLAIM_COLUMNS),
    "cancel": Effects(sets={"last_error": Input.REASON}, clears=RUN_COLUMNS),
}

# What the state machine applies to a task object: who has the task, when it was done,
# and retry's fresh count. The rest belongs to an execution and only the store writes it.
LIFECYCLE_COLUMNS = frozenset({"assigned_agent", "completed_at", "attempts"})


@dataclass(frozen=True, slots=True)
class Move:
    """One event for one task, with the inputs its :data:`EFFECTS` row reads.

    The compare-and-set always checks the task's status (``expected``, or the stored
    one when None); ``lease``, ``attempts`` and ``task_type``, when given, are checked
    too. ``extra_columns`` and ``extra_guard`` write and check raw columns (None: IS
    NULL) for tools and tests that put a row in a given state
    (:func:`orchestration.store.transitions.apply_transition`); the hops never use them.
    """

    task_id: int
    event: str
    expected: TaskStatus | None = None
    agent: str | None = None  # assign: the agent; otherwise the agent the audit row names
    reason: str | None = None  # the audit row's detail; fail and escalate: last_error
    result: Any = None  # complete: the result (a StoredJson, or a value to encode)
    lease: str | None = None  # the run lease the row must be held by
    attempts: int | None = None  # the attempts the row must have counted
    task_type: str | None = None  # the task type the row must have
    preclaim: str | None = None  # start: the token the counted attempt is leased to
    preclaim_until: datetime | None = None  # start: when that lease lapses
    actor: str | None = None  # who makes the move (default: the store's worker)
    note: str | None = None  # what they said about it (the audit row's note)
    returning: tuple[str, ...] = ()  # task columns to hand back in the result's row
    extra_columns: Mapping[str, Any] = field(default_factory=dict)
    extra_guard: Mapping[str, Any] = field(default_factory=dict)

    def guard(self) -> dict[str, Any]:
        """The columns the compare-and-set checks besides the status."""
        guard = dict(self.extra_guard)
        if self.lease is not None:
            guard["lease_owner"] = self.lease
        if self.attempts is not None:
            guard["attempts"] = self.attempts
        if self.task_type is not None:
            guard["task_type"] = self.task_type
        return guard
