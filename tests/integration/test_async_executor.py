"""The async executor (``--async-calls N``, workers/aio.py) on real servers and real Celery
workers: a warm stop with calls in flight (the calls that end within the drain complete,
the rest are given back and run once more elsewhere), hundreds of calls in flight in one
process, and an open breaker deferring async tasks without using their attempts. The
test agents (tests/agents.py ``async_gauge``, ``async_svc``) count in the counter Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from orchestration import api
from orchestration import constants as c
from orchestration.breakers import BreakerBoard
from orchestration.store.db import Database
from tests.agent_scene import HOPS, AgentScene
from tests.agents import key
from tests.support import BREAKER_NAMESPACE, WorkerFleet, WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def scene(
    server_settings: Any, pg_db: Database, pg_url: str, counter_url: str, fleet: WorkerFleet
) -> Iterator[AgentScene]:
    counter = redis.Redis.from_url(counter_url)
    yield AgentScene(pg_db, pg_url, counter, fleet)
    counter.close()


def _executor(
    scene: AgentScene, calls: int, extra_env: dict[str, str] | None = None
) -> WorkerProcess:
    """An async executor: a threads pool of two, ``--async-calls calls``."""
    return scene.fleet.start(
        pool="threads",
        concurrency=2,
        queues=c.QUEUE_EXECUTE,
        extra_args=["--async-calls", str(calls)],
        extra_env=extra_env,
    )


def _gauge(scene: AgentScene, name: str) -> int:
    return int(scene.counter.get(key(name)) or 0)


def test_a_warm_stop_completes_what_ends_in_the_drain_and_gives_back_the_rest(
    scene: AgentScene,
) -> None:
    # Given a hop worker and an async executor that drains for 5 s when stopped
    scene.fleet.start(pool="solo", concurrency=1, queues=HOPS)
    first = _executor(scene, 50, {"TASKRAIL_ASYNC_DRAIN_S": "5"})
    # and calls in flight on it: some that end when released, some that await far longer
    short = [api.submit("async_gauge", n, {"gate": "short"}) for n in range(6)]
    long = [api.submit("async_gauge", 100 + n, {"gate": "long"}) for n in range(6)]
    scene.wait_for(lambda: _gauge(scene, "inflight") == 12, "not all 12 calls in flight")
    # When the executor is stopped warm (SIGTERM), and the short calls are released
    first.proc.send_signal(15)
    scene.counter.set(key("gate:short"), 1)
    first.proc.wait(60)
    # Then the short calls completed on it, in one call each
    for task_id in short:
        assert scene.row(task_id)["status"] == "completed", scene.logs()
        assert (scene.count("calls", task_id), scene.count("finished", task_id)) == (1, 1)
    # and the long ones were cancelled and given back: waiting, no lease, no attempt used
    for task_id in long:
        row = scene.row(task_id)
        assert (row["status"], row["attempts"]) == ("in_progress", 0), scene.logs()
        assert scene.no_lease(task_id)
        assert (scene.count("calls", task_id), scene.count("cancelled", task_id)) == (1, 1)
        assert scene.count("finished", task_id) == 0
    assert '"async_calls_given_back"' in first.log()
    # When another executor starts afterwards, and the long calls may end
    scene.counter.set(key("gate:long"), 1)
    _executor(scene, 50)
    scene.drain(short + long)
    # Then every task completed once: each handler finished once, the given-back ones
    # called once more, one event per transition, no lease left
    for task_id in short + long:
        task = api.get(task_id)
        assert task.status == "completed", scene.logs()
        assert task.result is not None and task.result["task"] == task_id
        assert task.attempts == 1
        assert scene.count("finished", task_id) == 1
        assert scene.count("calls", task_id) == (2 if task_id in long else 1)
        assert scene.events(task_id) == ["assign", "start", "complete"]
        assert scene.no_lease(task_id)
    assert "Traceback" not in scene.fleet.logs()


def test_hundreds_of_calls_are_in_flight_at_once_in_one_process(scene: AgentScene) -> None:
    # Given a hop worker and one async executor process with 500 slots
    scene.fleet.start(pool="solo", concurrency=1, queues=HOPS)
    executor = _executor(scene, 500)
    # When 400 tasks arrive whose calls await until released
    ids = api.submit_many(
        [
            {"task_type": "async_gauge", "client_id": n, "payload": {"gate": "many"}}
            for n in range(400)
        ]
    )
    # Then all 400 calls are in flight at once
    scene.wait_for(lambda: _gauge(scene, "inflight") == 400, "not 400 calls in flight")
    pids = {int(scene.counter.get(key(f"pid:{task_id}")) or 0) for task_id in ids}
    assert pids == {executor.proc.pid}
    # When they are released, every one completes once
    scene.counter.set(key("gate:many"), 1)
    scene.drain(ids)
    for task_id in ids:
        assert scene.row(task_id)["status"] == "completed"
        assert (scene.count("calls", task_id), scene.count("finished", task_id)) == (1, 1)
        assert scene.events(task_id) == ["assign", "start", "complete"]
    assert _gauge(scene, "max_inflight") == 400
    assert _gauge(scene, "inflight") == 0


def test_an_open_breaker_defers_async_tasks_without_using_attempts(
    scene: AgentScene, breaker_redis_url: str
) -> None:
    # Given an async agent (fail_max 2, reset 3 s) whose service is down, on the async
    # executor
    scene.counter.set(key("async_svc:down"), "1")
    board = BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE)
    scene.deploy("async")
    # When tasks need it
    ids = [api.submit("async_svc", n, {}) for n in range(8)]
    # Then its breaker opens, and the tasks are deferred again and again
    scene.wait_for(
        lambda: any(b.name == "agent:async_svc_agent" and b.state == "open" for b in board.list()),
        "the breaker never opened",
    )
    scene.wait_for(
        lambda: scene.fleet.logs().count('"hop_deferred"') >= 2 * len(ids),
        "the tasks were not deferred",
    )
    # When the service is back
    scene.counter.set(key("async_svc:down"), "0")
    scene.drain(ids)
    # Then every task completed, and its attempts are its calls but the failed half-open
    # trials (an outage's, not the task's): no deferral used one
    deferred = 0
    for task_id in ids:
        task = api.get(task_id)
        assert task.status == "completed", scene.logs()
        trials = len(scene.log_lines("trial_failed", task_id))
        assert task.attempts + trials == scene.count("calls", task_id)
        assert task.result == {"served": task_id, "attempt": task.attempts}
        assert scene.events(task_id) == ["assign", "start", "complete"]
        deferred += len(scene.log_lines("hop_deferred", task_id))
    assert deferred >= 2 * len(ids)
    assert any(b.name == "agent:async_svc_agent" and b.state == "closed" for b in board.list())


def test_a_warm_stop_of_a_full_executor_ends_and_gives_back_the_waiting_hop(
    scene: AgentScene,
) -> None:
    # Given an async executor of two slots, both taken by calls that await far longer than
    # its 2 s drain, and a third execute hop waiting for a slot
    scene.fleet.start(pool="solo", concurrency=1, queues=HOPS)
    first = _executor(scene, 2, {"TASKRAIL_ASYNC_DRAIN_S": "2"})
    ids = [api.submit("async_gauge", n, {"gate": "later"}) for n in range(3)]
    scene.wait_for(lambda: _gauge(scene, "inflight") == 2, "not 2 calls in flight")
    scene.wait_for(
        lambda: sum(scene.row(task_id)["attempts"] for task_id in ids) == 3,
        "the third hop did not claim its attempt",
    )
    # When it is stopped warm (SIGTERM)
    first.proc.send_signal(15)
    # Then it ends (the waiting hop does not hold the stop up until a call ends), its
    # calls cancelled and every attempt given back unused
    first.proc.wait(60)
    for task_id in ids:
        row = scene.row(task_id)
        assert (row["status"], row["attempts"]) == ("in_progress", 0), scene.logs()
        assert scene.no_lease(task_id)
    assert sum(scene.count("calls", task_id) for task_id in ids) == 2
    # and another executor runs all three once the calls may end
    scene.counter.set(key("gate:later"), 1)
    _executor(scene, 2)
    scene.drain(ids)
    for task_id in ids:
        assert api.get(task_id).status == "completed"
        assert scene.count("finished", task_id) == 1
        assert scene.events(task_id) == ["assign", "start", "complete"]
