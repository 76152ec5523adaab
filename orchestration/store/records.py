"""Read-only records handed to producers and printed by the CLI.

Built from stored rows, with the escapes of :mod:`orchestration.values` undone: a
record holds the payload, result and reasons as they were given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from orchestration.models import TaskStatus
from orchestration.values import read_json, read_text


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, TaskStatus):
        return value.value
    return value


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: int
    client_id: int
    task_type: str
    status: TaskStatus
    assigned_agent: str | None
    payload: Any
    result: Any
    attempts: int
    last_error: str | None
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    claimed_by: str | None
    claimed_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> TaskRecord:
        values = {name: row[name] for name in cls.__slots__}
        values["payload"] = read_json(values["payload"])
        values["result"] = read_json(values["result"])
        values["last_error"] = read_text(values["last_error"])
        values["claimed_by"] = read_text(values["claimed_by"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    task_id: int
    event: str
    from_status: TaskStatus
    to_status: TaskStatus
    agent: str | None
    detail: str | None
    worker: str | None
    actor: str | None  # who made the move: a worker's name, or the person
    note: str | None
    at: datetime

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> EventRecord:
        values = {name: row[name] for name in cls.__slots__}
        for name in ("detail", "actor", "note"):
            values[name] = read_text(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in asdict(self).items()}
