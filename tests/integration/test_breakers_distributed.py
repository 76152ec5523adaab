"""Breakers across real worker processes: shared state, deferral, escalation, failover."""

from __future__ import annotations

import json
import time

import pytest
import redis
from sqlalchemy import create_engine, text

from orchestration import api
from orchestration.breakers import BreakerBoard
from tests.agents import key
from tests.support import (
    BREAKER_NAMESPACE,
    OwnRedis,
    WorkerFleet,
    assert_valid_path,
    event_paths,
    run_cli,
    wait_until_resting,
)

pytestmark = pytest.mark.integration


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _breaker(board: BreakerBoard, name: str):  # type: ignore[no-untyped-def]
    return next((b for b in board.list() if b.name == name), None)


def _calls(counter: redis.Redis, flag: str) -> int:
    return int(counter.get(key(f"{flag}:calls")) or 0)


def _attempts(pg_url: str, ids: list[int]) -> dict[int, tuple[str, int]]:
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, status, attempts FROM tasks")).all()
    engine.dispose()
    return {i: (s, a) for i, s, a in rows if i in ids}


def test_open_breaker_stops_calls_cluster_wide_then_one_trial_then_recovery(
    server_settings, breaker_redis_url: str, pg_url: str, fleet: WorkerFleet, counter_url: str
) -> None:
    # Given a service that is down and two worker processes sharing its breaker
    counter = redis.Redis.from_url(counter_url)
    counter.set(key("svc:down"), "1")
    board = BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE)
    fleet.start(concurrency=2)
    fleet.start(concurrency=2)
    # When 12 tasks need the service
    ids = api.submit_many([{"task_type": "svc", "client_id": i} for i in range(12)])
    # Then the breaker opens after fail_max (3) failures counted across both processes
    info = _wait_for(
        lambda: (b := _breaker(board, "agent:svc_agent")) and b.state == "open" and b, 30, "open"
    )
    assert info.fail_count == 3
    # Each process trusts its cached view of the breaker for up to cache_ttl_s (1 s): a
    # call admitted in that window, or already in flight, may still happen.
    time.sleep(1.2)
    opened_calls = _calls(counter, "svc:down")
    assert 3 <= opened_calls <= 3 + 4
    # and once every process sees it open, the handler is not called at all
    time.sleep(1.5)
    assert _calls(counter, "svc:down") == opened_calls
    assert _breaker(board, "agent:svc_agent").state == "open"
    rows = _attempts(pg_url, ids)
    assert {status for status, _ in rows.values()} == {"in_progress"}
    assert sum(attempts for _, attempts in rows.values()) == opened_calls
    # When the reset timeout passes, exactly one trial call happens cluster-wide
    _wait_for(lambda: _calls(counter, "svc:down") > opened_calls, 15, "the trial call")
    time.sleep(1.0)
    assert _calls(counter, "svc:down") == opened_calls + 1
    # When the service recovers, every task completes and the breaker closes
    counter.set(key("svc:down"), "0")
    statuses = wait_until_resting(pg_url, ids, timeout=60)
    assert set(statuses.values()) == {"completed"}
    assert _breaker(board, "agent:svc_agent").state == "closed"
    paths = event_paths(pg_url)
    for task_id in ids:
        assert_valid_path(task_id, paths[task_id], "completed")
    assert '"hop_deferred"' in fleet.logs()


def test_breaker_open_longer_than_max_deferral_escalates(
    server_settings, pg_url: str, fleet: WorkerFleet, counter_url: str
) -> None:
    # Given an agent whose service stays down longer than its max_deferral_s (3 s)
    counter = redis.Redis.from_url(counter_url)
    counter.set(key("doomed:down"), "1")
    fleet.start(concurrency=2)
    # When tasks need it
    ids = api.submit_many([{"task_type": "svc_doomed", "client_id": i} for i in range(4)])
    # Then they end escalated, with the breaker as the reason
    statuses = wait_until_resting(pg_url, ids, timeout=60)
    assert set(statuses.values()) == {"escalated"}
    for task_id in ids:
        last = api.history(task_id)[-1]
        assert last.event == "escalate"
        assert last.detail is not None
        assert last.detail.startswith("breaker agent:svc_doomed_agent open since ")
        assert_valid_path(task_id, event_paths(pg_url)[task_id], "escalated")


