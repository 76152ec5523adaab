"""Cancelling tasks on real servers and real workers (issue 21): a running handler is told
(``task.cancelled``), its lease released at once and its late result never written; a
task cancelled while its hops are queued never runs its handler; an isolated run is
killed. The test agents (tests/agents.py) count what they did in the counter Redis.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import text

from orchestration import api
from orchestration import constants as c
from orchestration.store.db import Database
from orchestration.store.recovery import claim_stuck
from orchestration.store.transitions import apply_transition
from tests.agents import key
from tests.support import WorkerFleet, drain

pytestmark = pytest.mark.integration

BY = "ops-alice"
HOPS = "taskrail.hops,taskrail.control"
WAIT_S = 30.0  # generous: what it bounds takes a second or two


@pytest.fixture
def counter(counter_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(counter_url)
    yield client
    client.close()


def _count(counter: redis.Redis, name: str, task_id: int) -> int:
    return int(counter.get(key(f"{name}:{task_id}")) or 0)


def _noted(counter: redis.Redis, name: str, task_id: int) -> bool:
    return counter.get(key(f"{name}:{task_id}")) is not None


def _wait_for(condition: Callable[[], Any], what: str, logs: Callable[[], str]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} (after {WAIT_S:g} s)\n{logs()[-4000:]}"
        time.sleep(0.05)


def _row(pg_db: Database, task_id: int) -> dict[str, Any]:
    with pg_db.connect() as conn:
        row = conn.execute(
            text(
                "SELECT status, result, attempts, last_error, lease_owner, lease_expires_at "
                "FROM tasks WHERE id = :id"
            ),
            {"id": task_id},
        ).mappings()
        return dict(row.one())


def _events(pg_db: Database, task_id: int) -> list[tuple[str, str | None]]:
    with pg_db.connect() as conn:
        rows = conn.execute(
            text("SELECT event, actor FROM task_events WHERE task_id = :id ORDER BY id"),
            {"id": task_id},
        ).all()
    return [(event, actor) for event, actor in rows]


def _log_lines(fleet: WorkerFleet, event: str, task_id: int) -> list[dict[str, Any]]:
    """The fleet's JSON log lines of ``event`` about ``task_id``."""
    found = []
    for line in fleet.logs().splitlines():
        if not line.startswith("{") or f'"{event}"' not in line:
            continue
        entry = json.loads(line)
        if entry.get("event") == event and entry.get("task_id") == task_id:
            found.append(entry)
    return found


def _assert_cancelled_once(pg_db: Database, task_id: int, before: list[str]) -> None:
    """The task rests cancelled, with no result, no lease, and ``before`` then one cancel
    event by BY as its history: nothing was written after the cancel."""
    row = _row(pg_db, task_id)
    assert row["status"] == "cancelled"
    assert row["result"] is None
    assert (row["lease_owner"], row["lease_expires_at"]) == (None, None)
    events = _events(pg_db, task_id)
    assert [event for event, _ in events] == [*before, "cancel"]
    assert events[-1][1] == BY


def _deployment(fleet: WorkerFleet, pool: str) -> None:
    """The Procfile's shape: a solo hop worker, and an executor on ``pool``."""
    fleet.start(pool="solo", concurrency=1, queues=HOPS)
    concurrency = {"threads": 4, "prefork": 2, "solo": 1}[pool]
    fleet.start(pool=pool, concurrency=concurrency, queues=c.QUEUE_EXECUTE)


def _a_later_task_completes(fleet: WorkerFleet, pg_url: str) -> None:
    later = api.submit("echo", 2, {"after": "cancel"})
    drain(pg_url, [later], timeout=WAIT_S, logs=fleet.logs)
    assert api.get(later).status == "completed"


@pytest.mark.parametrize("pool", ["threads", "prefork", "solo"])
def test_a_running_handler_is_told_and_its_late_result_is_not_written(
    pool: str,
    server_settings: Any,
    pg_db: Database,
    pg_url: str,
    counter: redis.Redis,
    fleet: WorkerFleet,
) -> None:
    # Given a handler that works for 20 s in steps, reading task.cancelled between them
    _deployment(fleet, pool)
    task_id = api.submit("cancellable", 1, {"run_s": 20})
    _wait_for(lambda: _count(counter, "calls", task_id), "the handler never started", fleet.logs)
    assert _row(pg_db, task_id)["lease_owner"].startswith(c.RUN_TOKEN_PREFIX)
    # When it is cancelled while it runs
    api.cancel(task_id, reason="client withdrew", by=BY)
    # Then its lease is released at once, by the cancel itself
    row = _row(pg_db, task_id)
    assert (row["status"], row["lease_owner"], row["lease_expires_at"]) == ("cancelled", None, None)
    assert row["last_error"] == "client withdrew"
    # and the handler sees the flag and returns
    _wait_for(lambda: _noted(counter, "saw_cancel", task_id), "no flag seen", fleet.logs)
    _wait_for(lambda: _noted(counter, "returned", task_id), "never returned", fleet.logs)
    # and its result is logged as discarded, never written
    [late] = _wait_for(
        lambda: _log_lines(fleet, "late_result_discarded", task_id), "nothing discarded", fleet.logs
    )
    assert (late["reason"], late["handler"]) == ("cancelled", "returned")
    assert _log_lines(fleet, "run_cancelled", task_id)
    _assert_cancelled_once(pg_db, task_id, ["assign", "start"])
    assert _row(pg_db, task_id)["attempts"] == 1
    # and the handler ran exactly once; nothing re-drives a cancelled task
    assert _count(counter, "calls", task_id) == 1
    assert [r.task_id for r in claim_stuck(pg_db, redrive_after_s=0, batch=100)] == []
    # and the executor works on
    _a_later_task_completes(fleet, pg_url)
    assert _count(counter, "calls", task_id) == 1
    _assert_cancelled_once(pg_db, task_id, ["assign", "start"])
    assert not _log_lines(fleet, "lease_lost", task_id)


