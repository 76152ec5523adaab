"""Demo agents for an accounting firm: personal tax returns, payroll runs, bookkeeping.

They live apart from the engine, as a deployment's own agents would, and are
deterministic: the payload's ``scenario`` decides the outcome, so a test knows each
task's final state in advance.

- ``ok``: succeeds on the first attempt.
- ``flaky``: fails transiently on the first ``flaky_failures`` attempts (default 1),
  then succeeds.
- ``missing_document``: asks for a human (``Escalate("missing W-2")``) until the payload
  has a ``w2`` (a person reopens the task with it: ``taskrail reopen ID --payload
  '{"w2": "scan.pdf"}'``), then succeeds.
- ``invalid``: fails permanently (``PermanentError``).
- ``work_ms`` in the payload makes the handler sleep, standing in for a slow call.
"""

from __future__ import annotations

import time
from typing import Any

from orchestration.agents import Escalate, PermanentError, TaskView, agent

SCENARIOS = ("ok", "flaky", "missing_document", "invalid")
TASK_TYPES = ("personal_tax", "payroll", "bookkeeping")


class TransientServiceError(RuntimeError):
    """Stands in for a timeout of the tax service."""


def scenario_for(i: int) -> str:
    """The demo's mix: mostly ok, every 10th flaky, every 20th escalates, every 25th invalid."""
    if i % 25 == 24:
        return "invalid"
    if i % 20 == 19:
        return "missing_document"
    if i % 10 == 4:
        return "flaky"
    return "ok"


def expected_status(scenario: str, max_attempts: int = 3, flaky_failures: int = 1) -> str:
    """The final status a task of ``scenario`` reaches."""
    if scenario == "missing_document":
        return "escalated"
    if scenario == "invalid":
        return "failed"
    if scenario == "flaky" and flaky_failures >= max_attempts:
        return "failed"
    return "completed"


def _run(task: TaskView, what: str) -> dict[str, Any]:
    work_ms = float(task.payload.get("work_ms", 0))
    if work_ms:
        time.sleep(work_ms / 1000.0)
    scenario = task.payload.get("scenario", "ok")
    if scenario == "missing_document" and "w2" not in task.payload:
        raise Escalate(task.payload.get("missing", "missing W-2"))
    if scenario == "invalid":
        raise PermanentError("client record is inconsistent: tax id does not match")
    if scenario == "flaky" and task.attempt <= int(task.payload.get("flaky_failures", 1)):
        raise TransientServiceError(f"tax service timed out (attempt {task.attempt})")
    return {"client_id": task.client_id, "prepared": what, "attempt": task.attempt}


@agent("personal_tax_agent", task_types=["personal_tax"], reset_timeout_s=30)
def personal_tax(task: TaskView) -> dict[str, Any]:
    return _run(task, "personal tax return")


@agent("payroll_agent", task_types=["payroll"], reset_timeout_s=30)
def payroll(task: TaskView) -> dict[str, Any]:
    return _run(task, "payroll run")


@agent("bookkeeping_agent", task_types=["bookkeeping"], reset_timeout_s=30)
def bookkeeping(task: TaskView) -> dict[str, Any]:
    return _run(task, "bookkeeping")
