"""The transition store (``apply_transition``) on SQLite and on real PostgreSQL."""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, insert, select
from statemachine.exceptions import TransitionNotAllowed

from orchestration.agents import ensure_json
from orchestration.constants import MAX_REASON_CHARS
from orchestration.errors import ResultRejected
from orchestration.models import Base, TaskStatus, events_table, tasks_table, utcnow
from orchestration.moves import EFFECTS, LIFECYCLE_COLUMNS, RUN_COLUMNS, Move
from orchestration.state_machine import EVENTS, TaskStateMachine, move_fields
from orchestration.store.db import Database
from orchestration.store.transitions import (
    Outcome,
    TransitionResult,
    TransitionStore,
    apply_transition,
)
from orchestration.values import read_json, read_text
from tests.support import race

S = TaskStatus

# Pairs the lifecycle forbids, one or more per source state.
FORBIDDEN = [
    (S.PENDING, "complete"),
    (S.PENDING, "start"),
    (S.PENDING, "retry"),
    (S.ASSIGNED, "assign"),
    (S.IN_PROGRESS, "retry"),
    (S.COMPLETED, "retry"),
    (S.COMPLETED, "fail"),
    (S.FAILED, "start"),
    (S.FAILED, "complete"),
    (S.ESCALATED, "retry"),
]


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'store.db'}")
    db.ensure_schema()  # the embedded SQLite migrates itself
    yield db
    db.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest) -> Database:
    """The same store tests on SQLite and on the real PostgreSQL."""
    fixture = "sqlite_db" if request.param == "sqlite" else "pg_db"
    database: Database = request.getfixturevalue(fixture)
    return database


def insert_task(db: Database, status: TaskStatus = S.PENDING, **columns: Any) -> int:
    then = utcnow() - timedelta(minutes=5)
    values: dict[str, Any] = {
        "client_id": 42,
        "task_type": "personal_tax",
        "status": status,
        "payload": {"year": 2025},
        "attempts": 0,
        "created_at": then,
        "updated_at": then,
        **columns,
    }
    with db.begin() as conn:
        task_id: int = conn.execute(
            insert(tasks_table).values(**values).returning(tasks_table.c.id)
        ).scalar_one()
    return task_id


def task_row(db: Database, task_id: int) -> dict[str, Any]:
    with db.connect() as conn:
        row = conn.execute(select(tasks_table).where(tasks_table.c.id == task_id)).mappings().one()
    return dict(row)


def task_events(db: Database, task_id: int | None = None) -> list[dict[str, Any]]:
    query = select(events_table).order_by(events_table.c.id)
    if task_id is not None:
        query = query.where(events_table.c.task_id == task_id)
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings().all()]


# -- applied ----------------------------------------------------------------------


def test_applied_transition_updates_the_row_and_writes_one_event(db: Database) -> None:
    # Given a pending task
    task_id = insert_task(db)
    before = task_row(db, task_id)

    # When it is assigned
    result = apply_transition(
        db, task_id, "assign", agent="personal_tax_agent", reason="picked", worker="w-1"
    )

    # Then the outcome says so, the row moved, and one audit row records the move
    assert result.outcome is Outcome.APPLIED
    assert result.applied
    assert (result.task_id, result.event) == (task_id, "assign")
    assert (result.from_status, result.to_status) == (S.PENDING, S.ASSIGNED)
    assert result.row["id"] == task_id
    assert result.row["assigned_agent"] == "personal_tax_agent"

    after = task_row(db, task_id)
    assert after["status"] == S.ASSIGNED
    assert after["assigned_agent"] == "personal_tax_agent"
    assert after["updated_at"] > before["updated_at"]
    assert after["updated_at"].tzinfo is not None
    unchanged = {k for k in before if k not in ("status", "assigned_agent", "updated_at")}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}

    [event] = task_events(db, task_id)
    assert event["event"] == "assign"
    assert (event["from_status"], event["to_status"]) == (S.PENDING, S.ASSIGNED)
    assert event["agent"] == "personal_tax_agent"
    assert event["worker"] == "w-1"
    assert event["detail"] == "picked"
    assert event["at"] == after["updated_at"]


