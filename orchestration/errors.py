"""Every error taskrail raises, under one root.

::

    TaskrailError
    ├── InputError                 bad input from a producer or operator; nothing was written
    │   ├── UnknownTaskType        no agent handles the task type (lists the known ones)
    │   │   └── InvalidTaskType    not a string of 1 to 64 characters a column can hold
    │   ├── InvalidPayload         payload is not a JSON object / not JSON-serialisable
    │   │   └── InvalidIdempotencyKey  not a string of 1-255 characters taskrail can store
    │   ├── InvalidTaskItem        an item of submit_many that is not a task (names its index)
    │   ├── ResultRejected         a result taskrail cannot store (a handler's or a person's)
    │   ├── InvalidClientId        client id missing, not an integer, or outside 0 .. 2**63-1
    │   ├── TaskNotFound           no task with that id
    │   ├── WrongState             a person's move from a state that does not allow it
    │   │   └── NotRetryable       retry of a task that is not failed
    │   ├── AlreadyClaimed         claim of an escalation someone else holds (names them)
    │   ├── NotClaimed             unclaim of an escalation no one holds
    │   ├── InvalidFilter          a filter of ``list`` or a bulk move that cannot be used
    │   ├── InvalidField           who (``by``), a note or a reason that cannot be stored
    │   ├── NotAHop                bytes on a taskrail queue that are not a valid hop
    │   ├── MalformedMessage       a hop's arguments do not parse (dropped, never retried)
    │   ├── InvalidNumber          an id typed at the CLI: not ASCII digits in 0..2**63-1
    │   └── BreakerNotFound        an operator named no known breaker
    ├── InfrastructureError        a server taskrail needs is down or not ready
    │   ├── DatabaseUnavailable    the database cannot be reached
    │   ├── SchemaNotReady         the database has no (current) taskrail schema
    │   ├── BrokerUnavailable      the message broker cannot be reached
    │   ├── WriteConflict          concurrent writes kept conflicting (deadlock) after retries
    │   ├── BreakerStateUnavailable  a breaker's shared state cannot be read: retry later
    │   └── DemoFailed             ``taskrail demo``'s tasks stopped moving or its workers died
    ├── DatabaseRejected           the database refused a statement (constraint, data, SQL)
    └── ConfigurationError         settings or agent registration that cannot work

Agents signal business outcomes with :class:`orchestration.agents.Escalate` and
:class:`orchestration.agents.PermanentError`; those are not errors of taskrail's, and
neither is :class:`orchestration.breakers.BreakerOpen` (a refusal the hop defers on).
Invalid lifecycle moves raise python-statemachine's ``TransitionNotAllowed``.

Each exception carries its facts as attributes (``task_id``, ``status``, ...) and
``fields()`` returns them for structlog.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

# The largest id the database's BIGINT holds (task and client ids).
MAX_ID = 2**63 - 1
MAX_SHOWN_INPUT = 40

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 60


def short_repr(value: object) -> str:
    """``repr(value)``, cut short: messages never carry a whole payload."""
    try:
        return _repr.repr(value)
    except Exception:  # a broken __repr__ must not hide the error being reported
        return f"<{type(value).__name__}>"


def shown_input(value: str) -> str:
    """``value`` quoted for an error line: escaped (repr) and cut to a readable length."""
    if len(value) > MAX_SHOWN_INPUT:
        return repr(value[:MAX_SHOWN_INPUT]) + f"... ({len(value)} characters)"
    return repr(value)


class TaskrailError(Exception):
    """Root of taskrail's exceptions."""

    def fields(self) -> dict[str, Any]:
        """The exception's facts as key-value pairs for a log line."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class InputError(TaskrailError, ValueError):
    """Bad input; nothing was written."""


class UnknownTaskType(InputError):
    def __init__(self, task_type: str, known: list[str]) -> None:
        self.task_type = task_type
        self.known = sorted(known)
        listed = ", ".join(self.known) if self.known else "none registered"
        super().__init__(f"unknown task type {task_type!r}; known task types: {listed}")


class InvalidTaskType(UnknownTaskType):
    """A task type no agent can have: not a string of 1 to 64 storable characters."""

    def __init__(self, value: object) -> None:
        self.task_type = short_repr(value)
        self.known = []
        InputError.__init__(
            self,
            "task type must be a string of 1 to 64 characters without NUL or surrogates, "
            f"got {self.task_type}",
        )


class InvalidPayload(InputError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid payload: {reason}")


class InvalidIdempotencyKey(InvalidPayload):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        InputError.__init__(self, f"invalid idempotency key: {reason}")


class InvalidTaskItem(InputError):
    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"item {index}: {reason}")


class ResultRejected(InputError):
    """A handler's result taskrail cannot store; the reason is the task's failure reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"result cannot be stored: {reason}")


