"""Agents the tests register beside the demo ones.

Loaded with ``TASKRAIL_AGENTS=demo_agents,tests.agents``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from orchestration.agents import TaskView, agent


def _counter() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("TASKRAIL_REDIS_URL", "redis://127.0.0.1:6379/10"))


@agent("echo_agent", task_types=["echo"])
def echo(task: TaskView) -> dict[str, Any]:
    """Returns its payload; counts its calls per task in Redis (``calls:<task id>``)."""
    if task.payload.get("count_calls"):
        _counter().incr(f"calls:{task.id}")
    sleep_s = float(task.payload.get("sleep_s", 0))
    if sleep_s:
        time.sleep(sleep_s)
    return {"echo": dict(task.payload), "attempt": task.attempt}


@agent("bad_result_agent", task_types=["bad_result"])
def bad_result(task: TaskView) -> Any:
    return {"not json": object()}


@agent("slow_agent", task_types=["slow"], time_limit_s=3600)
def slow(task: TaskView) -> dict[str, Any]:
    """Counts calls (``calls:<id>``); the first call sleeps ``first_sleep_s`` (a long outside call)."""
    calls = _counter().incr(f"calls:{task.id}")
    if calls == 1:
        time.sleep(float(task.payload.get("first_sleep_s", 0)))
    return {"calls": calls}
