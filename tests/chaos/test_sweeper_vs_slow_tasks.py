"""An aggressive sweeper beside healthy workers whose handlers outlast the lease TTL."""

from __future__ import annotations

import time

import pytest
import redis

from tests.chaos import Workload, count_lines, report_numbers, start_workers
from tests.support import OwnPostgres, WorkerFleet, drain, verify_every_task

pytestmark = pytest.mark.chaos

AGGRESSIVE = {
    "TASKRAIL_SWEEP_INTERVAL_S": "0.5",
    "TASKRAIL_REDRIVE_AFTER_S": "1",
    "TASKRAIL_LEASE_TTL_S": "2",
}
SLOW_S = 3.0  # 1.5 lease TTLs: the lease keeper must renew for the handler to keep it


def test_aggressive_sweeper_never_double_drives_slow_but_alive_tasks(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    # Given two healthy workers and a beat sweeping every 0.5 s, re-driving whatever has
    # not moved for 1 s and whose 2 s lease has lapsed
    start_workers(chaos_fleet, 2, extra_env=AGGRESSIVE)
    chaos_fleet.start_beat(extra_env=AGGRESSIVE)
    # When 1,000 tasks flow in steadily (a deep queue would hold up the sweep job
    # itself), one in 40 with a handler slower than the lease TTL
    work = Workload.mixed(1000, slow_every=40, slow_s=SLOW_S)
    started = time.monotonic()
    work.feed(own_pg.url)
    done = drain(own_pg.url, work.ids, timeout=180, logs=chaos_fleet.logs)
    time.sleep(2.0)  # re-driven duplicates still queued must change nothing
    # Then every handler ran exactly once, and every transition is recorded once
    verdict = verify_every_task(
        own_pg.url, work.expected_by_id, counter, work.counted_ids, exactly_once=True
    )
    redriven = count_lines(chaos_fleet, '"task_redriven"')
    chaos_report(
        faults="sweeper every 0.5 s, redrive after 1 s, lease TTL 2 s, handlers of 3 s",
        run_s=round(done - started, 1), redriven=redriven,
        hops_skipped=count_lines(chaos_fleet, '"hop_skipped"'), **report_numbers(verdict),
    )  # fmt: skip
    assert redriven > 0, "the sweeper never raced the workers"
