"""Handlers' results and reasons that PostgreSQL cannot store as they are (issue 18.2),
end to end: real PostgreSQL, Redis and ``celery -A workers worker`` processes."""

from __future__ import annotations

import pytest

import tests.value_agents  # noqa: F401  (registers odd_values for this producer)
from orchestration import api
from orchestration.api import NewTask
from orchestration.models import TaskStatus
from orchestration.settings import Settings
from tests.support import WorkerFleet, wait_until_resting

pytestmark = pytest.mark.integration

# NUL (text from PDFs), lone surrogates, a split pair, the escape character itself.
ODD = "page one\x00page two \ud800 \udc80 \ud83d\ude00 \ue000 \ue0000000"
AGENTS = "demo_agents,tests.agents,tests.value_agents"


def test_odd_results_and_reasons_are_stored_faithfully_or_fail_with_the_reason(
    server_settings: Settings, pg_url: str, fleet: WorkerFleet
) -> None:
    # Given a worker that knows the odd_values agent
    fleet.start(concurrency=2, extra_env={"TASKRAIL_AGENTS": AGENTS})
    modes = ["echo", "escalate", "permanent", "deep", "int_keys", "huge"]

    # When a task of each mode runs
    ids = api.submit_many([NewTask("odd_values", 1, {"text": ODD, "mode": mode}) for mode in modes])
    statuses = wait_until_resting(pg_url, ids, timeout=120)
    tasks = {mode: api.get(task_id) for mode, task_id in zip(modes, ids, strict=True)}

    # Then every task came to rest (no hop crashed on the write)
    assert statuses == dict(
        zip(ids, ["completed", "escalated", "failed", "failed", "failed", "failed"], strict=True)
    )
    # and what the handler returned or said reads back exactly, types included
    echo = tasks["echo"].result
    assert echo == {"echo": ODD, ODD: [ODD, 1e20, 1.0], "pages": ODD.split("\x00")}
    assert [type(v) for v in echo[ODD]] == [str, float, float]
    for mode in ("escalate", "permanent"):
        assert tasks[mode].last_error == ODD
        assert api.history(tasks[mode].id)[-1].detail == ODD
    # and a result taskrail cannot store fails its task with the reason
    assert "nested deeper than 254" in (tasks["deep"].last_error or "")
    assert "key 1" in (tasks["int_keys"].last_error or "")
    assert "bytes" in (tasks["huge"].last_error or "")
    for mode in ("deep", "int_keys", "huge"):
        assert tasks[mode].status is TaskStatus.FAILED
        assert tasks[mode].result is None
