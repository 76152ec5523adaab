"""A worker killed mid-handler of an agent with a one-hour time limit: back within 60 s."""

from __future__ import annotations

import os
import time

import pytest
import redis

from orchestration import api
from tests.agents import key
from tests.chaos import Feeder, Workload, elapsed_since, report_numbers, start_workers
from tests.support import OwnPostgres, WorkerFleet, drain, verify_every_task

pytestmark = pytest.mark.chaos


def test_worker_killed_mid_hour_long_handler_task_back_within_60s(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    # Given two workers and beat with DEFAULT recovery settings, and a task of an agent
    # with a one-hour time limit whose first call takes an hour
    workers = start_workers(chaos_fleet, 2)
    chaos_fleet.start_beat()
    hour_id = api.submit("chaos_hour", 1, {"first_sleep_s": 3600})
    deadline = time.monotonic() + 60
    while (pid := counter.get(key(f"pid:{hour_id}"))) is None:
        assert time.monotonic() < deadline, "the hour-long handler never started"
        time.sleep(0.1)
    # When the worker running that handler is SIGKILLed (its whole process group) and a
    # fresh worker takes its place
    victim = next(w for w in workers if w.proc.pid == os.getpgid(int(pid)))
    victim.kill()
    killed_at = time.monotonic()
    chaos_fleet.start(concurrency=2, wait=False)
    # while 1,000 other tasks flow in steadily (with a queue deeper than twice the sweep
    # interval the sweep job itself expires unrun; see the suite's report)
    work = Workload.mixed(1000)
    feeder = Feeder(work, own_pg.url, max_waiting=100)
    feeder.start()
    # Then the task is re-driven and completes within 60 s of the kill
    try:
        hour_done = drain(own_pg.url, [hour_id], timeout=60, logs=chaos_fleet.logs)
    finally:
        feeder.finish()
    assert hour_done - killed_at < 60
    assert api.get(hour_id).status == "completed"
    assert api.get(hour_id).attempts == 1  # the lost run used no attempt
    assert int(counter.get(key(f"calls:{hour_id}"))) == 2
    # and so does every other task, with one event per transition
    done = drain(own_pg.url, work.ids, timeout=120, logs=chaos_fleet.logs)
    expected = {**work.expected_by_id, hour_id: "completed"}
    verdict = verify_every_task(own_pg.url, expected, counter, [*work.counted_ids, hour_id])
    chaos_report(
        faults="1 SIGKILL of the worker running a 1 h handler (time limit 1 h)",
        hour_task_back_after_s=elapsed_since(killed_at, hour_done),
        drain_after_last_fault_s=elapsed_since(killed_at, done), **report_numbers(verdict),
    )  # fmt: skip
