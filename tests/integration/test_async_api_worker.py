"""Tasks submitted through the async producer API (issue 22.4) run on real
``celery -A workers worker`` processes: the first hops it pushes with ``redis.asyncio``
are the sync API's messages, and the workers take them to the end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis

from demo_agents import expected_status, scenario_for
from orchestration import api
from orchestration.api import NewTask, aio
from orchestration.constants import QUEUE_HOPS
from orchestration.settings import Settings
from tests.support import (
    KEY_PREFIX,
    WorkerFleet,
    assert_valid_path,
    event_paths,
    wait_until_resting,
)

pytestmark = pytest.mark.integration

DEMO_TYPES = ("personal_tax", "payroll", "bookkeeping")


def _waiting(broker_url: str) -> list[dict[str, Any]]:
    """The messages on the hops queue, oldest first, decoded."""
    client = redis.Redis.from_url(broker_url)
    try:
        return [json.loads(m) for m in reversed(client.lrange(KEY_PREFIX + QUEUE_HOPS, 0, -1))]
    finally:
        client.close()


def _shape(message: dict[str, Any]) -> dict[str, Any]:
    """A message with what differs from one send to the next (ids, origin) taken out."""
    headers = {
        k: v for k, v in message["headers"].items() if k not in ("id", "root_id", "argsrepr")
    }
    properties = {
        k: v
        for k, v in message["properties"].items()
        if k not in ("correlation_id", "delivery_tag")
    }
    return {**message, "headers": headers, "properties": properties, "body": None}


def test_tasks_submitted_through_the_async_api_run_to_the_end(
    server_settings: Settings, broker_url: str, pg_url: str, fleet: WorkerFleet
) -> None:
    # Given a task submitted through each API, before any worker runs
    sync_id = api.submit("payroll", 1, {"scenario": "ok"})

    async def submit_all() -> list[int]:
        async with aio.AsyncTaskrail(server_settings) as trail:
            first = await trail.submit("payroll", 2, {"scenario": "ok"})
            items = [
                NewTask(DEMO_TYPES[i % 3], 7000 + i, {"scenario": scenario_for(i)})
                for i in range(120)
            ]
            many = await trail.submit_many(items)
            one_by_one = await asyncio.gather(
                *(trail.submit("bookkeeping", 8000 + i, {"scenario": "ok"}) for i in range(30))
            )
        via_module = await aio.submit("personal_tax", 9000, {"scenario": "ok"})
        await aio.reset_client()
        return [first, *many, *one_by_one, via_module]

    ids = asyncio.run(submit_all())

    # Then the async API's messages are the sync API's (ids apart), one per task
    waiting = _waiting(broker_url)
    assert len(waiting) == 1 + len(ids)
    assert [_shape(m) for m in waiting[1:]] == [_shape(waiting[0])] * len(ids)
    assert [m["headers"]["argsrepr"] for m in waiting[:2]] == [
        repr([sync_id, "payroll"]),
        repr([ids[0], "payroll"]),
    ]

    # When workers run
    fleet.start(concurrency=2)
    fleet.start(pool="threads", concurrency=8)

    # Then every task reaches the state its scenario leads to, through a valid path
    statuses = wait_until_resting(pg_url, [sync_id, *ids], timeout=180)
    paths = event_paths(pg_url)
    scenarios = {ids[0]: "ok", ids[-1]: "ok"}
    scenarios.update({task_id: scenario_for(i) for i, task_id in enumerate(ids[1:121])})
    scenarios.update({task_id: "ok" for task_id in ids[121:151]})
    for task_id, scenario in scenarios.items():
        want = expected_status(scenario)
        assert statuses[task_id] == want, (task_id, scenario, statuses[task_id])
        assert_valid_path(task_id, paths[task_id], want)
    assert statuses[sync_id] == "completed"
