"""The async executor (``--async-calls``, workers/aio.py) in the chaos suite: its process
group SIGKILLed mid-call again and again, the broker's Redis killed and restarted empty,
PostgreSQL stopped, each while hundreds of async tasks flow.

The fleet: a prefork hop worker (assign, start, control), two async executors (threads
pools with ``--async-calls 200``) on the execute queue, and beat. The tasks are the async
chaos agent's (tests/agents.py ``async_chaos``: it counts its calls, the pid of each, the
calls in flight, and the runs that returned), with every tenth a demo task (sync handlers
on the same executors, ending completed, failed or escalated).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from orchestration import constants as c
from tests.agents import key
from tests.chaos import (
    Feeder,
    Workload,
    count_lines,
    elapsed_since,
    report_numbers,
    wait_for_progress,
)
from tests.support import (
    OwnPostgres,
    OwnRedis,
    WorkerFleet,
    WorkerProcess,
    drain,
    verify_every_task,
)

pytestmark = pytest.mark.chaos

# The sweeper looks every second and re-drives what has not moved for 3 s.
QUICK = {"TASKRAIL_SWEEP_INTERVAL_S": "1", "TASKRAIL_REDRIVE_AFTER_S": "3"}
# ...and a killed executor's leases lapse after 3 s.
QUICK_LEASES = {**QUICK, "TASKRAIL_LEASE_TTL_S": "3"}
TASK_TYPE = "async_chaos"


def _executor(fleet: WorkerFleet, env: dict[str, str], wait: bool = True) -> WorkerProcess:
    return fleet.start(
        pool="threads",
        concurrency=4,
        queues=c.QUEUE_EXECUTE,
        extra_env=env,
        extra_args=["--async-calls", "200"],
        wait=wait,
    )


def _deploy(fleet: WorkerFleet, env: dict[str, str]) -> list[WorkerProcess]:
    """A prefork hop worker, two async executors and beat; returns the executors."""
    hops = fleet.start(concurrency=2, queues="taskrail.hops,taskrail.control", extra_env=env)
    executors = [_executor(fleet, env, wait=False) for _ in range(2)]
    for worker in executors:
        worker.wait_ready(60)
    fleet.start_beat(extra_env=env)
    assert hops.alive()
    return executors


def _group(pgid: int) -> set[int]:
    """The pids of process group ``pgid`` (a worker and any handler process it started)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp
            found.add(int(entry.name))
    return found


def _call_pids(counter: redis.Redis, ids: list[int]) -> dict[int, list[int]]:
    pipe = counter.pipeline(transaction=False)
    for task_id in ids:
        pipe.lrange(key(f"callpids:{task_id}"), 0, -1)
    replies = pipe.execute()
    return {task_id: [int(p) for p in pids] for task_id, pids in zip(ids, replies, strict=True)}