def test_whole_lifecycle_writes_one_event_per_transition(db: Database) -> None:
    # Given a pending task
    task_id = insert_task(db)

    # When it is driven to completion by hops that know the expected state
    moves = [("assign", S.PENDING), ("start", S.ASSIGNED), ("complete", S.IN_PROGRESS)]
    for event, expected in moves:
        agent = "payroll_agent" if event == "assign" else None
        result = apply_transition(db, task_id, event, expected=expected, agent=agent, worker="w")
        assert result.outcome is Outcome.APPLIED

    # Then there is one event per move, in order, each naming the task's agent
    events = task_events(db, task_id)
    assert [(e["event"], e["from_status"], e["to_status"]) for e in events] == [
        ("assign", S.PENDING, S.ASSIGNED),
        ("start", S.ASSIGNED, S.IN_PROGRESS),
        ("complete", S.IN_PROGRESS, S.COMPLETED),
    ]
    assert [e["agent"] for e in events] == ["payroll_agent"] * 3
    row = task_row(db, task_id)
    assert row["status"] == S.COMPLETED
    assert row["completed_at"] is not None
    assert row["created_at"] < row["completed_at"] <= row["updated_at"]


def test_fail_then_retry_resets_the_row(db: Database) -> None:
    # Given a task that failed after three attempts
    task_id = insert_task(
        db, S.IN_PROGRESS, assigned_agent="personal_tax_agent", attempts=3, lease_owner="w-1"
    )
    failed = apply_transition(
        db,
        task_id,
        "fail",
        expected=S.IN_PROGRESS,
        reason="tax service down",
        set_={"last_error": "tax service down", "lease_owner": None},
    )
    assert failed.outcome is Outcome.APPLIED

    # When an operator retries it
    retried = apply_transition(db, task_id, "retry", worker="api")

    # Then it is pending again, with no agent and no attempts, and both moves are audited
    assert retried.outcome is Outcome.APPLIED
    row = task_row(db, task_id)
    assert row["status"] == S.PENDING
    assert row["assigned_agent"] is None
    assert row["attempts"] == 0
    assert row["completed_at"] is None
    assert row["lease_owner"] is None
    events = task_events(db, task_id)
    assert [
        (e["event"], e["from_status"], e["to_status"], e["detail"], e["worker"]) for e in events
    ] == [
        ("fail", S.IN_PROGRESS, S.FAILED, "tax service down", None),
        ("retry", S.FAILED, S.PENDING, None, "api"),
    ]
    assert events[0]["agent"] == "personal_tax_agent"


# -- stale and not found ------------------------------------------------------------


def test_stale_when_the_row_is_not_in_the_expected_state(db: Database) -> None:
    # Given a task another worker already moved to assigned
    task_id = insert_task(db, S.ASSIGNED, assigned_agent="winner")
    before = task_row(db, task_id)

    # When a late hop tries to assign it, believing it pending
    result = apply_transition(db, task_id, "assign", expected=S.PENDING, agent="loser")

    # Then the compare-and-set loses: STALE, nothing written
    assert result.outcome is Outcome.STALE
    assert not result.applied
    assert (result.from_status, result.to_status) == (S.PENDING, S.ASSIGNED)
    assert result.row == {}
    assert task_row(db, task_id) == before
    assert task_events(db, task_id) == []


def test_duplicate_message_is_stale_and_writes_one_event(db: Database) -> None:
    task_id = insert_task(db)

    first = apply_transition(db, task_id, "assign", expected=S.PENDING, agent="a")
    second = apply_transition(db, task_id, "assign", expected=S.PENDING, agent="b")

    assert (first.outcome, second.outcome) == (Outcome.APPLIED, Outcome.STALE)
    assert task_row(db, task_id)["assigned_agent"] == "a"
    assert len(task_events(db, task_id)) == 1