class InvalidClientId(InputError):
    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(f"client id must be an integer from 0 to 2**63-1, got {short_repr(value)}")


class TaskNotFound(InputError, LookupError):
    def __init__(self, task_id: object) -> None:
        self.task_id = task_id
        super().__init__(f"no task with id {short_repr(task_id)}")


class WrongState(InputError):
    """A person's move (``event``) on a task in a state (``status``) that does not allow
    it; ``allowed`` says which states do."""

    def __init__(self, task_id: int, status: str, allowed: str, event: str | None = None) -> None:
        self.task_id = task_id
        self.status = str(status)
        self.event = event
        super().__init__(f"task {task_id} is {self.status}; {allowed}")


class NotRetryable(WrongState):
    def __init__(self, task_id: int, status: str) -> None:
        super().__init__(task_id, status, "only failed tasks can be retried", "retry")


class AlreadyClaimed(InputError):
    def __init__(self, task_id: int, claimed_by: str) -> None:
        self.task_id = task_id
        self.claimed_by = claimed_by
        super().__init__(
            f"task {task_id} is claimed by {shown_input(claimed_by)}; unclaim it first"
        )


class NotClaimed(InputError):
    def __init__(self, task_id: int) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} is not claimed")


class InvalidFilter(InputError):
    """A filter of ``list`` or a bulk move that cannot be used."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        super().__init__(f"invalid {name}: {reason}")


class InvalidField(InputError):
    """A person's input (who, a note, a reason, a result) that cannot be stored."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        super().__init__(f"invalid {name}: {reason}")


class NotAHop(InputError):
    """A message on a taskrail queue that is not a valid hop: kept as a dead letter."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"not a valid hop message: {reason}")


class MalformedMessage(InputError):
    """A hop message whose arguments do not parse: dropped, never retried."""

    def __init__(self, hop: str, reason: str) -> None:
        self.hop = hop
        self.reason = reason
        super().__init__(f"malformed {hop} message: {reason}")


class InvalidNumber(InputError):
    """A task or client id that is not ASCII digits in 0..2**63-1."""

    def __init__(self, what: str, value: str) -> None:
        self.what = what
        self.value = value
        super().__init__(
            f"{what} must be an integer from 0 to {MAX_ID} in ASCII digits, "
            f"got {shown_input(value)}"
        )


class BreakerNotFound(InputError, LookupError):
    """An operator named a breaker that no process has registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(self.known) if self.known else "none registered"
        super().__init__(f"no breaker named {name!r}; known breakers: {listed}")


class InfrastructureError(TaskrailError):
    """A server taskrail needs is unavailable."""


class DatabaseUnavailable(InfrastructureError):
    def __init__(self, where: str, detail: str = "") -> None:
        self.where = where
        self.detail = detail
        msg = f"database unreachable at {where}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class SchemaNotReady(InfrastructureError):
    def __init__(self, where: str) -> None:
        self.where = where
        super().__init__(
            f"database at {where} has no current taskrail schema; run `taskrail db upgrade`"
        )


class BrokerUnavailable(InfrastructureError):
    def __init__(self, where: str, detail: str = "") -> None:
        self.where = where
        self.detail = detail
        msg = f"message broker unreachable at {where}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class WriteConflict(InfrastructureError):
    """Concurrent transactions kept conflicting (deadlock, serialization) after retries."""

    def __init__(self, where: str, attempts: int, detail: str = "") -> None:
        self.where = where
        self.attempts = attempts
        self.detail = detail
        msg = f"concurrent writes at {where} kept conflicting after {attempts} attempts"
        super().__init__(f"{msg}: {detail}; try again" if detail else f"{msg}; try again")


class BreakerStateUnavailable(InfrastructureError):
    """The breaker's shared state cannot be read or changed (Redis is down).

    Raised instead of calling the downstream without protection: retry the hop later.
    """

    def __init__(self, name: str, where: str, detail: str = "") -> None:
        self.name = name
        self.where = where
        self.detail = detail
        msg = f"state of breaker {name} unavailable at {where}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class DemoFailed(InfrastructureError):
    """The demo's tasks stopped moving (or its workers died); says why and where to look."""

    def __init__(self, reason: str, first_error: str | None, logs: Path | None) -> None:
        self.reason = reason
        self.first_error = first_error
        self.logs = str(logs) if logs else None
        msg = reason
        if first_error:
            msg += f"; first worker error: {first_error}"
        if logs:
            msg += f" (worker logs kept in {logs})"
        super().__init__(msg)


class DatabaseRejected(TaskrailError):
    """The database refused a statement: not an outage, so trying again will not help."""

    def __init__(self, where: str, detail: str = "") -> None:
        self.where = where
        self.detail = detail
        msg = f"database at {where} refused a statement"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class ConfigurationError(TaskrailError):
    """Settings or registrations that cannot work."""
