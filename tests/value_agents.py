"""A test agent whose results and reasons hold what PostgreSQL cannot store as it is.

Loaded with ``TASKRAIL_AGENTS=...,tests.value_agents``; the payload's ``mode`` decides.
"""

from __future__ import annotations

from typing import Any

from orchestration.agents import Escalate, PermanentError, TaskView, agent


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@agent("odd_values_agent", task_types=["odd_values"], max_attempts=1)
def odd_values(task: TaskView) -> Any:
    text = task.payload["text"]
    mode = task.payload["mode"]
    if mode == "escalate":
        raise Escalate(text)
    if mode == "permanent":
        raise PermanentError(text)
    if mode == "deep":
        return _deep(300)
    if mode == "int_keys":
        return {1: "int", "1": "str"}
    if mode == "huge":
        return "x" * (2 * 1024 * 1024)
    return {"echo": text, text: [text, 1e20, 1.0], "pages": text.split("\x00")}