def test_not_found_for_an_unknown_id(db: Database) -> None:
    insert_task(db)

    result = apply_transition(db, 999_999, "assign", agent="a")

    assert result.outcome is Outcome.NOT_FOUND
    assert (result.task_id, result.from_status, result.to_status) == (999_999, None, None)
    assert task_events(db) == []


def test_unknown_id_with_expected_status_is_stale(db: Database) -> None:
    """With ``expected`` the row is not read first, so a missing row is a lost CAS."""
    result = apply_transition(db, 999_999, "assign", expected=S.PENDING, agent="a")

    assert result.outcome is Outcome.STALE
    assert task_events(db) == []


# -- invalid events -------------------------------------------------------------------


@pytest.mark.parametrize("pass_expected", [False, True], ids=["read-row", "expected"])
@pytest.mark.parametrize(("status", "event"), FORBIDDEN, ids=lambda v: str(v))
def test_forbidden_event_raises_and_writes_nothing(
    db: Database, status: TaskStatus, event: str, pass_expected: bool
) -> None:
    # Given a task in `status`
    task_id = insert_task(db, status, assigned_agent="personal_tax_agent")
    before = task_row(db, task_id)

    # When an event the lifecycle forbids from there is applied
    with pytest.raises(TransitionNotAllowed):
        apply_transition(
            db,
            task_id,
            event,
            expected=status if pass_expected else None,
            agent="x",
            reason="r",
            set_={"last_error": "should not be written"},
        )

    # Then neither the row nor the audit trail changed
    assert task_row(db, task_id) == before
    assert task_events(db) == []


def test_store_keeps_working_after_refusals_and_final_states(db: Database) -> None:
    """The store reuses one machine per thread; refusals and final states must not wedge it."""
    a, b = insert_task(db, S.IN_PROGRESS, assigned_agent="x"), insert_task(db)

    assert apply_transition(db, a, "complete", expected=S.IN_PROGRESS).applied
    with pytest.raises(TransitionNotAllowed):
        apply_transition(db, a, "complete")
    assert apply_transition(db, b, "assign", agent="y").applied
    assert apply_transition(db, b, "escalate", reason="missing W-2").applied

    assert task_row(db, a)["status"] == S.COMPLETED
    assert task_row(db, b)["status"] == S.ESCALATED
    assert len(task_events(db)) == 3


def _sent(status: TaskStatus, event: str) -> tuple[TaskStatus, dict[str, Any]]:
    """What a fresh machine's ``send`` does to a task in ``status``: target and fields."""
    from tests.unit.domain.test_state_machine_exhaustive import COLUMNS, _task

    task = _task(status)
    before = {c: getattr(task, c) for c in COLUMNS}
    TaskStateMachine(task=task).send(event, agent="agent-b", reason="why")
    after = {c: getattr(task, c) for c in COLUMNS}
    changed = {c: v for c, v in after.items() if v != before[c] and c != "status"}
    return TaskStatus(task.status), changed


def test_plan_gives_the_verdict_of_the_machines_send_on_every_pair() -> None:
    """plan() asks the machine which events are enabled instead of sending the event:
    for every (state, event) it refuses what ``send`` refuses, with the same message,
    and otherwise gives the target and the field changes ``send`` makes."""
    from orchestration.store.transitions import plan
    from tests.unit.domain.test_state_machine_exhaustive import ALL_PAIRS, ALLOWED

    for status, event in [*ALL_PAIRS, (S.PENDING, "no_such_event")]:
        try:
            expected = _sent(status, event)
        except TransitionNotAllowed as refused:
            with pytest.raises(TransitionNotAllowed) as ours:
                plan(status, event, agent="agent-b", reason="why")
            assert str(ours.value) == str(refused)
            assert (status, event) not in ALLOWED
            continue
        to_status, fields = plan(status, event, agent="agent-b", reason="why")
        assert to_status == expected[0] == ALLOWED[(status, event)]
        assert fields.keys() == expected[1].keys()
        for name, value in fields.items():
            if name == "completed_at" and value is not None:  # both "now", a moment apart
                assert abs(value - expected[1][name]) < timedelta(seconds=5)
            else:
                assert value == expected[1][name]


