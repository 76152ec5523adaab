"""``python -m workers.isolated``: run one handler call in this process and report it.

Reads a JSON request on stdin (agent modules, agent name, the task view's fields) and
writes one JSON line on stdout: ``{"kind": "result", "result": ...}``, or ``escalate``,
``permanent`` or ``error`` with a ``reason``. Whatever the handler prints goes to
stderr. A process that dies before it writes its line is the caller's verdict.

An ``async def`` handler runs on an event loop of its own (``asyncio.run``); at the time
limit the parent kills the process, loop and all.

The handler's view is not watched here (``task.cancelled`` stays false): when the task
is cancelled the parent kills this process (:func:`workers.calls.call_isolated`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from typing import Any

from orchestration.agents import AgentSpec, TaskView, load_agent_modules, registry
from workers.calls import classify, not_awaited


def main() -> None:
    request: dict[str, Any] = json.loads(sys.stdin.read())
    out = sys.stdout
    sys.stdout = sys.stderr  # the handler's prints must not mix with the reply
    load_agent_modules(request["modules"])
    spec = registry.get(request["agent"])
    task = request["task"]
    view = TaskView.build(
        task["id"], task["client_id"], task["task_type"], task["payload"], task["attempt"]
    )
    try:
        result = asyncio.run(spec.handler(view)) if spec.is_async else spec.handler(view)
    except Exception as err:
        outcome = classify(err)
        line = json.dumps({"kind": outcome.kind.value, "reason": outcome.reason})
    else:
        line = _result_line(spec, result)
    out.write(line + "\n")
    out.flush()


def _result_line(spec: AgentSpec, result: Any) -> str:
    """The reply for a handler that returned ``result``."""
    if inspect.isawaitable(result):  # a sync handler that forgot to await
        refused = not_awaited(spec, result)
        return json.dumps({"kind": refused.kind.value, "reason": refused.reason})
    try:
        return json.dumps({"kind": "result", "result": result}, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        reason = f"result is not JSON-serialisable: {type(err).__name__}: {err}"
        return json.dumps({"kind": "permanent", "reason": reason})


if __name__ == "__main__":
    main()
