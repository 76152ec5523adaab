"""Helpers for the async producer API's tests (issue 22.4): an :class:`AsyncTaskrail` on
an event loop of the test's own, driven from sync test code, and records made
comparable between two runs (ids, times and client ids taken out)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select

from orchestration.api.aio import AsyncTaskrail
from orchestration.errors import TaskrailError
from orchestration.models import events_table, tasks_table
from orchestration.settings import Settings
from orchestration.store.records import EventRecord, TaskRecord
from tests.unit.domain.people_support import Backend

T = TypeVar("T")


@dataclass
class Loop:
    """An AsyncTaskrail and the event loop it lives on."""

    runner: asyncio.Runner
    trail: AsyncTaskrail

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``await trail.<method>(*args, **kwargs)`` on the loop."""
        return self.run(getattr(self.trail, method)(*args, **kwargs))


@contextlib.contextmanager
def async_trail(settings: Settings) -> Iterator[Loop]:
    """An AsyncTaskrail on ``settings`` and a loop of its own; closed after."""
    with asyncio.Runner() as runner:
        trail = AsyncTaskrail(settings)
        try:
            yield Loop(runner, trail)
        finally:
            runner.run(trail.aclose())


def outcome(run: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", value)`` or ``("error", (type, message))`` of ``run(*args, **kwargs)``, a
    TaskrailError or a TypeError being an answer, anything else a failure of the test."""
    try:
        return "ok", run(*args, **kwargs)
    except (TaskrailError, TypeError) as err:
        return "error", (type(err), str(err))


def everything(backend: Backend) -> tuple[Any, ...]:
    """Every task row, every audit row and every hop message."""
    with backend.db.connect() as conn:
        tasks = [dict(r) for r in conn.execute(select(tasks_table).order_by("id")).mappings()]
        events = [dict(r) for r in conn.execute(select(events_table).order_by("id")).mappings()]
    return tasks, events, backend.hops()


_TIMES = ("created_at", "updated_at", "completed_at", "claimed_at", "at")


def comparable(value: Any, ids: Mapping[int, int], client_base: int = 0) -> Any:
    """``value`` (records, lists, tuples, BulkResults, plain values) with what differs
    between two runs of the same calls taken out: task ids become their index in
    ``ids``, event ids go, times become whether they are set, client ids lose
    ``client_base`` and idempotency keys their ``@<client_base>``."""
    if isinstance(value, TaskRecord | EventRecord):
        fields = value.to_dict()
        for name in _TIMES:
            if name in fields:
                fields[name] = fields[name] is not None
        if isinstance(value, EventRecord):
            del fields["id"]
            fields["task_id"] = ids.get(value.task_id, -1)
        else:
            fields["id"] = ids.get(value.id, -1)
            fields["client_id"] = value.client_id - client_base
            if value.idempotency_key is not None:
                fields["idempotency_key"] = value.idempotency_key.removesuffix(f"@{client_base}")
        return fields
    if hasattr(value, "to_dict"):
        fields = value.to_dict()
        if "first_ids" in fields:
            fields["first_ids"] = [ids.get(i, -1) for i in fields["first_ids"]]
        return fields
    if isinstance(value, list | tuple):
        return [comparable(v, ids, client_base) for v in value]
    return value
