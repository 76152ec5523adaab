"""Every (state, event) pair of the task lifecycle, checked against docs/design.md's table.

The table below is written out by hand from the design, not derived from the
machine, so a change to the machine's transitions shows up as a failure here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import inspect
from statemachine.exceptions import TransitionNotAllowed

from orchestration.models import Task, TaskStatus
from orchestration.state_machine import EVENTS, TaskStateMachine, create_state_machine

S = TaskStatus

# (from state, event) -> to state; every pair not listed must be refused.
ALLOWED: dict[tuple[TaskStatus, str], TaskStatus] = {
    (S.PENDING, "assign"): S.ASSIGNED,
    (S.ASSIGNED, "start"): S.IN_PROGRESS,
    (S.IN_PROGRESS, "complete"): S.COMPLETED,
    (S.IN_PROGRESS, "fail"): S.FAILED,
    (S.ASSIGNED, "fail"): S.FAILED,
    (S.IN_PROGRESS, "escalate"): S.ESCALATED,
    (S.ASSIGNED, "escalate"): S.ESCALATED,
    (S.FAILED, "retry"): S.PENDING,
    # A person's moves.
    (S.ESCALATED, "resolve"): S.COMPLETED,
    (S.ESCALATED, "reopen"): S.PENDING,
    (S.ESCALATED, "reject"): S.FAILED,
    (S.ESCALATED, "claim"): S.ESCALATED,
    (S.ESCALATED, "unclaim"): S.ESCALATED,
    (S.PENDING, "cancel"): S.CANCELLED,
    (S.ASSIGNED, "cancel"): S.CANCELLED,
    (S.IN_PROGRESS, "cancel"): S.CANCELLED,
}
ALL_EVENTS = (
    "assign",
    "start",
    "complete",
    "fail",
    "escalate",
    "retry",
    "resolve",
    "reopen",
    "reject",
    "claim",
    "unclaim",
    "cancel",
)
ALL_PAIRS = [(status, event) for status in TaskStatus for event in ALL_EVENTS]
COLUMNS = [attr.key for attr in inspect(Task).column_attrs]

EARLIER = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _task(status: TaskStatus) -> Task:
    """A task with every column filled, so that any write a callback makes is visible."""
    return Task(
        id=7,
        client_id=42,
        task_type="personal_tax",
        status=status,
        assigned_agent="personal_tax_agent",
        payload={"year": 2025},
        result={"refund": 1},
        attempts=2,
        last_error="earlier error",
        idempotency_key="key-7",
        created_at=EARLIER,
        updated_at=EARLIER,
        completed_at=EARLIER,
        lease_owner="worker-1",
        lease_expires_at=EARLIER,
        not_before=EARLIER,
        deferred_since=EARLIER,
        redriven_at=EARLIER,
    )


def _columns(task: Task) -> dict[str, Any]:
    return {name: getattr(task, name) for name in COLUMNS}


def test_the_table_covers_exactly_the_machines_events() -> None:
    assert set(EVENTS) == set(ALL_EVENTS)
    sm = TaskStateMachine(task=_task(S.PENDING))
    assert [e.id for e in sm.events] == list(ALL_EVENTS)
    assert len(ALL_PAIRS) == 84


@pytest.mark.parametrize(
    ("status", "event"),
    [pair for pair in ALL_PAIRS if pair in ALLOWED],
    ids=lambda v: str(v),
)
def test_allowed_event_moves_to_its_target(status: TaskStatus, event: str) -> None:
    # Given a task in `status`
    task = _task(status)
    sm = TaskStateMachine(task=task)

    # When the allowed event fires
    sm.send(event, agent="other_agent", reason="because")

    # Then the machine and the bound task are both in the target state
    target = ALLOWED[(status, event)]
    assert task.status == target
    assert sm.current_state_value == target
    assert sm.configuration_values == {target}


@pytest.mark.parametrize(
    ("status", "event"),
    [pair for pair in ALL_PAIRS if pair not in ALLOWED],
    ids=lambda v: str(v),
)
def test_forbidden_event_raises_and_changes_nothing(status: TaskStatus, event: str) -> None:
    # Given a task in `status` with every column set
    task = _task(status)
    sm = TaskStateMachine(task=task)
    before = _columns(task)

    # When an event the lifecycle forbids from that state fires
    with pytest.raises(TransitionNotAllowed) as info:
        sm.send(event, agent="other_agent", reason="because")

    # Then it is refused by name and neither the task nor the machine moved
    assert info.value.event is not None
    assert info.value.event.id == event
    assert _columns(task) == before
    assert sm.current_state_value == status


@pytest.mark.parametrize(
    ("status", "event"),
    [pair for pair in ALL_PAIRS if pair not in ALLOWED],
    ids=lambda v: str(v),
)
def test_forbidden_event_by_method_call_also_raises(status: TaskStatus, event: str) -> None:
    task = _task(status)
    sm = TaskStateMachine(task=task)
    before = _columns(task)

    with pytest.raises(TransitionNotAllowed):
        getattr(sm, event)(agent="other_agent", reason="because")

    assert _columns(task) == before


@pytest.mark.parametrize("status", list(TaskStatus))
def test_machine_starts_from_the_stored_status(status: TaskStatus) -> None:
    task = _task(status)
    before = _columns(task)

    sm = create_state_machine(task)

    assert sm.current_state_value == status
    assert task.status == status  # never reset to pending on construction
    assert _columns(task) == before


@pytest.mark.parametrize("status", list(TaskStatus))
def test_machine_starts_from_a_plain_string_status(status: TaskStatus) -> None:
    """A status read back as a plain string (raw SQL) binds the same way."""
    task = _task(status)
    task.status = status.value  # type: ignore[assignment]

    sm = TaskStateMachine(task=task)

    assert sm.current_state_value == status


@pytest.mark.parametrize("status", [S.COMPLETED, S.CANCELLED])
def test_completed_and_cancelled_are_final(status: TaskStatus) -> None:
    sm = TaskStateMachine(task=_task(status))

    assert [state.final for state in sm.configuration] == [True]
    assert status.is_final
    assert list(sm.allowed_events) == []


def test_failed_is_not_final_but_only_retry_leaves_it() -> None:
    task = _task(S.FAILED)
    sm = TaskStateMachine(task=task)

    assert not sm.failed.final
    assert not S.FAILED.is_final
    assert [e.id for e in sm.allowed_events] == ["retry"]
    for event in ALL_EVENTS:
        if event == "retry":
            continue
        with pytest.raises(TransitionNotAllowed):
            sm.send(event, agent="a", reason="r")
        assert task.status == S.FAILED


def test_only_pending_assigned_in_progress_are_active() -> None:
    assert {s for s in TaskStatus if s.is_active} == {S.PENDING, S.ASSIGNED, S.IN_PROGRESS}
    assert {s for s in TaskStatus if s.is_final} == {S.COMPLETED, S.CANCELLED}


def test_escalated_is_left_only_by_a_persons_events() -> None:
    sm = TaskStateMachine(task=_task(S.ESCALATED))

    assert not sm.escalated.final
    assert not S.ESCALATED.is_final
    assert [e.id for e in sm.allowed_events] == ["resolve", "reopen", "reject", "claim", "unclaim"]


def test_retry_clears_agent_and_completion_and_resets_attempts() -> None:
    # Given a failed task that had an agent, attempts and a completion time
    task = _task(S.FAILED)
    assert task.assigned_agent and task.completed_at and task.attempts == 2

    # When it is retried
    TaskStateMachine(task=task).retry()

    # Then it is pending with no agent, no completion time and no attempts
    assert task.status == S.PENDING
    assert task.assigned_agent is None
    assert task.completed_at is None
    assert task.attempts == 0


def test_assign_sets_the_agent_and_complete_stamps_utc_time() -> None:
    task = _task(S.PENDING)
    task.assigned_agent = None
    task.completed_at = None
    sm = TaskStateMachine(task=task)

    sm.assign(agent="payroll_agent")
    sm.start()
    before = datetime.now(UTC)
    sm.complete()

    assert task.assigned_agent == "payroll_agent"
    assert task.completed_at is not None
    assert task.completed_at.tzinfo is not None
    assert task.completed_at >= before


@pytest.mark.parametrize("event", ["start", "fail", "escalate"])
def test_events_other_than_assign_complete_retry_touch_only_status(event: str) -> None:
    source = S.ASSIGNED
    task = _task(source)
    before = _columns(task)

    TaskStateMachine(task=task).send(event, agent="other_agent", reason="because")

    after = _columns(task)
    changed = {k for k in COLUMNS if after[k] != before[k]}
    assert changed == {"status"}
