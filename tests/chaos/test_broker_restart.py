"""The broker's Redis killed and restarted empty mid-run: every queued message is lost."""

from __future__ import annotations

import time

import pytest
import redis

from tests.chaos import (
    Workload,
    count_lines,
    elapsed_since,
    report_numbers,
    start_workers,
    wait_for_progress,
)
from tests.support import OwnPostgres, OwnRedis, WorkerFleet, drain, verify_every_task

pytestmark = pytest.mark.chaos


def test_broker_redis_killed_and_restarted_empty(
    chaos_settings, own_pg: OwnPostgres, own_redis: OwnRedis, counter: redis.Redis,
    chaos_fleet: WorkerFleet, chaos_report,
) -> None:  # fmt: skip
    # Given two workers and beat with default recovery settings, and 1,000 tasks flowing
    start_workers(chaos_fleet, 2)
    chaos_fleet.start_beat()
    work = Workload.mixed(1000)
    work.submit()
    wait_for_progress(own_pg.url, 250)
    # When Redis (broker and breaker state) is SIGKILLed and, 2 s later, restarted empty
    own_redis.stop()
    time.sleep(2.0)
    own_redis.start()
    last_fault = time.monotonic()
    queued = redis.Redis.from_url(own_redis.url).dbsize()
    # Then the sweeper re-drives what was lost and every task rests where it should
    done = drain(own_pg.url, work.ids, timeout=150, logs=chaos_fleet.logs)
    verdict = verify_every_task(own_pg.url, work.expected_by_id, counter, work.counted_ids)
    redriven = count_lines(chaos_fleet, '"task_redriven"')
    chaos_report(
        faults="Redis SIGKILLed, down 2 s, restarted empty",
        drain_after_last_fault_s=elapsed_since(last_fault, done), redriven=redriven,
        keys_after_restart=queued, **report_numbers(verdict),
    )  # fmt: skip
    assert redriven > 0
