"""``async def`` agents on real servers and real Celery workers (issue 22, first step): they
complete in every executor pool, their outcomes (Escalate, PermanentError, a transient
error retried) follow the rules of sync handlers, their coroutine is cancelled at the time
limit and when the task is cancelled, and an isolated run works. The test agents
(tests/agents.py, ``async_*``) count what they did in the counter Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import text

from orchestration import api
from orchestration.store.db import Database
from tests.agent_scene import AgentScene
from tests.agents import key
from tests.support import WorkerFleet

pytestmark = pytest.mark.integration

BY = "ops-alice"


Scene = AgentScene


@pytest.fixture
def scene(
    server_settings: Any, pg_db: Database, pg_url: str, counter_url: str, fleet: WorkerFleet
) -> Iterator[Scene]:
    counter = redis.Redis.from_url(counter_url)
    yield Scene(pg_db, pg_url, counter, fleet)
    counter.close()


@pytest.mark.parametrize("pool", ["async", "threads", "prefork", "solo"])
def test_async_agents_complete_in_every_executor_pool(pool: str, scene: Scene) -> None:
    # Given the Procfile's deployment with an executor on ``pool``
    scene.deploy(pool)
    # When async tasks are submitted (each awaits asyncio.sleep, then returns a dict)
    ids = [api.submit("async_echo", n, {"n": n, "sleep_s": 0.2}) for n in range(4)]
    scene.drain(ids)
    # Then each completed with its result, in one attempt, one call, one event per move
    for n, task_id in enumerate(ids):
        task = api.get(task_id)
        assert task.status == "completed", scene.logs()
        assert task.result == {"echo": {"n": n, "sleep_s": 0.2}, "attempt": 1, "loop": True}
        assert task.attempts == 1
        assert scene.events(task_id) == ["assign", "start", "complete"]
        assert scene.count("calls", task_id) == 1
        assert scene.no_lease(task_id)
    assert "not JSON-serialisable" not in scene.fleet.logs()
    assert "Traceback" not in scene.fleet.logs()
    # and on the async executor, the calls ran on its event loop
    assert ("async_executor_started" in scene.fleet.logs()) == (pool == "async")


@pytest.mark.parametrize("pool", ["async", "threads"])
def test_async_outcomes_escalate_fail_and_retry_like_sync_ones(pool: str, scene: Scene) -> None:
    # Given an executor and an async agent that does what each payload says
    scene.deploy(pool)
    escalates = api.submit("async_outcome", 1, {"do": "escalate"})
    fails = api.submit("async_outcome", 2, {"do": "permanent"})
    flaky = api.submit("async_outcome", 3, {"do": "flaky", "fail_times": 2})
    scene.drain([escalates, fails, flaky])
    # Then Escalate escalates at once, with its reason
    task = api.get(escalates)
    assert (task.status, task.attempts, task.last_error) == ("escalated", 1, "missing W-2 (async)")
    assert scene.events(escalates) == ["assign", "start", "escalate"]
    assert scene.count("calls", escalates) == 1
    # and PermanentError fails at once, without a retry
    task = api.get(fails)
    assert (task.status, task.attempts) == ("failed", 1)
    assert task.last_error == "invalid account (async)"
    assert scene.events(fails) == ["assign", "start", "fail"]
    assert scene.count("calls", fails) == 1
    # and a transient error is retried until the third attempt completes
    task = api.get(flaky)
    assert (task.status, task.attempts) == ("completed", 3)
    assert task.result == {"calls": 3, "attempt": 3}
    assert scene.events(flaky) == ["assign", "start", "complete"]
    assert scene.count("calls", flaky) == 3
    for task_id in (escalates, fails, flaky):
        assert scene.no_lease(task_id)


@pytest.mark.parametrize("pool", ["async", "threads", "prefork"])
def test_an_async_handler_awaiting_forever_is_cancelled_at_its_time_limit(
    pool: str, scene: Scene
) -> None:
    # Given an async handler that awaits for an hour, with a 2 s limit and 2 attempts
    scene.deploy(pool)
    task_id = api.submit("async_hang", 1, {})
    # When it runs
    scene.drain([task_id])
    # Then each attempt ended at the limit and counted: failed after 2
    task = api.get(task_id)
    assert task.status == "failed"
    assert task.attempts == 2
    assert task.last_error == "gave up after 2 attempts: time limit of 2 s exceeded"
    assert scene.events(task_id) == ["assign", "start", "fail"]
    assert scene.count("calls", task_id) == 2
    # and each coroutine was cancelled (it saw CancelledError), none ran on
    scene.wait_for(lambda: scene.count("cancelled", task_id) == 2, "a coroutine was not cancelled")
    assert scene.count("finished", task_id) == 0
    # and no lease is left behind to be renewed
    assert scene.no_lease(task_id)
    discards = scene.wait_for(
        lambda: scene.log_lines("late_result_discarded", task_id), "nothing discarded"
    )
    assert {(d["handler"], d["reason"]) for d in discards} == {("cancelled", "time limit")}


@pytest.mark.parametrize("pool", ["async", "threads", "solo"])
def test_cancelling_a_running_async_handler_cancels_its_coroutine(pool: str, scene: Scene) -> None:
    # Given an async handler awaiting a 20 s call
    scene.deploy(pool)
    task_id = api.submit("async_cancellable", 1, {"run_s": 20})
    scene.wait_for(lambda: scene.count("calls", task_id), "the handler never started")
    # When the task is cancelled while it awaits
    api.cancel(task_id, reason="client withdrew", by=BY)
    # Then its coroutine gets CancelledError, with task.cancelled true
    scene.wait_for(lambda: scene.count("cancelled", task_id), "the coroutine was not cancelled")
    assert scene.count("saw_cancel", task_id) == 1
    # and the run is logged as discarded, once, and nothing of it is written
    [late] = scene.wait_for(
        lambda: scene.log_lines("late_result_discarded", task_id), "nothing discarded"
    )
    assert (late["handler"], late["reason"]) == ("cancelled", "cancelled")
    row = scene.row(task_id)
    assert (row["status"], row["result"], row["attempts"]) == ("cancelled", None, 1)
    assert row["last_error"] == "client withdrew"
    assert scene.no_lease(task_id)
    assert scene.events(task_id) == ["assign", "start", "cancel"]
    assert scene.count("returned", task_id) == 0
    # and the executor works on; the cancelled task stays as it is
    later = api.submit("async_echo", 2, {"after": "cancel"})
    scene.drain([later])
    assert api.get(later).status == "completed"
    assert scene.events(task_id) == ["assign", "start", "cancel"]
    assert scene.count("calls", task_id) == 1


def _run_isolated(scene: Scene, task_type: str, payload: dict[str, Any]) -> int:
    """A task marked isolated (a worker died under it before), started on a threads
    executor; returns its id once its handler started, in a process of its own."""
    task_id = api.submit(task_type, 1, payload)
    with scene.pg_db.begin() as conn:
        conn.execute(text("UPDATE tasks SET isolated = true WHERE id = :id"), {"id": task_id})
    scene.deploy("threads")
    scene.wait_for(lambda: scene.count("calls", task_id), "the handler never started")
    child = int(scene.counter.get(key(f"pid:{task_id}")) or 0)
    assert child not in {worker.proc.pid for worker in scene.fleet.workers}
    return task_id


def test_an_isolated_async_handler_runs_in_its_own_process(scene: Scene) -> None:
    task_id = _run_isolated(scene, "async_echo", {"n": 7, "sleep_s": 0.2})
    scene.drain([task_id])
    task = api.get(task_id)
    assert task.status == "completed", scene.logs()
    assert task.result == {"echo": {"n": 7, "sleep_s": 0.2}, "attempt": 1, "loop": True}
    assert scene.events(task_id) == ["assign", "start", "complete"]
    assert scene.count("calls", task_id) == 1


def test_an_isolated_async_handler_is_killed_when_its_task_is_cancelled(scene: Scene) -> None:
    task_id = _run_isolated(scene, "async_cancellable", {"run_s": 20})
    child = int(scene.counter.get(key(f"pid:{task_id}")) or 0)
    api.cancel(task_id, by=BY)
    [killed] = scene.wait_for(
        lambda: scene.log_lines("late_result_discarded", task_id), "not killed"
    )
    assert (killed["handler"], killed["reason"]) == ("killed", "cancelled")
    scene.wait_for(lambda: not _alive(child), "the child process lives on")
    assert scene.count("returned", task_id) == 0
    assert scene.events(task_id) == ["assign", "start", "cancel"]
    assert scene.no_lease(task_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