def test_the_machine_has_one_unguarded_transition_per_state_and_event() -> None:
    """What lets plan() read the target off the machine's transitions."""
    for state in TaskStateMachine.states:
        events = [t.event for t in state.transitions]
        assert len(events) == len(set(events)), state.id
        for transition in state.transitions:
            assert list(transition.cond) == [] and list(transition.validators) == []


# -- guard, set_, returning ------------------------------------------------------------


def test_guard_mismatch_is_stale_and_match_applies(db: Database) -> None:
    # Given an in-progress task at its second attempt
    task_id = insert_task(db, S.IN_PROGRESS, assigned_agent="a", attempts=2)

    # When a hop of the first attempt tries to complete it
    stale = apply_transition(db, task_id, "complete", expected=S.IN_PROGRESS, guard={"attempts": 1})

    # Then the guard refuses it; the hop of the second attempt succeeds
    assert stale.outcome is Outcome.STALE
    assert task_row(db, task_id)["status"] == S.IN_PROGRESS
    assert task_events(db, task_id) == []
    applied = apply_transition(
        db, task_id, "complete", expected=S.IN_PROGRESS, guard={"attempts": 2}
    )
    assert applied.outcome is Outcome.APPLIED
    assert task_row(db, task_id)["status"] == S.COMPLETED
    assert len(task_events(db, task_id)) == 1


def test_guard_on_none_means_is_null(db: Database) -> None:
    leased = insert_task(db, S.ASSIGNED, assigned_agent="a", lease_owner="w-1")
    free = insert_task(db, S.ASSIGNED, assigned_agent="a", lease_owner=None)

    on_leased = apply_transition(
        db, leased, "start", expected=S.ASSIGNED, guard={"lease_owner": None}
    )
    on_free = apply_transition(db, free, "start", expected=S.ASSIGNED, guard={"lease_owner": None})

    assert on_leased.outcome is Outcome.STALE
    assert on_free.outcome is Outcome.APPLIED
    assert task_row(db, leased)["status"] == S.ASSIGNED
    assert task_row(db, free)["status"] == S.IN_PROGRESS


def test_set_writes_extra_columns_and_returning_hands_them_back(db: Database) -> None:
    # Given an in-progress task
    task_id = insert_task(
        db,
        S.IN_PROGRESS,
        assigned_agent="a",
        attempts=1,
        lease_owner="w-1",
        lease_expires_at=utcnow() + timedelta(seconds=30),
        last_error="timeout",
    )

    # When it completes with a result, clearing its lease and error
    result = apply_transition(
        db,
        task_id,
        "complete",
        expected=S.IN_PROGRESS,
        set_={
            "result": {"refund": 120, "items": [1, 2]},
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": None,
        },
        returning=("attempts", "task_type", "client_id", "result"),
    )

    # Then the extra columns are stored, and the returned row holds what was asked for
    assert result.applied
    row = task_row(db, task_id)
    assert row["result"] == {"refund": 120, "items": [1, 2]}
    assert (row["lease_owner"], row["lease_expires_at"], row["last_error"]) == (None, None, None)
    assert row["status"] == S.COMPLETED
    assert result.row["attempts"] == 1
    assert result.row["task_type"] == "personal_tax"
    assert result.row["client_id"] == 42
    assert result.row["result"] == {"refund": 120, "items": [1, 2]}
    assert set(result.row) >= {
        "id",
        "assigned_agent",
        "attempts",
        "task_type",
        "client_id",
        "result",
    }