def test_assign_prefers_the_agent_whose_breaker_is_closed(
    server_settings, breaker_redis_url: str, pg_url: str, fleet: WorkerFleet, counter_url: str
) -> None:
    # Given two agents for one task type, one of them broken
    counter = redis.Redis.from_url(counter_url)
    counter.set(key("dual_broken:down"), "1")
    board = BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE)
    fleet.start(concurrency=2)
    fleet.start(concurrency=2)
    first = api.submit_many([{"task_type": "dual", "client_id": i} for i in range(8)])
    _wait_for(
        lambda: (b := _breaker(board, "agent:dual_broken_agent")) and b.state == "open",
        30,
        "the broken agent's breaker to open",
    )
    time.sleep(1.5)  # longer than the workers' breaker cache
    # When new tasks of that type arrive
    second = api.submit_many([{"task_type": "dual", "client_id": 100 + i} for i in range(10)])
    statuses = wait_until_resting(pg_url, second, timeout=60)
    # Then they all go to the healthy agent and complete
    assert set(statuses.values()) == {"completed"}
    assert {api.get(i).assigned_agent for i in second} == {"dual_ok_agent"}
    assert {api.get(i).assigned_agent for i in first} == {"dual_ok_agent", "dual_broken_agent"}


def test_breaker_redis_stopped_and_restarted_loses_no_task(
    server_settings, server_env: dict[str, str], pg_url: str, fleet: WorkerFleet
) -> None:
    # Given breaker state on a Redis of the test's own
    own = OwnRedis().start()
    try:
        env = {"TASKRAIL_REDIS_URL": own.url}
        fleet.start(concurrency=2, extra_env=env)
        fleet.start(concurrency=2, extra_env=env)
        ids = api.submit_many(
            [
                {"task_type": "echo", "client_id": i, "payload": {"sleep_s": 0.02}}
                for i in range(300)
            ]
        )
        _wait_for(lambda: len(event_paths(pg_url)) > 20, 30, "the run to get going")
        # When that Redis is killed mid-run and restarted empty 3 s later
        own.stop()
        time.sleep(3)
        own.start()
        # Then no task is lost: all complete, each through a valid path
        statuses = wait_until_resting(pg_url, ids, timeout=120)
        assert set(statuses.values()) == {"completed"}
        paths = event_paths(pg_url)
        for task_id in ids:
            assert_valid_path(task_id, paths[task_id], "completed")
        assert "hop_retry_later" in fleet.logs()
    finally:
        own.stop()


def test_operator_lists_and_resets_breakers_from_the_cli(
    server_settings, server_env: dict[str, str], breaker_redis_url: str
) -> None:
    # Given an agent's breaker opened by failures
    board = BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE)
    breaker = board.breaker("agent:svc_agent", fail_max=2, reset_timeout_s=60)
    for _ in range(2):
        permit = breaker.before_call()
        breaker.on_failure(permit, ConnectionError("down"))
    # When an operator lists the breakers
    listed = run_cli(["breakers", "--json"], env=server_env)
    # Then it is open with its failure count, and every agent's breaker is listed
    assert listed.returncode == 0, listed.stderr
    infos = {info["name"]: info for info in json.loads(listed.stdout)}
    assert infos["agent:svc_agent"]["state"] == "open"
    assert infos["agent:svc_agent"]["fail_count"] == 2
    assert infos["agent:svc_agent"]["opened_at"] is not None
    assert infos["agent:payroll_agent"]["state"] == "closed"
    # When the operator resets it, it is closed for everyone
    reset = run_cli(["breakers", "reset", "agent:svc_agent"], env=server_env)
    assert reset.returncode == 0, reset.stderr
    after = {
        i["name"]: i for i in json.loads(run_cli(["breakers", "--json"], env=server_env).stdout)
    }
    assert after["agent:svc_agent"]["state"] == "closed"
    assert after["agent:svc_agent"]["fail_count"] == 0
    # and an unknown name is a clear error
    unknown = run_cli(["breakers", "reset", "agent:nope"], env=server_env)
    assert unknown.returncode == 2
    assert "no breaker named 'agent:nope'" in unknown.stderr
