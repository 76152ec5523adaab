"""PostgreSQL stopped for ~5 s (pg_ctl stop -m fast) and started again mid-run."""

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
from tests.support import OwnPostgres, WorkerFleet, drain, verify_every_task

pytestmark = pytest.mark.chaos


def test_postgres_stopped_for_5s_mid_run(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    # Given two workers and beat with default recovery settings, and 1,000 tasks flowing
    start_workers(chaos_fleet, 2)
    chaos_fleet.start_beat()
    work = Workload.mixed(1000)
    work.submit()
    wait_for_progress(own_pg.url, 250)
    # When PostgreSQL is stopped (fast: open transactions rolled back, clients cut off)
    # and started again 5 s later
    own_pg.stop("fast")
    time.sleep(5.0)
    own_pg.start()
    last_fault = time.monotonic()
    # Then every task rests where it should, each transition recorded once
    done = drain(own_pg.url, work.ids, timeout=150, logs=chaos_fleet.logs)
    verdict = verify_every_task(own_pg.url, work.expected_by_id, counter, work.counted_ids)
    chaos_report(
        faults="PostgreSQL stopped 5 s",
        drain_after_last_fault_s=elapsed_since(last_fault, done),
        hop_retries=count_lines(chaos_fleet, '"hop_retry_later"'),
        redriven=count_lines(chaos_fleet, '"task_redriven"'), **report_numbers(verdict),
    )  # fmt: skip
    assert count_lines(chaos_fleet, '"hop_retry_later"') > 0, "the outage went unnoticed"
