"""The execute hop when the task is cancelled (``Taskrail.cancel``) around a handler's run:
nothing is written after the cancel, no attempt is counted, the breaker hears no verdict,
no hop is sent, and the late result is logged as discarded. Fakes as in test_execution.py
(the world fixture of conftest.py); the database is real.
"""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from orchestration import constants as c
from orchestration.agents import TaskView
from orchestration.models import TaskStatus
from tests.unit.workers.conftest import AGENT, World
from workers.calls import CallOutcome, Kind
from workers.execution import execute

PRECLAIM = f"{c.PRECLAIM_TOKEN_PREFIX}other-host:1/aaaaaaaaaaaa"


def _cancel(world: World, task_id: int) -> None:
    world.trail.cancel(task_id, reason="client withdrew", by="ops")


def _logged(log: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in log if entry["event"] == event]


def _after_cancel(world: World, task_id: int) -> list[str]:
    """The events written after the task's cancel event (and that one)."""
    events = [e["event"] for e in world.events(task_id)]
    return events[events.index("cancel") :]


def _assert_left_as_cancelled(world: World, task_id: int, attempts: int) -> None:
    row = world.row(task_id)
    assert row["status"] == TaskStatus.CANCELLED
    assert row["result"] is None and row["last_error"] == "client withdrew"
    assert (row["lease_owner"], row["lease_expires_at"]) == (None, None)
    assert row["attempts"] == attempts
    assert _after_cancel(world, task_id) == ["cancel"]
    assert world.dispatcher.sent == []


def test_a_result_returned_after_the_keeper_stopped_the_run_is_discarded(world: World) -> None:
    # Given a pre-claimed task whose handler returns a result after the task was
    # cancelled and the lease keeper set the run's stop event (its view reads cancelled)
    task_id = world.task(attempts=1, owner=PRECLAIM)
    seen: list[bool] = []

    def cancelled_meanwhile(view: TaskView) -> CallOutcome:
        _cancel(world, task_id)
        world.keeper.stops[task_id].set()
        seen.append(view.cancelled)
        return CallOutcome(Kind.RESULT, result={"late": True})

    world.handler.outcome = cancelled_meanwhile
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then the handler could read the flag, and nothing was written after the cancel
    assert seen == [True]
    _assert_left_as_cancelled(world, task_id, attempts=1)
    # and the breaker heard no verdict, the result is logged as discarded
    assert world.breaker().verdicts() == ["abandon"]
    [late] = _logged(log, "late_result_discarded")
    assert (late["task_id"], late["handler"], late["reason"]) == (task_id, "returned", "cancelled")
    assert not _logged(log, "lease_lost")


def test_a_transient_error_of_a_stopped_run_is_no_failure_and_no_retry(world: World) -> None:
    # Given a handler that raises once its run is stopped (its task cancelled)
    task_id = world.task(attempts=1, owner=PRECLAIM)

    def raises_when_cancelled(view: TaskView) -> CallOutcome:
        _cancel(world, task_id)
        world.keeper.stops[task_id].set()
        return CallOutcome(Kind.ERROR, reason="RuntimeError: stopped", error=RuntimeError("x"))

    world.handler.outcome = raises_when_cancelled
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then no failure is counted against the agent's breaker, no retry is sent or written
    assert world.breaker().verdicts() == ["abandon"]
    _assert_left_as_cancelled(world, task_id, attempts=1)
    [late] = _logged(log, "late_result_discarded")
    assert (late["handler"], late["reason"]) == ("raised", "cancelled")


def test_a_wait_ended_by_the_cancel_writes_nothing(world: World) -> None:
    # Given a call whose wait the stop event ended (the handler runs on, workers.calls
    # logs its late result when it comes)
    task_id = world.task(attempts=1, owner=PRECLAIM)

    def stopped(view: TaskView) -> CallOutcome:
        _cancel(world, task_id)
        world.keeper.stops[task_id].set()
        return CallOutcome(Kind.CANCELLED, reason="cancelled")

    world.handler.outcome = stopped
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    _assert_left_as_cancelled(world, task_id, attempts=1)
    assert world.breaker().verdicts() == ["abandon"]
    assert not _logged(log, "late_result_discarded") and not _logged(log, "lease_lost")


def test_a_result_returned_before_the_keeper_noticed_the_cancel_is_not_written(
    world: World,
) -> None:
    # Given a handler that returns right after the cancel, before any check of the keeper
    task_id = world.task(attempts=1, owner=PRECLAIM)

    def cancelled_unnoticed(view: TaskView) -> CallOutcome:
        _cancel(world, task_id)
        return CallOutcome(Kind.RESULT, result={"late": True})

    world.handler.outcome = cancelled_unnoticed
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then the compare-and-set of complete matched nothing: the cancel stands
    _assert_left_as_cancelled(world, task_id, attempts=1)
    # and the log says why: cancelled, not another worker
    [late] = _logged(log, "late_result_discarded")
    assert (late["task_id"], late["handler"], late["reason"]) == (task_id, "returned", "cancelled")
    assert not _logged(log, "lease_lost")


def test_a_transient_error_before_the_keeper_noticed_the_cancel_sends_no_retry(
    world: World,
) -> None:
    task_id = world.task(attempts=1)

    def cancelled_unnoticed(view: TaskView) -> CallOutcome:
        _cancel(world, task_id)
        return CallOutcome(Kind.ERROR, reason="ConnectionError: x", error=ConnectionError("x"))

    world.handler.outcome = cancelled_unnoticed
    with capture_logs() as log:
        execute(world.rt, task_id, 1, AGENT)
    # attempt 2 was counted when its lease was taken, before the cancel
    _assert_left_as_cancelled(world, task_id, attempts=2)
    [late] = _logged(log, "late_result_discarded")
    assert (late["handler"], late["reason"]) == ("raised", "cancelled")


def test_an_execute_message_for_a_cancelled_task_runs_nothing(world: World) -> None:
    # Given a task cancelled while its pre-claimed execute message waited in the queue
    task_id = world.task(attempts=1, owner=PRECLAIM)
    _cancel(world, task_id)
    with capture_logs() as log:
        # When that message, and a retry's message without a token, are taken
        execute(world.rt, task_id, 0, AGENT, PRECLAIM)
        execute(world.rt, task_id, 1, AGENT)
    # Then no handler ran, nothing was written, and each was dropped with an info line
    assert world.handler.calls == []
    _assert_left_as_cancelled(world, task_id, attempts=1)
    skipped = _logged(log, "hop_skipped")
    assert [entry["status"] for entry in skipped] == ["cancelled", "cancelled"]
    assert all(entry["log_level"] == "info" for entry in skipped)
    assert world.breaker().verdicts() == ["abandon", "abandon"]
