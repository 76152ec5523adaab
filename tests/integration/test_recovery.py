"""Recovery on real servers: lost messages and dead workers are re-driven by the sweeper."""

from __future__ import annotations

import time

import pytest
import redis

from orchestration import api
from tests.agents import key
from tests.support import (
    KEY_PREFIX,
    WorkerFleet,
    assert_valid_path,
    event_paths,
    purge,
    wait_until_resting,
)

pytestmark = pytest.mark.integration

FAST_SWEEP = {
    "TASKRAIL_SWEEP_INTERVAL_S": "1",
    "TASKRAIL_REDRIVE_AFTER_S": "2",
}


def test_lost_messages_are_redriven_by_the_sweeper(
    server_settings, broker_url: str, pg_url: str, fleet: WorkerFleet
) -> None:
    # Given 200 submitted tasks whose messages are all lost (as in a Redis restart)
    ids = api.submit_many([{"task_type": "payroll", "client_id": i} for i in range(200)])
    purge(broker_url, KEY_PREFIX)
    # When workers and beat run
    fleet.start(concurrency=2, extra_env=FAST_SWEEP)
    fleet.start_beat(extra_env=FAST_SWEEP)
    # Then every task completes through a valid path
    statuses = wait_until_resting(pg_url, ids, timeout=90)
    assert set(statuses.values()) == {"completed"}
    paths = event_paths(pg_url)
    for task_id in ids:
        assert_valid_path(task_id, paths[task_id], "completed")
    assert "task_redriven" in fleet.logs()


def test_worker_killed_mid_handler_with_one_hour_limit_is_redriven_within_60s(
    server_settings, counter_url: str, pg_url: str, fleet: WorkerFleet
) -> None:
    # Given an agent with a one-hour time limit whose first call takes 10 minutes,
    # default recovery settings, one worker and beat
    calls = redis.Redis.from_url(counter_url)
    victim = fleet.start(concurrency=1)
    fleet.start_beat()
    task_id = api.submit("slow", 1, {"first_sleep_s": 600})
    deadline = time.monotonic() + 30
    while calls.get(key(f"calls:{task_id}")) is None:
        assert time.monotonic() < deadline, "handler never started"
        time.sleep(0.1)
    # When the worker is killed with SIGKILL mid-handler and a new one starts
    killed_at = time.monotonic()
    victim.kill()
    fleet.start(concurrency=1)
    # Then the task is re-driven and completes within 60 s, with one event per transition
    statuses = wait_until_resting(pg_url, [task_id], timeout=60)
    assert statuses[task_id] == "completed"
    assert time.monotonic() - killed_at < 60
    assert int(calls.get(key(f"calls:{task_id}"))) == 2
    assert_valid_path(task_id, event_paths(pg_url)[task_id], "completed")
    # the lost run used no attempt: the worker died, not the handler
    assert api.get(task_id).attempts == 1


def test_sweeper_does_not_resend_a_queued_backlog(server_settings, pg_url: str) -> None:
    # Given 150 pending tasks whose messages still wait in the queue (no workers), all
    # older than the re-drive delay, and one in_progress task whose worker died
    from sqlalchemy import text as sql

    from orchestration.store.recovery import sweep

    trail = api.client()
    ids = trail.submit_many([{"task_type": "payroll", "client_id": i} for i in range(150)])
    with trail.db.begin() as conn:
        conn.execute(sql("UPDATE tasks SET updated_at = now() - interval '1 hour'"))
        conn.execute(
            sql(
                "UPDATE tasks SET status = 'in_progress', assigned_agent = 'payroll_agent', "
                "attempts = 1, lease_owner = 'dead', "
                "lease_expires_at = now() - interval '1 minute' "
                "WHERE id = :id"
            ),
            {"id": ids[0]},
        )
    # When a sweep runs with a batch smaller than the backlog
    redriven = sweep(trail.db, trail.dispatcher, redrive_after_s=15, batch=100)
    # Then only the dead worker's task is re-driven; the queued ones are left alone
    assert [(r.task_id, r.hop) for r in redriven] == [(ids[0], "taskrail.execute")]
    # and once the queue is drained (messages lost), the pending ones are re-driven
    purge(server_settings.effective_broker_url, KEY_PREFIX)
    redriven = sweep(trail.db, trail.dispatcher, redrive_after_s=15, batch=100)
    assert len(redriven) == 100
    assert {r.hop for r in redriven} == {"taskrail.assign"}


def test_two_sweepers_at_once_never_claim_the_same_task(server_settings, pg_url: str) -> None:
    # Given 400 stuck pending tasks (as if two beat processes ran by mistake)
    import threading

    from sqlalchemy import text as sql

    from orchestration.store.db import Database
    from orchestration.store.recovery import claim_stuck

    trail = api.client()
    trail.submit_many([{"task_type": "payroll", "client_id": i} for i in range(400)])
    with trail.db.begin() as conn:
        conn.execute(sql("UPDATE tasks SET updated_at = now() - interval '1 hour'"))
    # When two sweepers claim at the same moment, each on its own connections
    barrier = threading.Barrier(2)
    claimed: list[list[int]] = [[], []]

    def sweeper(slot: int) -> None:
        db = Database(pg_url)
        barrier.wait()
        for _ in range(5):
            claimed[slot] += [r.task_id for r in claim_stuck(db, redrive_after_s=15, batch=50)]
        db.dispose()

    threads = [threading.Thread(target=sweeper, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Then no task is claimed twice, and between them they claimed all 400
    both = claimed[0] + claimed[1]
    assert len(both) == len(set(both))
    assert len(both) == 400
