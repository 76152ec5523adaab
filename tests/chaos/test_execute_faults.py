"""The execute hop under hostile and unlucky conditions, counted in side effects.

Forged execute messages, a hung handler on the threads executor, a handler that calls
``os._exit`` on it, messages restored after a worker was SIGKILLed with them prefetched,
and a breaker whose half-open trial fails. Each test counts how many times handlers
started and finished (the test agents record it in the counter Redis).
"""

from __future__ import annotations

import time

import pytest
import redis
from sqlalchemy import create_engine, text

from orchestration import api
from orchestration import constants as c
from tests.agents import key
from tests.support import OwnPostgres, WorkerFleet, drain, event_paths

pytestmark = pytest.mark.chaos

QUICK = {
    "TASKRAIL_SWEEP_INTERVAL_S": "0.5",
    "TASKRAIL_REDRIVE_AFTER_S": "1",
    "TASKRAIL_LEASE_TTL_S": "3",
}
THREADS = {"pool": "threads", "concurrency": 20}


def calls(counter: redis.Redis, name: str, task_id: int) -> int:
    return int(counter.get(key(f"{name}:{task_id}")) or 0)


def lease_of(db_url: str, task_id: int) -> tuple[object, object]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT lease_owner, lease_expires_at FROM tasks WHERE id = :id"),
                {"id": task_id},
            ).one()
    finally:
        engine.dispose()
    return row[0], row[1]


def events(db_url: str, task_id: int) -> list[str]:
    return [event for event, _, _ in event_paths(db_url).get(task_id, [])]


def test_forged_execute_messages_run_no_handler(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet
) -> None:
    # Given a worker and a task that completed (its handler ran once)
    worker = chaos_fleet.start(pool="solo", concurrency=1)
    done_id = api.submit("echo", 1, {"count_calls": True})
    drain(own_pg.url, [done_id], timeout=30, logs=chaos_fleet.logs)
    assert calls(counter, "calls", done_id) == 1
    # When execute messages with made-up leases are sent for it and for an id that does
    # not exist: the old form with a payload in it, a pre-claim token, a run token, none
    missing_id = done_id + 1000
    forged_lease = {
        "token": "q:forged/1",
        "until": time.time() + 60,
        "client_id": 1,
        "task_type": "echo",
        "payload": {"count_calls": True},
    }
    dispatcher = api.client().dispatcher
    for task_id in (done_id, missing_id):
        for attempts in (0, 1):
            for token in (forged_lease, "q:forged/2", "r:forged/3", None):
                args = [task_id, attempts, "echo_agent"]
                if token is not None:
                    args.append(token)
                dispatcher.send(c.HOP_EXECUTE, args)
    deadline = time.monotonic() + 20
    while worker.log().count("task_id") < 16 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    # Then no handler ran again, nothing was written, and the worker is alive
    assert calls(counter, "calls", done_id) == 1
    assert calls(counter, "calls", missing_id) == 0
    assert events(own_pg.url, done_id) == ["assign", "start", "complete"]
    assert api.get(done_id).status == "completed"
    assert worker.alive()


def test_hung_handler_on_threads_executor_ends_at_its_time_limit(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet
) -> None:
    # Given the Procfile's deployment: a solo hop worker and a threads executor; an agent
    # with a 2 s time limit and 2 attempts whose handler hangs for 30 s
    chaos_fleet.start(pool="solo", concurrency=1, queues="taskrail.hops,taskrail.control")
    chaos_fleet.start(queues="taskrail.execute", **THREADS)
    started = time.monotonic()
    task_id = api.submit("hang", 1, {"sleep_s": 30})
    # When it runs
    done = drain(own_pg.url, [task_id], timeout=25, logs=chaos_fleet.logs)
    # Then each attempt ended at the limit and counted: failed after 2, well before 30 s
    task = api.get(task_id)
    assert task.status == "failed"
    assert task.attempts == 2
    assert task.last_error == "gave up after 2 attempts: time limit of 2 s exceeded"
    assert events(own_pg.url, task_id) == ["assign", "start", "fail"]
    assert calls(counter, "calls", task_id) == 2
    assert done - started < 15
    # and no lease is left behind to be renewed
    assert lease_of(own_pg.url, task_id) == (None, None)


