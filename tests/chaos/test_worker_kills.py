"""Worker processes SIGKILLed at random moments, again and again, while tasks flow."""

from __future__ import annotations

import random
import time

import pytest
import redis

from tests.chaos import Workload, count_lines, elapsed_since, report_numbers, start_workers
from tests.support import OwnPostgres, WorkerFleet, drain, verify_every_task

pytestmark = pytest.mark.chaos

KILLS = 6


def test_workers_sigkilled_repeatedly_while_tasks_flow(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Given two worker processes (prefork, two children each) and beat, default recovery
    workers = start_workers(chaos_fleet, 2)
    chaos_fleet.start_beat()
    work = Workload.mixed(1000, slow_every=10, slow_s=0.3)
    # When the tasks arrive in waves, 2-4 s apart, and while each wave is being worked
    # (0.2-0.8 s after it arrives: a wave of ~170 tasks, 17 of them 0.3 s handlers on
    # four pool processes, takes over a second even on a fast machine, so the kill
    # lands on hops in flight) a random worker's whole process group is SIGKILLed and
    # a fresh worker started in its place
    for start, stop in work.chunks(KILLS):
        work.submit(start, stop)
        wave_s, kill_at = rng.uniform(2.0, 4.0), rng.uniform(0.2, 0.8)
        time.sleep(kill_at)
        victim = rng.choice(workers)
        victim.kill()
        workers.remove(victim)
        workers.append(chaos_fleet.start(concurrency=2, wait=False))
        time.sleep(wave_s - kill_at)
    last_fault = time.monotonic()
    # Then every task rests in its expected state, each transition recorded once, and
    # each completed task's result is the return value of one of its handler's runs
    done = drain(own_pg.url, work.ids, timeout=150, logs=chaos_fleet.logs)
    verdict = verify_every_task(own_pg.url, work.expected_by_id, counter, work.counted_ids)
    redriven = count_lines(chaos_fleet, '"task_redriven"')
    chaos_report(
        seed=seed, faults=f"{KILLS} SIGKILLs of a worker's process group",
        drain_after_last_fault_s=elapsed_since(last_fault, done), redriven=redriven,
        **report_numbers(verdict),
    )  # fmt: skip
    assert redriven > 0, "the kills lost no message: nothing was re-driven"