def test_event_agent_names_the_caller_when_given_else_the_tasks_agent(db: Database) -> None:
    named = insert_task(db, S.IN_PROGRESS, assigned_agent="task_agent")
    unnamed = insert_task(db, S.IN_PROGRESS, assigned_agent="task_agent")

    apply_transition(db, named, "escalate", expected=S.IN_PROGRESS, agent="operator", reason="why")
    apply_transition(db, unnamed, "escalate", expected=S.IN_PROGRESS, reason="why")

    assert task_events(db, named)[0]["agent"] == "operator"
    assert task_events(db, unnamed)[0]["agent"] == "task_agent"
    assert task_row(db, named)["assigned_agent"] == "task_agent"  # agent= does not reassign


# -- values PostgreSQL cannot hold as they are (issue 18.2) ----------------------------

# NUL (from PDFs), lone surrogates, a split surrogate pair, and the escape character.
ODD_TEXT = "page\x00one \ud800 \udc80x \ud83d\ude00 \ue000 \ue0000000"


def in_progress(db: Database) -> int:
    return insert_task(db, S.IN_PROGRESS, assigned_agent="personal_tax_agent", attempts=1)


def nothing_written(db: Database, task_id: int) -> None:
    row = task_row(db, task_id)
    assert (row["status"], row["result"], row["last_error"]) == (S.IN_PROGRESS, None, None)
    assert task_events(db, task_id) == []


def test_a_result_with_odd_text_is_stored_and_reads_back_equal(db: Database) -> None:
    # Given a task in progress, and a result with text PostgreSQL's jsonb refuses
    task_id = in_progress(db)
    result = {"text": ODD_TEXT, ODD_TEXT: [ODD_TEXT, 1e20, 1.0, -(2**63), 2**64 - 1, None]}

    # When it completes with that result
    outcome = apply_transition(
        db, task_id, "complete", expected=S.IN_PROGRESS, set_={"result": result}
    )

    # Then it is stored, and decoding the stored form gives the result back, types included
    assert outcome.applied
    back = read_json(task_row(db, task_id)["result"])
    assert back == result
    assert [type(v) for v in back[ODD_TEXT]] == [str, float, float, int, int, type(None)]


@pytest.mark.parametrize(
    "result", [1.0, -2.0, 1e20, 0.5, 7, "7", "\x00", True, None, [1.0], {"a": 1.0}], ids=repr
)
def test_any_result_keeps_its_value_and_type(db: Database, result: Any) -> None:
    task_id = in_progress(db)
    apply_transition(db, task_id, "complete", expected=S.IN_PROGRESS, set_={"result": result})
    back = read_json(task_row(db, task_id)["result"])
    assert back == result
    assert type(back) is type(result)


def test_a_reason_with_odd_text_is_stored_in_last_error_and_the_event(db: Database) -> None:
    task_id = in_progress(db)
    outcome = apply_transition(
        db,
        task_id,
        "fail",
        expected=S.IN_PROGRESS,
        reason=ODD_TEXT,
        set_={"last_error": ODD_TEXT},
    )

    assert outcome.applied
    assert read_text(task_row(db, task_id)["last_error"]) == ODD_TEXT
    assert read_text(task_events(db, task_id)[0]["detail"]) == ODD_TEXT


