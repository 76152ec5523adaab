"""PostgreSQL stopped for 10 s while 40 handlers of 3 s run (issue 18.3).

The deployment of the Procfile: a solo worker for the short hops, a threads executor
for the handlers, beat for the sweeper. A handler that has returned keeps its outcome:
its final write waits for the database; no handler runs to completion twice.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.agents import key
from tests.chaos import Workload, count_lines, elapsed_since, report_numbers
from tests.support import OwnPostgres, WorkerFleet, drain, verify_every_task

pytestmark = pytest.mark.chaos


def _started(counter: redis.Redis, ids: list[int]) -> int:
    return sum(1 for value in counter.mget([key(f"calls:{i}") for i in ids]) if value)


def test_postgres_stopped_10s_while_40_handlers_run(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    # Given the Procfile's processes: a solo hop worker, a threads executor, beat
    chaos_fleet.start(pool="solo", concurrency=1, queues="taskrail.hops,taskrail.control")
    chaos_fleet.start(pool="threads", concurrency=50, queues="taskrail.execute")
    chaos_fleet.start_beat()
    # And 40 tasks whose handlers take 3 s, all running
    work = Workload.mixed(40, sleeps_s=(3.0,), demo_every=0)
    work.submit()
    deadline = time.monotonic() + 30
    while _started(counter, work.ids) < len(work.ids):
        assert time.monotonic() < deadline, f"{_started(counter, work.ids)} handlers started"
        time.sleep(0.05)
    # When PostgreSQL stops (fast: clients cut off) for 10 s while they run
    own_pg.stop("fast")
    time.sleep(10.0)
    own_pg.start()
    healed = time.monotonic()
    # Then every task completes, one event per transition, and no handler ran twice
    done = drain(own_pg.url, work.ids, timeout=90, logs=chaos_fleet.logs)
    verdict = verify_every_task(
        own_pg.url, work.expected_by_id, counter, work.counted_ids, exactly_once=True
    )
    chaos_report(
        faults="PostgreSQL stopped 10 s under 40 running 3 s handlers",
        drain_after_last_fault_s=elapsed_since(healed, done),
        outcome_write_retries=count_lines(chaos_fleet, '"outcome_write_retry"'),
        **report_numbers(verdict),
    )
    assert verdict.rerun_tasks == 0
    assert count_lines(chaos_fleet, '"outcome_write_retry"') > 0, "the outage went unnoticed"