def test_handler_exiting_its_threads_executor_charges_only_itself(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet
) -> None:
    # Given a solo hop worker, beat, and a threads executor running 10 slow bystanders
    env = {**QUICK}
    chaos_fleet.start(
        pool="solo", concurrency=1, queues="taskrail.hops,taskrail.control", extra_env=env
    )
    chaos_fleet.start_beat(extra_env=env)
    executor = chaos_fleet.start(queues="taskrail.execute", extra_env=env, **THREADS)
    bystanders = [api.submit("chaos", i, {"sleep_s": 2}) for i in range(10)]
    deadline = time.monotonic() + 20
    while sum(calls(counter, "calls", i) for i in bystanders) < 10:
        assert time.monotonic() < deadline, "the bystanders never started"
        time.sleep(0.05)
    # When a handler calls os._exit(1) while they run (every time it is called)
    poison = api.submit("exit", 99, {})
    executor.proc.wait(20)
    # and a new executor takes the dead one's place
    chaos_fleet.start(queues="taskrail.execute", extra_env=env, **THREADS)
    drain(own_pg.url, [poison, *bystanders], timeout=90, logs=chaos_fleet.logs)
    # Then every bystander completed without being charged an attempt, each re-run once
    for task_id in bystanders:
        task = api.get(task_id)
        assert task.status == "completed", task.last_error
        assert task.attempts == 1
        assert calls(counter, "calls", task_id) == 2
        assert events(own_pg.url, task_id) == ["assign", "start", "complete"]
    # and only the poison task paid: failed after max_attempts with the true reason
    task = api.get(poison)
    assert task.status == "failed"
    assert task.attempts == 3
    assert task.last_error == "gave up after 3 attempts: the handler's process died (exit code 1)"
    assert calls(counter, "calls", poison) == 4  # the lost run, then 3 isolated attempts
    assert events(own_pg.url, poison) == ["assign", "start", "fail"]


def test_messages_restored_after_a_kill_run_without_the_sweeper(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet
) -> None:
    # Given a hop worker, and an executor with one thread that prefetches 12 execute
    # messages while its first handler runs for a long time; no beat (no sweeper)
    env = {"TASKRAIL_VISIBILITY_TIMEOUT_S": "4", "TASKRAIL_LEASE_TTL_S": "3"}
    chaos_fleet.start(
        pool="solo", concurrency=1, queues="taskrail.hops,taskrail.control", extra_env=env
    )
    victim = chaos_fleet.start(
        pool="threads", concurrency=1, queues="taskrail.execute", extra_env=env
    )
    first = api.submit("chaos", 0, {"first_sleep_s": 600})
    deadline = time.monotonic() + 20
    while calls(counter, "calls", first) == 0:
        assert time.monotonic() < deadline, "the first handler never started"
        time.sleep(0.05)
    queued = [api.submit("chaos", i, {}) for i in range(1, 13)]
    time.sleep(2.0)  # their execute messages reach the executor's prefetch window
    assert all(calls(counter, "calls", i) == 0 for i in queued)
    # When the executor is SIGKILLed and another one starts
    victim.kill()
    chaos_fleet.start(pool="threads", concurrency=4, queues="taskrail.execute", extra_env=env)
    # Then every task completes through its restored message, the sweeper never ran
    drain(own_pg.url, [first, *queued], timeout=90, logs=chaos_fleet.logs)
    for task_id in [first, *queued]:
        assert api.get(task_id).status == "completed"
        assert events(own_pg.url, task_id) == ["assign", "start", "complete"]
    assert all(calls(counter, "calls", i) == 1 for i in queued)
    assert calls(counter, "calls", first) == 2
    assert api.get(first).attempts == 1
    assert "task_redriven" not in chaos_fleet.logs()


def test_failed_half_open_trials_use_no_attempt(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet
) -> None:
    # Given a service that is down, behind a breaker that opens on one failure and tries
    # again after 1 s, for an agent with 2 attempts; a worker and beat
    chaos_fleet.start(pool="solo", concurrency=1, extra_env=QUICK)
    chaos_fleet.start_beat(extra_env=QUICK)
    counter.set(key("trial:down"), "1")
    # When a task's first call fails (opening the breaker) and it then carries every
    # half-open trial while the outage lasts 8 s
    task_id = api.submit("svc_trial", 1, {})
    while int(counter.get(key("trial:down:calls")) or 0) == 0:
        time.sleep(0.05)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert api.get(task_id).status == "in_progress"
        time.sleep(0.2)
    trials = int(counter.get(key("trial:down:calls")) or 0)
    counter.set(key("trial:down"), "0")
    # Then the failed trials were the breaker's probes: the task completes once the
    # service is back, having used only its first attempt on the outage
    drain(own_pg.url, [task_id], timeout=30, logs=chaos_fleet.logs)
    task = api.get(task_id)
    assert trials >= 3, "the outage saw too few trials to mean anything"
    assert task.status == "completed", task.last_error
    assert task.attempts == 2
    assert events(own_pg.url, task_id) == ["assign", "start", "complete"]