def _isolated(db_url: str) -> int:
    """How many tasks were taken over from a dead worker (they run isolated since)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM tasks WHERE isolated")).scalar_one())
    finally:
        engine.dispose()


def _runs(counter: redis.Redis, task_id: int) -> int:
    return int(counter.llen(key(f"runs:{task_id}")))


def test_async_executors_sigkilled_mid_call_repeatedly(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = 3
    # Given the fleet, leases of 3 s, and 800 tasks fed steadily (async calls of 0.5-1 s),
    # enough waiting that a kill hits many calls. A call a kill cuts short runs again on
    # an executor's loop (a take-over of a handed-over call is not isolated: its process
    # was shared by many); only a task whose take-over is killed too runs isolated.
    executors = _deploy(chaos_fleet, QUICK_LEASES)
    work = Workload.mixed(800, sleeps_s=(0.5, 1.0), task_type=TASK_TYPE)
    feeder = Feeder(work, own_pg.url, batch=20, max_waiting=150)
    feeder.start()
    wait_for_progress(own_pg.url, 30)
    # When, while they flow, an executor with calls in flight has its whole process group
    # SIGKILLed, and a fresh one is started in its place, again and again
    killed: set[int] = set()
    hits: list[int] = []  # calls in flight (all executors) at each kill
    for _ in range(kills):
        time.sleep(rng.uniform(0.5, 1.5))
        # (a kill is meant to cut calls short: wait until some are in flight)
        deadline = time.monotonic() + 30
        while int(counter.get(key("inflight")) or 0) < 5:
            assert time.monotonic() < deadline, "no calls in flight to kill"
            time.sleep(0.05)
        ready = [w for w in executors if w.alive() and '"worker_ready"' in w.log()]
        victim = rng.choice(ready or [w for w in executors if w.alive()])
        in_flight = int(counter.get(key("inflight")) or 0)
        killed |= _group(victim.proc.pid)
        victim.kill()
        hits.append(in_flight)
        executors.remove(victim)
        executors.append(_executor(chaos_fleet, QUICK_LEASES, wait=False))
    last_fault = time.monotonic()
    feeder.finish()
    # Then every task rests in its expected state with one event per transition, each
    # completed task's result is its own from a run that returned
    done = drain(own_pg.url, work.ids, timeout=150, logs=chaos_fleet.logs)
    verdict = verify_every_task(own_pg.url, work.expected_by_id, counter, work.counted_ids)
    # and a handler ran again only where a call of it was killed: every call but the last
    # ran in a killed process group, and a task none of whose calls was killed ran once
    # and returned once
    rerun_not_killed = []
    runs_not_killed = []
    killed_twice = 0
    for task_id, pids in _call_pids(counter, work.counted_ids).items():
        killed_twice += sum(pid in killed for pid in pids) >= 2
        if not set(pids[:-1]) <= killed:
            rerun_not_killed.append((task_id, pids))
        if not set(pids) & killed and (len(pids), _runs(counter, task_id)) != (1, 1):
            runs_not_killed.append((task_id, pids, _runs(counter, task_id)))
    assert rerun_not_killed == [], f"re-run though no call was killed: {rerun_not_killed[:10]}"
    assert runs_not_killed == [], f"ran more than once: {runs_not_killed[:10]}"
    isolated = _isolated(own_pg.url)
    chaos_report(
        seed=seed, faults=f"{kills} SIGKILLs of an async executor's process group",
        drain_after_last_fault_s=elapsed_since(last_fault, done), isolated_tasks=isolated,
        killed_twice=killed_twice,
        in_flight_at_kills=hits,
        redriven=count_lines(chaos_fleet, '"task_redriven"'), **report_numbers(verdict),
    )  # fmt: skip
    # and the kills did hit calls in flight, whose tasks were taken over and ran again on
    # a loop, not isolated
    taken_over_shared = sum(
        '"lease_taken_over"' in line and '"isolated": false' in line
        for line in chaos_fleet.logs().splitlines()
    )
    assert any(hits)
    assert verdict.rerun_tasks > 0 and taken_over_shared > 0
    # (a task is isolated only after a second take-over: a second death, or, with these
    # 3 s leases on a loaded machine, a live run whose renewal came too late; counted in
    # the report, not bounded here)


def test_broker_redis_killed_and_restarted_empty_under_async_executors(
    chaos_settings, own_pg: OwnPostgres, own_redis: OwnRedis, counter: redis.Redis,
    chaos_fleet: WorkerFleet, chaos_report,
) -> None:  # fmt: skip
    # Given the fleet and 600 tasks submitted at once (async calls of 0.2-0.5 s)
    _deploy(chaos_fleet, QUICK)
    work = Workload.mixed(600, sleeps_s=(0.2, 0.5), task_type=TASK_TYPE)
    work.submit()
    wait_for_progress(own_pg.url, 150)
    # When Redis (broker and breaker state) is SIGKILLed while calls are in flight and,
    # 2 s later, restarted empty
    in_flight = int(counter.get(key("inflight")) or 0)
    own_redis.stop()
    time.sleep(2.0)
    own_redis.start()
    last_fault = time.monotonic()
    # Then the sweeper re-drives what was lost and every task rests where it should, one
    # event per transition, each result from a run that returned
    done = drain(own_pg.url, work.ids, timeout=120, logs=chaos_fleet.logs)
    verdict = verify_every_task(own_pg.url, work.expected_by_id, counter, work.counted_ids)
    redriven = count_lines(chaos_fleet, '"task_redriven"')
    chaos_report(
        faults="Redis SIGKILLed under async executors, down 2 s, restarted empty",
        drain_after_last_fault_s=elapsed_since(last_fault, done), redriven=redriven,
        in_flight_at_fault=in_flight, **report_numbers(verdict),
    )  # fmt: skip
    assert redriven > 0
    # and no executor died of it
    assert all(w.alive() for w in chaos_fleet.workers)
    # and no call outlived a lost lease: no handler returned twice
    twice = [t for t in work.counted_ids if _runs(counter, t) > 1]
    assert twice == [], f"returned twice: {twice[:10]}"


def test_postgres_stopped_while_async_calls_are_in_flight(
    chaos_settings, own_pg: OwnPostgres, counter: redis.Redis, chaos_fleet: WorkerFleet,
    chaos_report,
) -> None:  # fmt: skip
    # Given the fleet (default leases: 20 s, longer than the outage) and 600 tasks whose
    # async calls take 1-2 s
    _deploy(chaos_fleet, QUICK)
    work = Workload.mixed(600, sleeps_s=(1.0, 2.0), task_type=TASK_TYPE)
    work.submit()
    wait_for_progress(own_pg.url, 100)
    # When PostgreSQL is stopped (fast: clients cut off) with calls in flight, for 6 s
    in_flight = int(counter.get(key("inflight")) or 0)
    own_pg.stop("fast")
    stopped = time.monotonic()
    time.sleep(max(0.0, 6.0 - (time.monotonic() - stopped)))
    own_pg.start()
    last_fault = time.monotonic()
    # Then the calls that ended meanwhile had their outcomes written once it was back,
    # and every task rests where it should, one event per transition
    done = drain(own_pg.url, work.ids, timeout=120, logs=chaos_fleet.logs)
    verdict = verify_every_task(own_pg.url, work.expected_by_id, counter, work.counted_ids)
    write_retries = count_lines(chaos_fleet, '"outcome_write_retry"')
    chaos_report(
        faults="PostgreSQL stopped 6 s under async executors", in_flight_at_fault=in_flight,
        drain_after_last_fault_s=elapsed_since(last_fault, done),
        outcome_write_retries=write_retries,
        redriven=count_lines(chaos_fleet, '"task_redriven"'), **report_numbers(verdict),
    )  # fmt: skip
    assert in_flight > 0
    assert write_retries > 0, "no outcome write met the outage"
    # and every handler returned once: the leases outlasted the outage
    for task_id in work.counted_ids:
        assert _runs(counter, task_id) == 1, f"task {task_id}: {_runs(counter, task_id)} runs"
    assert all(w.alive() for w in chaos_fleet.workers)
