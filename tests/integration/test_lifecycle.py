"""The lifecycle end to end on real PostgreSQL, Redis and `celery -A workers worker` processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer
from sqlalchemy import create_engine, text

from demo_agents import expected_status, scenario_for
from orchestration import api
from orchestration.api import NewTask
from orchestration.messaging.dispatch import Dispatcher, make_celery
from tests.agents import key
from tests.support import (
    KEY_PREFIX,
    WorkerFleet,
    assert_valid_path,
    event_paths,
    run_cli,
    wait_until_resting,
)

pytestmark = pytest.mark.integration

DEMO_TYPES = ("personal_tax", "payroll", "bookkeeping")
EVENTS_TO_REST = {"completed": 3, "failed": 3, "escalated": 3}


def _demo_items(n: int) -> list[NewTask]:
    return [NewTask(DEMO_TYPES[i % 3], 5000 + i, {"scenario": scenario_for(i)}) for i in range(n)]


def _check_every_task(pg_url: str, ids: list[int], items: list[NewTask]) -> None:
    statuses = wait_until_resting(pg_url, ids, timeout=180)
    paths = event_paths(pg_url)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        results = dict(conn.execute(text("SELECT id, result FROM tasks")).all())
    engine.dispose()
    for task_id, item in zip(ids, items, strict=True):
        want = expected_status(str(item.payload["scenario"]))  # type: ignore[index]
        assert statuses[task_id] == want, f"task {task_id} ({item.payload}) is {statuses[task_id]}"
        assert_valid_path(task_id, paths[task_id], want)
        assert len(paths[task_id]) == EVENTS_TO_REST[want], paths[task_id]
        assert (results[task_id] is not None) == (want == "completed")


def test_500_demo_tasks_through_two_workers(
    server_settings, pg_url: str, fleet: WorkerFleet
) -> None:
    # Given two worker processes on the real servers
    fleet.start(concurrency=2)
    fleet.start(concurrency=2)
    # When 500 demo tasks are submitted (ok, flaky, missing document, invalid)
    items = _demo_items(500)
    ids = api.submit_many(items)
    # Then each reaches its expected final state through a valid path, one event per transition
    _check_every_task(pg_url, ids, items)
    flaky = [i for i, item in zip(ids, items, strict=True) if item.payload["scenario"] == "flaky"]
    assert flaky
    assert {api.get(i).attempts for i in flaky} == {2}
    # and both workers took part
    workers_seen = {e.worker for i in ids[:100] for e in api.history(i)}
    assert len(workers_seen) >= 2, workers_seen


def test_every_hop_message_delivered_twice(
    server_settings, server_env: dict[str, str], pg_url: str, fleet: WorkerFleet
) -> None:
    # Given workers that publish every hop message a second time
    dup_env = {"TASKRAIL_AGENTS": server_env["TASKRAIL_AGENTS"] + ",tests.duplicate_hops"}
    fleet.start(concurrency=2, extra_env=dup_env)
    fleet.start(concurrency=2, extra_env=dup_env)
    # When 150 tasks are submitted and their first hop is also sent twice
    items = _demo_items(150)
    ids = api.submit_many(items)
    Dispatcher(make_celery(server_settings)).send_many(
        "taskrail.assign", [[i, item.task_type] for i, item in zip(ids, items, strict=True)]
    )
    # Then no task has an extra event and the final states are the same
    _check_every_task(pg_url, ids, items)
    time.sleep(1.0)  # let the last duplicates arrive; they must change nothing
    _check_every_task(pg_url, ids, items)
    assert '"hop_skipped"' in fleet.logs()


def test_bad_messages_are_dropped_and_the_worker_keeps_going(
    server_settings, broker_url: str, pg_url: str, fleet: WorkerFleet
) -> None:
    # Given one worker
    worker = fleet.start(pool="prefork", concurrency=1)
    app = make_celery(server_settings)
    exchange = Exchange("taskrail.hops", type="direct")
    # When messages arrive for a task that does not exist, with bad arguments,
    # for an unregistered task, with a body that is not JSON, and pickled
    app.send_task("taskrail.assign", args=[987654, "personal_tax"], queue="taskrail.hops")
    app.send_task("taskrail.start", args=["abc"], queue="taskrail.hops")
    app.send_task("taskrail.execute", args=[1], kwargs={"evil": 1}, queue="taskrail.hops")
    app.send_task("taskrail.no_such_hop", args=[1], queue="taskrail.hops")
    with Connection(broker_url, transport_options={"global_keyprefix": KEY_PREFIX}) as conn:
        producer = Producer(conn.channel(), exchange=exchange, routing_key="taskrail.hops")
        headers = {"task": "taskrail.start", "id": "not-json-1", "lang": "py"}
        producer.publish(
            b"{this is not json",
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
        )
        producer.publish([[1], {}, {}], serializer="pickle", headers={**headers, "id": "pickled-1"})
    # Then a real task submitted afterwards still completes
    task_id = api.submit("personal_tax", 77, {"scenario": "ok"})
    statuses = wait_until_resting(pg_url, [task_id], timeout=60)
    assert statuses[task_id] == "completed"
    assert worker.alive()
    log = worker.log()
    assert "no such task" in log
    assert "task_id must be a non-negative integer" in log
    assert "unexpected arguments" in log
    assert "taskrail.no_such_hop" in log
    assert "pickle" in log.lower()
    assert "not-json-1" in log or "decode" in log.lower()
    # and nothing was written for the bad messages
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tasks")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM task_events")).scalar() == 3
    engine.dispose()
    # and the broker queue is drained (nothing stuck for redelivery)
    assert redis.Redis.from_url(broker_url).llen(key("taskrail.hops")) == 0


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    # Given a clean directory and no TASKRAIL_* configuration
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    # When the README's main command runs there
    done = run_cli(["demo", "-n", "40", "--json"], env=env, cwd=tmp_path, timeout=180)
    # Then every task reached its expected final state, on a SQLite file it created
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["submitted"] == 40
    assert report["counts"] == {k: v for k, v in report["expected"].items() if v}
    assert (tmp_path / ".taskrail" / "taskrail.db").exists()
