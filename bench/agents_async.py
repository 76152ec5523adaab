"""The agents of bench/aio.py: one slow outside call, written as an ``async def`` and as a
plain function, so that the two executors run the same work.

- ``llm_async``: awaits ``asyncio.sleep(work_ms)``, standing in for an LLM call made with
  an async client; the async executor (``--async-calls``) runs it on its event loop.
- ``llm_sync``: ``time.sleep(work_ms)``, the same call with a blocking client; it holds
  one executor thread for its whole wait.

Both return a small dict, so every task completes in three hops (assign, start,
execute). Workers and the driver load this module as ``bench.agents_async``
(``TASKRAIL_AGENTS``), from the repository root.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from orchestration.agents import TaskView, agent

ASYNC_TASK_TYPE = "llm_async"
SYNC_TASK_TYPE = "llm_sync"
# Well above the 5 s call: the benchmark measures calls, not time limits.
TIME_LIMIT_S = 60.0


def _result(task: TaskView) -> dict[str, Any]:
    return {"client_id": task.client_id, "attempt": task.attempt}


@agent("llm_async_agent", task_types=[ASYNC_TASK_TYPE], time_limit_s=TIME_LIMIT_S)
async def llm_async(task: TaskView) -> dict[str, Any]:
    await asyncio.sleep(float(task.payload.get("work_ms", 0)) / 1000.0)
    return _result(task)


@agent("llm_sync_agent", task_types=[SYNC_TASK_TYPE], time_limit_s=TIME_LIMIT_S)
def llm_sync(task: TaskView) -> dict[str, Any]:
    time.sleep(float(task.payload.get("work_ms", 0)) / 1000.0)
    return _result(task)
