"""Poison messages and time limits: a handler that kills its worker, one that overruns."""

from __future__ import annotations

import time

import pytest
import redis

from orchestration import api
from tests.agents import key
from tests.chaos import Workload, report_numbers, start_workers
from tests.support import OwnPostgres, WorkerFleet, drain, event_paths, verify_every_task

pytestmark = pytest.mark.chaos

# Quick recovery: these tests are about how many times, not how soon.
QUICK = {
    "TASKRAIL_SWEEP_INTERVAL_S": "0.5",
    "TASKRAIL_REDRIVE_AFTER_S": "1",
    "TASKRAIL_LEASE_TTL_S": "2",
}


def test_handler_that_kills_its_worker_every_time_fails_after_max_attempts(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    # Given two workers and beat, and tasks whose handler SIGKILLs its own process
    workers = start_workers(chaos_fleet, 2, extra_env=QUICK)
    chaos_fleet.start_beat(extra_env=QUICK)
    started = time.monotonic()
    poison = [api.submit("suicide", i, {}) for i in range(3)]
    work = Workload.mixed(100)
    work.submit()
    # When they run (and the pool replaces each killed process)
    done = drain(own_pg.url, [*poison, *work.ids], timeout=120, logs=chaos_fleet.logs)
    time.sleep(3.0)  # a looping poison message would call the handler again meanwhile
    # Then each poison task failed after max_attempts (3) isolated calls, saying its
    # process died; the first call, which took its worker down with whatever ran beside
    # it, used no attempt (no one can tell the poison from its bystanders then)
    paths = event_paths(own_pg.url)
    for task_id in poison:
        task = api.get(task_id)
        assert task.status == "failed"
        assert task.last_error == (
            "gave up after 3 attempts: the handler's process died (killed by SIGKILL)"
        )
        assert task.attempts == 3
        assert int(counter.get(key(f"calls:{task_id}"))) == 4
        assert [event for event, _, _ in paths[task_id]] == ["assign", "start", "fail"]
    # and the other tasks were served as usual by the same workers
    verdict = verify_every_task(own_pg.url, work.expected_by_id, counter, work.counted_ids)
    assert all(worker.alive() for worker in workers)
    chaos_report(
        faults="3 tasks whose handler SIGKILLs its process, 3 times each",
        poison_reason=api.get(poison[0]).last_error, run_s=round(done - started, 1),
        **report_numbers(verdict),
    )  # fmt: skip


def test_handler_past_its_time_limit_is_stopped_and_counted_as_a_failed_attempt(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    # Given a worker, and an agent with a 1 s time limit and 2 attempts whose handler
    # would sleep 30 s
    start_workers(chaos_fleet, 1)
    started = time.monotonic()
    task_id = api.submit("overrun", 1, {"sleep_s": 30})
    # When it runs
    done = drain(own_pg.url, [task_id], timeout=25, logs=chaos_fleet.logs)
    # Then each call was stopped at the limit and counted as a failed attempt
    task = api.get(task_id)
    assert task.status == "failed"
    assert task.attempts == 2
    assert int(counter.get(key(f"calls:{task_id}"))) == 2
    assert "gave up after 2 attempts: time limit of 1 s exceeded" in (task.last_error or "")
    assert [event for event, _, _ in event_paths(own_pg.url)[task_id]] == [
        "assign", "start", "fail",
    ]  # fmt: skip
    assert done - started < 20, "the handler was not stopped at its time limit"
    chaos_report(faults="handler runs past a 1 s time limit",
                 rests_after_s=round(done - started, 1), reason=task.last_error)  # fmt: skip
