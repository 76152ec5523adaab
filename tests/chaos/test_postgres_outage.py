"""PostgreSQL stopped for ~5 s (pg_ctl stop -m fast) and started again mid-run.

The outage lasts until a hop has met it and at least 5 s. A hop meets it by logging
``hop_retry_later`` (a hop that could not read or write) or ``outcome_write_retry`` (an
execute hop whose handler returned, writing its outcome until the database is back:
when every pool slot is doing that, no other hop runs until it is). A stale hop message
sent while the database is down makes sure one does, however far the run got, so the
test's check that the outage was noticed holds by construction.
"""

from __future__ import annotations

import time

import pytest
import redis

from orchestration import api
from orchestration import constants as c
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
    own_pg.stop("fast")
    stopped = time.monotonic()
    # and a hop meets the outage: besides the run's own, a stale assign of a task that
    # has moved on (the broker needs no database; once back, the hop drops it)
    api.client().dispatcher.send(c.HOP_ASSIGN, [work.ids[0], "chaos"])
    while _met(chaos_fleet) == 0:
        assert time.monotonic() - stopped < 60, "no hop met the outage in 60 s"
        time.sleep(0.1)
    # and it is started again once it has been down for 5 s
    time.sleep(max(0.0, 5.0 - (time.monotonic() - stopped)))
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
    assert _met(chaos_fleet) > 0, "the outage went unnoticed"


def _met(fleet: WorkerFleet) -> int:
    """Log lines of hops that met the outage (see the module's docstring)."""
    return count_lines(fleet, '"hop_retry_later"') + count_lines(fleet, '"outcome_write_retry"')