def test_a_long_reason_is_capped_with_a_mark(db: Database) -> None:
    task_id = in_progress(db)
    reason = "\x00" + "x" * 100_000
    apply_transition(
        db, task_id, "escalate", expected=S.IN_PROGRESS, reason=reason, set_={"last_error": reason}
    )

    for stored in (task_row(db, task_id)["last_error"], task_events(db, task_id)[0]["detail"]):
        text = read_text(stored)
        assert text.startswith(reason[:MAX_REASON_CHARS])
        assert len(text) < MAX_REASON_CHARS + 100
        assert "100001" in text[MAX_REASON_CHARS:]


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("result", "words"),
    [
        (_deep(255), ["nested"]),
        (_deep(100_000), ["nested"]),
        ({"n": [2**64]}, ["$.n[0]", "64-bit"]),
        ({"n": {1: 2}}, ["$.n", "key"]),
        ({"n": math.inf}, ["$.n"]),
        ({"n": object()}, ["$.n", "object"]),
        ("x" * (1024 * 1024), ["bytes"]),
    ],
    ids=["deep", "very-deep", "int-2-64", "int-key", "inf", "object", "too-large"],
)
def test_a_result_that_cannot_be_stored_is_refused_and_nothing_written(
    db: Database, result: Any, words: list[str]
) -> None:
    task_id = in_progress(db)
    with pytest.raises(ResultRejected) as info:
        apply_transition(db, task_id, "complete", expected=S.IN_PROGRESS, set_={"result": result})

    for word in words:
        assert word in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)
    nothing_written(db, task_id)


def test_an_encoded_result_is_stored_as_it_is(db: Database) -> None:
    task_id = in_progress(db)
    result = {"t": ODD_TEXT, "f": 3e21}
    apply_transition(
        db, task_id, "complete", expected=S.IN_PROGRESS, set_={"result": ensure_json(result)}
    )
    assert read_json(task_row(db, task_id)["result"]) == result


# -- races on real PostgreSQL -----------------------------------------------------------


ROUNDS = 200


def _race(
    pg_url: str, ids: list[int], expected: TaskStatus | None
) -> dict[int, list[tuple[int, str]]]:
    """Two threads, each with its own Database (own connection pool), assign every task
    in ``ids`` at the same moment. Returns, per task, (thread, outcome) pairs."""
    barrier = threading.Barrier(2, timeout=30)
    outcomes: dict[int, list[tuple[int, str]]] = {i: [] for i in ids}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(n: int) -> None:
        db = Database(pg_url)
        try:
            with db.connect(autocommit=True):  # open the connection before the race
                pass
            for task_id in ids:
                barrier.wait()
                try:
                    result = apply_transition(
                        db, task_id, "assign", expected=expected, agent=f"agent-{n}"
                    )
                    what = result.outcome.value
                except TransitionNotAllowed:
                    what = "not_allowed"
                with lock:
                    outcomes[task_id].append((n, what))
        except BaseException as err:
            errors.append(err)
            barrier.abort()
        finally:
            db.dispose()

    race(run, (), 60)
    assert not errors, errors
    return outcomes


def _events_per_task(db: Database) -> dict[int, int]:
    with db.connect() as conn:
        rows = conn.execute(
            select(events_table.c.task_id, func.count()).group_by(events_table.c.task_id)
        ).all()
    return {task_id: n for task_id, n in rows}


@pytest.mark.integration
def test_race_on_postgres_one_winner_one_stale(pg_db: Database, pg_url: str) -> None:
    # Given 200 pending tasks
    ids = [insert_task(pg_db) for _ in range(ROUNDS)]

    # When two workers, on two connections, assign each task at the same moment
    outcomes = _race(pg_url, ids, expected=S.PENDING)

    # Then each time exactly one wins and the other sees STALE; one event per task,
    # naming the winner, who is also the task's agent
    for task_id in ids:
        assert sorted(what for _, what in outcomes[task_id]) == ["applied", "stale"], task_id
    assert _events_per_task(pg_db) == {task_id: 1 for task_id in ids}
    winners = {
        task_id: f"agent-{n}"
        for task_id in ids
        for n, what in outcomes[task_id]
        if what == "applied"
    }
    with pg_db.connect() as conn:
        rows = conn.execute(
            select(tasks_table.c.id, tasks_table.c.status, tasks_table.c.assigned_agent)
        ).all()
        event_agents = dict(
            conn.execute(select(events_table.c.task_id, events_table.c.agent)).all()
        )
    assert {r.id: (r.status, r.assigned_agent) for r in rows} == {
        task_id: (S.ASSIGNED, winners[task_id]) for task_id in ids
    }
    assert event_agents == winners
    # Both threads won some rounds: the race was real, not one thread always first.
    assert len(Counter(winners.values())) == 2


