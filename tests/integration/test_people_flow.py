"""The people's moves with real workers (issue 21): a reopened escalation and a bulk
retry go back to the agents and run to the end, on PostgreSQL, Redis and
``celery -A workers worker`` processes."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest

from orchestration import api
from orchestration.models import TaskStatus
from orchestration.settings import Settings
from orchestration.store.transitions import apply_transition
from tests.support import WorkerFleet, assert_valid_path

pytestmark = pytest.mark.integration

S = TaskStatus


def wait_for(ids: Iterable[int], status: TaskStatus, timeout_s: float = 60) -> None:
    """Poll until every task of ``ids`` is in ``status``."""
    wanted = list(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {i: api.get(i).status for i in wanted}
        if all(s is status for s in statuses.values()):
            return
        assert time.monotonic() < deadline, f"not all {status.value}: {statuses}"
        time.sleep(0.1)


def path(task_id: int) -> list[tuple[str, str, str]]:
    return [(e.event, e.from_status.value, e.to_status.value) for e in api.history(task_id)]


def test_a_reopened_escalation_runs_again_and_completes(
    server_settings: Settings, fleet: WorkerFleet
) -> None:
    # Given workers, and a tax return whose agent escalates: the W-2 is missing
    fleet.start(concurrency=2)
    task_id = api.submit("personal_tax", 42, {"scenario": "missing_document", "year": 2025})
    wait_for([task_id], S.ESCALATED)
    assert api.get(task_id).last_error == "missing W-2"

    # When ana claims it and reopens it with the document
    api.claim(task_id, by="ana")
    api.reopen(task_id, payload={"w2": "scan.pdf"}, by="ana", note="the client sent it")

    # Then the agent runs again, from a first attempt, and completes
    wait_for([task_id], S.COMPLETED)
    task = api.get(task_id)
    assert task.result == {"client_id": 42, "prepared": "personal tax return", "attempt": 1}
    assert task.payload == {"scenario": "missing_document", "year": 2025, "w2": "scan.pdf"}
    assert (task.attempts, task.claimed_by) == (1, None)
    assert [e for e, _, _ in path(task_id)] == [
        "assign", "start", "escalate", "claim", "reopen", "assign", "start", "complete",
    ]  # fmt: skip
    assert_valid_path(task_id, path(task_id), "completed")
    reopened = api.history(task_id)[4]
    assert (reopened.actor, reopened.note, reopened.worker) == ("ana", "the client sent it", "api")
    assert api.history(task_id)[-1].actor not in ("ana", "api")  # a worker's


def test_a_bulk_retry_sends_every_failed_task_back_to_run(
    server_settings: Settings, fleet: WorkerFleet
) -> None:
    # Given failed tasks (written before any worker ran: their first hops are stale)
    ids = api.submit_many([{"task_type": "payroll", "client_id": n} for n in range(8)])
    db = api.client().db
    for task_id in ids:
        for event, expected in (("assign", S.PENDING), ("start", S.ASSIGNED)):
            assert apply_transition(
                db, task_id, event, expected=expected, agent="payroll_agent", worker="w-old"
            ).applied
        assert apply_transition(
            db, task_id, "fail", expected=S.IN_PROGRESS, reason="payroll service down"
        ).applied
    fleet.start(concurrency=2)

    # When ana retries every failed payroll task
    result = api.retry_many(task_type="payroll", by="ana", note="service is back")

    # Then each is moved and audited once, sent to the workers, and runs to completion
    assert (result.matched, result.moved, result.skipped) == (8, 8, 0)
    wait_for(ids, S.COMPLETED)
    for task_id in ids:
        events = [e for e, _, _ in path(task_id)]
        assert events == ["assign", "start", "fail", "retry", "assign", "start", "complete"]
        assert_valid_path(task_id, path(task_id), "completed")
        retry = api.history(task_id)[3]
        assert (retry.actor, retry.note, retry.worker) == ("ana", "service is back", "api")
        assert api.get(task_id).attempts == 1