def test_a_handler_that_ignores_the_flag_has_its_result_discarded(
    server_settings: Any,
    pg_db: Database,
    pg_url: str,
    counter: redis.Redis,
    fleet: WorkerFleet,
) -> None:
    # Given a handler that sleeps 5 s and then returns, whatever happened meanwhile
    _deployment(fleet, "threads")
    task_id = api.submit("stubborn", 1, {"sleep_s": 5})
    _wait_for(lambda: _count(counter, "calls", task_id), "the handler never started", fleet.logs)
    # When the task is cancelled while it sleeps
    api.cancel(task_id, by=BY)
    # Then, once it returned, its result is discarded
    _wait_for(lambda: _noted(counter, "returned", task_id), "never returned", fleet.logs)
    [late] = _wait_for(
        lambda: _log_lines(fleet, "late_result_discarded", task_id), "nothing discarded", fleet.logs
    )
    assert (late["reason"], late["handler"]) == ("cancelled", "returned")
    _assert_cancelled_once(pg_db, task_id, ["assign", "start"])
    assert _row(pg_db, task_id)["last_error"] == "cancelled"
    assert _count(counter, "calls", task_id) == 1
    _a_later_task_completes(fleet, pg_url)
    _assert_cancelled_once(pg_db, task_id, ["assign", "start"])


def test_tasks_cancelled_while_their_hops_are_queued_never_run(
    server_settings: Any,
    pg_db: Database,
    pg_url: str,
    counter: redis.Redis,
    fleet: WorkerFleet,
) -> None:
    # Given, with no worker running, a pending task (its assign message queued) and an
    # assigned one (assign and start messages queued)
    pending, assigned = (api.submit("cancellable", i, {"run_s": 1}) for i in range(2))
    apply_transition(pg_db, assigned, "assign", agent="cancellable_agent")
    api.client().dispatcher.send(c.HOP_START, [assigned])
    # When both are cancelled
    api.cancel(pending, by=BY)
    api.cancel(assigned, by=BY)
    # and a task the hops took to in_progress (its pre-claimed execute message queued, no
    # executor running) is cancelled too
    started = api.submit("cancellable", 3, {"run_s": 1})
    fleet.start(pool="solo", concurrency=1, queues=HOPS)
    _wait_for(lambda: api.get(started).status == "in_progress", "never started", fleet.logs)
    api.cancel(started, by=BY)
    # and an executor takes the queued execute message
    fleet.start(pool="threads", concurrency=4, queues=c.QUEUE_EXECUTE)
    _a_later_task_completes(fleet, pg_url)
    # Then every queued hop for them is dropped quietly
    for task_id in (pending, assigned, started):
        _wait_for(
            lambda task_id=task_id: _log_lines(fleet, "hop_skipped", task_id),
            f"task {task_id}'s hop was not dropped",
            fleet.logs,
        )
    for task_id, hop in ((pending, "assign"), (assigned, "start"), (started, "execute")):
        skipped = _log_lines(fleet, "hop_skipped", task_id)
        assert {entry["status"] for entry in skipped} == {"cancelled"}
        assert hop in {entry["hop"] for entry in skipped}
    # and no handler ran; each task stays cancelled with its one cancel event
    for task_id in (pending, assigned, started):
        assert _count(counter, "calls", task_id) == 0
    _assert_cancelled_once(pg_db, pending, [])
    _assert_cancelled_once(pg_db, assigned, ["assign"])
    _assert_cancelled_once(pg_db, started, ["assign", "start"])
    assert "Traceback" not in fleet.logs()


def test_an_isolated_run_is_killed_when_its_task_is_cancelled(
    server_settings: Any,
    pg_db: Database,
    pg_url: str,
    counter: redis.Redis,
    fleet: WorkerFleet,
) -> None:
    # Given a task that runs isolated (a worker died under it before), in a process of
    # its own, where its handler cannot see the flag: it would run for 20 s
    task_id = api.submit("cancellable", 1, {"run_s": 20})
    with pg_db.begin() as conn:
        conn.execute(text("UPDATE tasks SET isolated = true WHERE id = :id"), {"id": task_id})
    _deployment(fleet, "threads")
    _wait_for(lambda: _count(counter, "calls", task_id), "the handler never started", fleet.logs)
    child = int(counter.get(key(f"pid:{task_id}")) or 0)
    assert child not in {worker.proc.pid for worker in fleet.workers}
    # When the task is cancelled
    api.cancel(task_id, by=BY)
    # Then the child process is killed, and that is all
    [killed] = _wait_for(
        lambda: _log_lines(fleet, "late_result_discarded", task_id), "not killed", fleet.logs
    )
    assert (killed["reason"], killed["handler"]) == ("cancelled", "killed")
    _wait_for(lambda: not _alive(child), "the child process lives on", fleet.logs)
    assert not _noted(counter, "returned", task_id)
    _assert_cancelled_once(pg_db, task_id, ["assign", "start"])
    assert _count(counter, "calls", task_id) == 1
    _a_later_task_completes(fleet, pg_url)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