@pytest.mark.integration
def test_race_without_expected_status_still_writes_once(pg_db: Database, pg_url: str) -> None:
    """Without ``expected`` the loser may read the row after the winner committed; the
    state machine then refuses the event (TransitionNotAllowed) instead of STALE. Either
    way exactly one transition is written."""
    ids = [insert_task(pg_db) for _ in range(50)]

    outcomes = _race(pg_url, ids, expected=None)

    for task_id in ids:
        whats = sorted(what for _, what in outcomes[task_id])
        assert whats in (["applied", "stale"], ["applied", "not_allowed"]), (task_id, whats)
    assert _events_per_task(pg_db) == {task_id: 1 for task_id in ids}


# -- schema ----------------------------------------------------------------------------


def _schema_differences(db: Database) -> list[Any]:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diffs = compare_metadata(context, Base.metadata)
    # The migration gives `attempts` a server default of 0 so raw inserts get a count;
    # the model uses a Python-side default. Both mean 0 for a new task.
    return [
        d
        for d in diffs
        if not (
            isinstance(d, list)
            and d
            and d[0][0] == "modify_default"
            and d[0][2:4] == ("tasks", "attempts")
        )
    ]


@pytest.mark.integration
def test_migration_matches_models_on_postgres(pg_db: Database) -> None:
    assert _schema_differences(pg_db) == []


def test_migration_matches_models_on_sqlite(sqlite_db: Database) -> None:
    assert _schema_differences(sqlite_db) == []


@pytest.mark.integration
def test_migration_keeps_the_status_check_and_idempotency_unique_on_postgres(
    pg_db: Database,
) -> None:
    """What autogenerate does not compare (check constraints) or compares loosely."""
    from sqlalchemy import inspect as sa_inspect

    with pg_db.engine.connect() as conn:
        inspector = sa_inspect(conn)
        checks = {c["name"] for c in inspector.get_check_constraints("tasks")}
        uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("tasks")}
        indexes = {i["name"]: i for i in inspector.get_indexes("tasks")}
    assert "ck_tasks_status" in checks
    assert ("idempotency_key",) in uniques
    # The sweeper's index covers active tasks only; the full (status, updated_at)
    # index is gone (migration 0003): every hop wrote to it.
    active = indexes["ix_tasks_active_updated_at"]
    assert active["column_names"] == ["updated_at"]
    assert "in_progress" in active["dialect_options"]["postgresql_where"]
    assert "ix_tasks_status_updated_at" not in indexes


# -- the effects table, moves and listeners (issue 20) --------------------------------


def test_each_event_writes_its_row_of_the_effects_table(db: Database) -> None:
    # Given an assigned task with a stale deferral and error
    then = utcnow() - timedelta(minutes=1)
    task_id = insert_task(db, S.ASSIGNED, assigned_agent="a", not_before=then, deferred_since=then)
    store = TransitionStore(db, worker="w-1")
    until = utcnow() + timedelta(seconds=30)

    # When it starts with a pre-claim, then completes with a result under that lease
    started = store.apply(
        Move(task_id, "start", expected=S.ASSIGNED, preclaim="q:w/1", preclaim_until=until)
    )
    leased = task_row(db, task_id)
    done = store.apply(
        Move(task_id, "complete", expected=S.IN_PROGRESS, result={"ok": 1}, lease="q:w/1")
    )

    # Then start counted the attempt and leased it; complete stored the result and
    # cleared the run's lease and deferral
    assert started.applied and done.applied
    assert (leased["attempts"], leased["lease_owner"]) == (1, "q:w/1")
    assert abs(leased["lease_expires_at"] - until) < timedelta(seconds=1)
    row = task_row(db, task_id)
    assert read_json(row["result"]) == {"ok": 1}
    assert row["completed_at"] is not None
    assert [row[c] for c in RUN_COLUMNS] == [None] * len(RUN_COLUMNS)
    assert [e["worker"] for e in task_events(db, task_id)] == ["w-1", "w-1"]


