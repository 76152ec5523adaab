"""Bad input to the async producer API (issue 22.4): the sync API's own tables of bad
input (tests/unit/domain/test_api.py, test_people_api.py, test_listing.py, and the
values below), each refused by the async API with the sync API's error, the same
class and the same one-line message, and nothing written: not a row, not an audit
event, not a hop message. On the embedded SQLite and on PostgreSQL with Redis."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from orchestration.api import NewTask
from orchestration.constants import MAX_REASON_CHARS
from orchestration.errors import TaskrailError
from orchestration.filters import TaskFilter
from orchestration.models import TaskStatus
from tests.unit.domain.aio_support import async_trail, everything, outcome
from tests.unit.domain.people_support import Backend
from tests.unit.domain.test_api import BAD_ITEMS, BAD_SUBMITS
from tests.unit.domain.test_listing import BAD_FILTERS
from tests.unit.domain.test_people_api import (
    BAD_ACTORS,
    BAD_IDS,
    BAD_NOTES,
    EVENTS,
    REASONS,
    REFUSED_CASES,
    RESULT,
    start_state,
)

S = TaskStatus
TASK = object()  # stands for the id of the case's task


@dataclass(frozen=True)
class Case:
    """``<method>(*args, **kwargs)`` on a task in ``status`` (TASK in args: its id)."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    status: TaskStatus = S.PENDING
    claimed_by: str | None = None


def move(event: str, task: Any = TASK, status: TaskStatus | None = None, **given: Any) -> Case:
    """``event`` on ``task`` with the typical arguments of test_people_api's ``call``,
    ``given`` replacing them; the task is put where the event may start."""
    args: tuple[Any, ...] = (task,)
    kwargs: dict[str, Any] = {}
    if event == "resolve":
        args = (task, given.pop("result", RESULT))
    elif event == "reject":
        args = (task, given.pop("reason", REASONS["reject"]))
    elif event == "reopen":
        kwargs["payload"] = {"w2": "scan.pdf"}
    elif event == "cancel":
        kwargs["reason"] = REASONS["cancel"]
    kwargs.update(given)
    status = status or start_state(event)
    claimed = "bob" if event == "unclaim" and status is S.ESCALATED else None
    return Case(event, args, kwargs, status, claimed)


def _values(params: list[Any]) -> list[tuple[Any, ...]]:
    return [p.values for p in params]


TABLES: dict[str, list[Case]] = {
    "submit": [Case("submit", args) for args, _error in _values(BAD_SUBMITS)]
    + [
        Case("submit", ("payroll", 1, {"a": 1}), {"idempotency_key": key})
        for key in ["k\x00", "k\ud800", "\udc80", "x" * 256, "", 5, b"key"]
    ]
    + [Case("submit", ("payroll", 1, {"x": {"y": math.nan}})), Case("submit", ("payroll",))],
    "submit_many": [
        Case("submit_many", ([NewTask("payroll", 1), bad],)) for bad, _error in _values(BAD_ITEMS)
    ]
    + [Case("submit_many", (5,)), Case("submit_many", ([NewTask("payroll", 1), "payroll"],))],
    "read": [Case(m, (i,)) for m in ("get", "history") for i in BAD_IDS],
    "ids": [move(e, i) for e in EVENTS for i in BAD_IDS],
    "state": [move(e, status=s) for e, s in REFUSED_CASES],
    "actor": [move(e, by=by) for e in EVENTS for by in BAD_ACTORS],
    "note": [move(e, note=note) for e in EVENTS for note in BAD_NOTES],
    "values": [move("resolve", result=r) for r in ([1, 2], "done", None, {"x": math.inf})]
    + [move("reject", reason=r) for r in (None, "", " ", 5, "x" * (MAX_REASON_CHARS + 1))]
    + [move("cancel", reason=r) for r in ("", "  ", 5)]
    + [move("reopen", payload=p) for p in (["w2"], "w2", {1: "int key"}, {"x": math.nan})],
    "list": [Case("list_tasks", (), query) for query, _error, _name in BAD_FILTERS]
    + [Case("list_tasks", (), {"colour": "red"}), Case("inbox", (), {"limit": 0})],
    "bulk": [
        Case("retry_many", (), {"status": "pending"}),
        Case("retry_many", (), {"status": None}),
        Case("retry_many", (), {"claimed_by": "ana"}),
        Case("retry_many", (), {"by": ""}),
        Case("cancel_many", (), {"status": "completed"}),
        Case("cancel_many", (), {"status": "pending", "since": "soon"}),
        Case("cancel_many", (), {"status": "pending", "reason": 5}),
        Case("cancel_many", (), {"status": "pending", "note": "x" * 4001}),
        Case("cancel_many", (), {"status": "pending", "client_id": -1}),
        Case("bulk", ("resolve", TaskFilter.build(status="escalated"))),
        Case("bulk", ("retry", TaskFilter.build(status="failed")), {"batch": 0}),
    ],
}


@pytest.mark.parametrize("table", list(TABLES))
def test_the_async_api_refuses_what_the_sync_api_refuses(backend: Backend, table: str) -> None:
    tasks: dict[tuple[TaskStatus, str | None], int] = {}
    with async_trail(backend.settings) as loop:
        for case in TABLES[table]:
            # Given a task the case's call names (refused moves leave it as it is)
            where = (case.status, case.claimed_by)
            if where not in tasks:
                tasks[where] = backend.put(case.status, claimed_by=case.claimed_by)
            args = tuple(tasks[where] if a is TASK else a for a in case.args)
            before = everything(backend)

            # When the sync API and the async API are given the same bad input
            refused = outcome(getattr(backend.trail, case.method), *args, **case.kwargs)
            refused_async = outcome(loop.call, case.method, *args, **case.kwargs)

            # Then both refuse it with the same one-line error, and nothing is written
            label = f"{table}: {case.method}{args!r:.60} {case.kwargs!r:.80}"
            assert refused[0] == "error", label
            assert refused_async[0] == "error", label
            # (a call Python itself refuses names the class: AsyncTaskrail.submit())
            kind_async, message_async = refused_async[1]
            assert (kind_async, message_async.replace("AsyncTaskrail.", "Taskrail.")) == (
                refused[1]
            ), label
            kind, message = refused[1]
            assert issubclass(kind, TaskrailError | TypeError), label
            assert message and "\n" not in message, label
            assert everything(backend) == before, label
