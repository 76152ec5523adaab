"""``python -m workers.isolated``: run one handler call in this process and report it.

Reads a JSON request on stdin (agent modules, agent name, the task view's fields) and
writes one JSON line on stdout: ``{"kind": "result", "result": ...}``, or ``escalate``,
``permanent`` or ``error`` with a ``reason``. Whatever the handler prints goes to
stderr. A process that dies before it writes its line is the caller's verdict.

The handler's view is not watched here (``task.cancelled`` stays false): when the task
is cancelled the parent kills this process (:func:`workers.calls.call_isolated`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from orchestration.agents import TaskView, load_agent_modules, registry


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
    from workers.calls import classify

    try:
        result = spec.handler(view)
    except Exception as err:
        outcome = classify(err)
        line = json.dumps({"kind": outcome.kind.value, "reason": outcome.reason})
    else:
        try:
            line = json.dumps({"kind": "result", "result": result}, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as err:
            reason = f"result is not JSON-serialisable: {type(err).__name__}: {err}"
            line = json.dumps({"kind": "permanent", "reason": reason})
    out.write(line + "\n")
    out.flush()


if __name__ == "__main__":
    main()