@pytest.mark.parametrize("event", ["fail", "escalate"])
def test_fail_and_escalate_store_the_reason_and_end_the_run(db: Database, event: str) -> None:
    task_id = insert_task(
        db,
        S.IN_PROGRESS,
        assigned_agent="a",
        attempts=2,
        lease_owner="r:w/1",
        lease_expires_at=utcnow() + timedelta(seconds=30),
    )
    store = TransitionStore(db)

    # A move checking another lease or another attempt count loses the compare-and-set
    assert not store.apply(Move(task_id, event, expected=S.IN_PROGRESS, lease="r:w/2")).applied
    assert not store.apply(Move(task_id, event, expected=S.IN_PROGRESS, attempts=1)).applied
    moved = store.apply(
        Move(task_id, event, expected=S.IN_PROGRESS, reason="why", lease="r:w/1", attempts=2)
    )

    assert moved.applied and moved.detail == "why"
    row = task_row(db, task_id)
    assert row["last_error"] == "why"
    assert [row[c] for c in RUN_COLUMNS] == [None] * len(RUN_COLUMNS)
    assert row["attempts"] == 2


def test_effects_cover_the_machines_events_and_the_machine_applies_the_lifecycle_part() -> None:
    assert tuple(EFFECTS) == EVENTS
    for event, effects in EFFECTS.items():
        lifecycle = {c for c in (*effects.sets, *effects.clears) if c in LIFECYCLE_COLUMNS}
        assert set(move_fields(event, agent="a")) == lifecycle, event
    # the machine never counts: start's attempt is counted by the store's write
    assert move_fields("start") == {}


def test_listeners_hear_applied_transitions_and_one_that_raises_is_logged(
    db: Database, info_logs: None
) -> None:
    # Given a store with a listener that raises before one that records
    heard: list[TransitionResult] = []

    def broken(result: TransitionResult) -> None:
        raise RuntimeError("listener down")

    store = TransitionStore(db, listeners=(broken, heard.append))
    task_id = insert_task(db)

    # When a move applies, and a duplicate of it does not
    with structlog.testing.capture_logs() as logs:
        applied = store.apply(Move(task_id, "assign", expected=S.PENDING, agent="a"))
        stale = store.apply(Move(task_id, "assign", expected=S.PENDING, agent="b"))

    # Then the transition stands, the second listener heard it once, the failure is logged
    assert applied.applied and not stale.applied
    assert heard == [applied]
    [failed] = [line for line in logs if line["event"] == "transition_listener_failed"]
    assert failed["task_id"] == task_id and "listener down" in failed["error"]
    assert task_row(db, task_id)["status"] == S.ASSIGNED


@pytest.fixture
def info_logs() -> Iterator[None]:
    """Info lines pass whatever level an earlier test configured (restored after)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        yield
    finally:
        structlog.configure(**saved)


def test_the_default_store_logs_each_transition(db: Database, info_logs: None) -> None:
    task_id = insert_task(db)
    with structlog.testing.capture_logs() as logs:
        apply_transition(db, task_id, "assign", expected=S.PENDING, agent="a", reason="r")
    [line] = [line for line in logs if line["event"] == "task_transition"]
    assert (line["task_id"], line["transition"], line["agent"], line["detail"]) == (
        task_id,
        "assign",
        "a",
        "r",
    )


def test_the_transition_store_does_not_import_metrics() -> None:
    import ast
    import inspect

    from orchestration.store import transitions

    tree = ast.parse(inspect.getsource(transitions))
    imported = {
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not any(name.startswith("orchestration.ops") for name in imported), imported
