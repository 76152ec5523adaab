"""The people's moves in the transition store (issue 21): ``TransitionStore.apply_many``
(one statement per batch on PostgreSQL, a compare-and-set per task on SQLite) and the
audit rows it writes: the status each task left, its agent, the actor and the note;
and, on PostgreSQL, what the statement does when a hop holds or moves a task meanwhile."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from statemachine.exceptions import TransitionNotAllowed

from orchestration.models import TaskStatus, events_table, tasks_table, utcnow
from orchestration.moves import RUN_COLUMNS, Move
from orchestration.store.db import Database
from orchestration.store.transitions import TransitionResult, TransitionStore, apply_transition
from orchestration.values import read_text
from tests.support import race

S = TaskStatus


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'store.db'}")
    db.ensure_schema()
    yield db
    db.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest) -> Database:
    database: Database = request.getfixturevalue(
        "sqlite_db" if request.param == "sqlite" else "pg_db"
    )
    return database


def insert_task(db: Database, status: TaskStatus, **columns: Any) -> int:
    then = utcnow() - timedelta(minutes=5)
    values: dict[str, Any] = {
        "client_id": 42,
        "task_type": "personal_tax",
        "status": status,
        "payload": {},
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


def rows(db: Database) -> dict[int, dict[str, Any]]:
    with db.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(select(tasks_table)).mappings()}


def events(db: Database) -> list[dict[str, Any]]:
    with db.connect() as conn:
        query = select(events_table).order_by(events_table.c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def test_apply_many_moves_each_task_from_the_status_it_is_in(db: Database) -> None:
    # Given tasks pending, assigned (to an agent) and in progress (leased), and others
    pending = insert_task(db, S.PENDING)
    assigned = insert_task(db, S.ASSIGNED, assigned_agent="payroll_agent")
    running = insert_task(
        db,
        S.IN_PROGRESS,
        assigned_agent="personal_tax_agent",
        attempts=1,
        lease_owner="r:w/1",
        lease_expires_at=utcnow() + timedelta(seconds=30),
    )
    done = insert_task(db, S.COMPLETED)
    escalated = insert_task(db, S.ESCALATED)
    heard: list[TransitionResult] = []
    store = TransitionStore(db, worker="api", listeners=[heard.append])
    move = Move(0, "cancel", actor="ana", note="the client left\x00", reason="left \ud800")

    # When all five are cancelled from the three active statuses
    results = store.apply_many(
        move, [done, running, escalated, assigned, pending], [S.PENDING, S.ASSIGNED, S.IN_PROGRESS]
    )

    # Then the three active ones moved, each audited from the status it left, naming
    # its agent, the actor, the note and the reason; the listeners heard each
    moved = {r.task_id: r for r in results}
    assert set(moved) == {pending, assigned, running}
    assert heard == results
    want_from = {pending: S.PENDING, assigned: S.ASSIGNED, running: S.IN_PROGRESS}
    want_agent = {pending: None, assigned: "payroll_agent", running: "personal_tax_agent"}
    for task_id, result in moved.items():
        assert (result.from_status, result.to_status) == (want_from[task_id], S.CANCELLED)
        assert (result.agent, result.actor) == (want_agent[task_id], "ana")
        assert read_text(result.detail) == "left \ud800"  # as stored
        assert "from_status" not in result.row
    written = events(db)
    assert len(written) == 3
    for event in written:
        task_id = event["task_id"]
        assert (event["event"], event["from_status"], event["to_status"]) == (
            "cancel",
            want_from[task_id],
            S.CANCELLED,
        )
        assert event["agent"] == want_agent[task_id]
        assert (event["actor"], event["worker"]) == ("ana", "api")
        assert read_text(event["note"]) == "the client left\x00"
        assert read_text(event["detail"]) == "left \ud800"
    after = rows(db)
    for task_id in moved:
        assert after[task_id]["status"] == S.CANCELLED
        assert [after[task_id][c] for c in RUN_COLUMNS] == [None] * len(RUN_COLUMNS)
        assert read_text(after[task_id]["last_error"]) == "left \ud800"
        assert after[task_id]["updated_at"] > utcnow() - timedelta(minutes=1)
    assert (after[done]["status"], after[escalated]["status"]) == (S.COMPLETED, S.ESCALATED)


def test_apply_many_of_a_retry_clears_the_agent_and_the_claim(db: Database) -> None:
    failed = [
        insert_task(db, S.FAILED, assigned_agent="payroll_agent", attempts=3, claimed_by="ana")
        for _ in range(3)
    ]
    store = TransitionStore(db, worker="api")

    results = store.apply_many(
        Move(0, "retry", actor="bob", returning=("task_type",)), failed, S.FAILED
    )

    assert sorted(r.task_id for r in results) == failed
    assert {r.row["task_type"] for r in results} == {"personal_tax"}
    for row in rows(db).values():
        assert (row["status"], row["attempts"], row["assigned_agent"], row["claimed_by"]) == (
            S.PENDING,
            0,
            None,
            None,
        )
    assert [(e["from_status"], e["actor"], e["agent"]) for e in events(db)] == [
        (S.FAILED, "bob", None)
    ] * 3


def test_apply_many_checks_the_moves_guards(db: Database) -> None:
    mine = insert_task(db, S.ESCALATED, claimed_by="ana")
    theirs = insert_task(db, S.ESCALATED, claimed_by="bob")
    store = TransitionStore(db, worker="api")

    results = store.apply_many(
        Move(0, "unclaim", actor="ana", extra_guard={"claimed_by": "ana"}),
        [mine, theirs],
        S.ESCALATED,
    )

    assert [r.task_id for r in results] == [mine]
    assert (rows(db)[mine]["claimed_by"], rows(db)[theirs]["claimed_by"]) == (None, "bob")


@pytest.mark.parametrize(
    ("event", "statuses"),
    [
        ("retry", [S.PENDING]),
        ("retry", [S.FAILED, S.ESCALATED]),
        ("cancel", [S.PENDING, S.COMPLETED]),
        ("cancel", [S.CANCELLED]),
        ("resolve", [S.FAILED]),
    ],
)
def test_apply_many_from_a_status_the_event_cannot_leave_writes_nothing(
    db: Database, event: str, statuses: list[TaskStatus]
) -> None:
    ids = [insert_task(db, s) for s in TaskStatus]
    before = rows(db)

    with pytest.raises(TransitionNotAllowed):
        TransitionStore(db).apply_many(Move(0, event, actor="ana"), ids, statuses)

    assert rows(db) == before
    assert events(db) == []


def test_apply_many_of_no_ids_or_no_statuses_does_nothing(db: Database) -> None:
    task_id = insert_task(db, S.PENDING)
    store = TransitionStore(db)

    assert store.apply_many(Move(0, "cancel"), [], [S.PENDING]) == []
    assert store.apply_many(Move(0, "cancel"), [task_id], []) == []
    assert store.apply_many(Move(0, "cancel"), [task_id + 1000], S.PENDING) == []
    assert events(db) == []


def test_a_persons_move_names_the_actor_and_a_hops_names_its_worker(db: Database) -> None:
    task_id = insert_task(db, S.ESCALATED)
    store = TransitionStore(db, worker="api")

    store.apply(Move(task_id, "claim", expected=S.ESCALATED, actor="ana", note="mine"))
    apply_transition(db, task_id, "reopen", expected=S.ESCALATED, worker="w-1")

    claim, reopen = events(db)
    assert (claim["actor"], claim["worker"], claim["note"]) == ("ana", "api", "mine")
    assert (claim["from_status"], claim["to_status"]) == (S.ESCALATED, S.ESCALATED)
    assert (reopen["actor"], reopen["worker"], reopen["note"]) == ("w-1", "w-1", None)
    row = rows(db)[task_id]
    assert (row["status"], row["claimed_by"], row["claimed_at"]) == (S.PENDING, None, None)


# -- PostgreSQL: a hop holding or moving a task while the batch statement runs -------------


def _blocked(pg_db: Database) -> bool:
    """Some statement of this database waits for a row lock."""
    with pg_db.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def _cancel_in_background(
    pg_db: Database, ids: list[int], statuses: list[TaskStatus]
) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            store = TransitionStore(pg_db, worker="api")
            out.append(store.apply_many(Move(0, "cancel", actor="ana"), ids, statuses))
        except BaseException as err:
            out.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _hold_and_move(
    pg_db: Database, task_id: int, to: TaskStatus, statuses: list[TaskStatus]
) -> tuple[list[TransitionResult], dict[int, dict[str, Any]]]:
    """A hop's transaction moves ``task_id`` to ``to`` and holds its lock while a batch
    cancel of every task (from ``statuses``) starts and waits for it; then commits."""
    ids = sorted(rows(pg_db))
    hop = pg_db.engine.connect()
    try:
        with hop.begin():
            hop.execute(
                text("UPDATE tasks SET status = :to, assigned_agent = 'a' WHERE id = :id"),
                {"to": to.value, "id": task_id},
            )
            thread, out = _cancel_in_background(pg_db, ids, statuses)
            deadline = time.monotonic() + 30
            while not _blocked(pg_db):
                assert time.monotonic() < deadline, "the batch never waited for the hop"
                assert thread.is_alive(), out
                time.sleep(0.02)
        thread.join(30)
    finally:
        hop.close()
    assert not thread.is_alive()
    [results] = out
    assert not isinstance(results, BaseException), results
    return results, rows(pg_db)


@pytest.mark.integration
def test_a_task_a_hop_moves_out_of_the_statuses_meanwhile_is_left_alone(pg_db: Database) -> None:
    # Given three pending tasks, the middle one being assigned by a hop that holds its lock
    ids = [insert_task(pg_db, S.PENDING) for _ in range(3)]

    # When a batch cancels every pending task and has to wait for the hop's commit
    results, after = _hold_and_move(pg_db, ids[1], S.ASSIGNED, [S.PENDING])

    # Then the hop's task (no longer pending) is not moved; the others are, once each
    assert sorted(r.task_id for r in results) == [ids[0], ids[2]]
    assert after[ids[1]]["status"] == S.ASSIGNED
    assert Counter(e["task_id"] for e in events(pg_db)) == {ids[0]: 1, ids[2]: 1}


@pytest.mark.integration
def test_a_task_a_hop_moves_to_another_named_status_is_audited_from_that_one(
    pg_db: Database,
) -> None:
    # Given three pending tasks, the middle one being assigned by a hop that holds its lock
    ids = [insert_task(pg_db, S.PENDING) for _ in range(3)]

    # When a batch cancels every pending or assigned task and waits for the hop's commit
    results, after = _hold_and_move(pg_db, ids[1], S.ASSIGNED, [S.PENDING, S.ASSIGNED])

    # Then all three are cancelled; the hop's task is audited as leaving assigned
    assert sorted(r.task_id for r in results) == ids
    assert {after[i]["status"] for i in ids} == {S.CANCELLED}
    left = {e["task_id"]: (e["from_status"], e["agent"]) for e in events(pg_db)}
    assert left == {ids[0]: (S.PENDING, None), ids[1]: (S.ASSIGNED, "a"), ids[2]: (S.PENDING, None)}
    assert {r.task_id: r.from_status for r in results}[ids[1]] is S.ASSIGNED


@pytest.mark.integration
def test_two_batches_over_the_same_tasks_never_deadlock(pg_db: Database, pg_url: str) -> None:
    # Given 300 pending tasks
    ids = [insert_task(pg_db, S.PENDING) for _ in range(300)]
    barrier = threading.Barrier(2, timeout=30)
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def run(n: int) -> None:
        db = Database(pg_url)
        try:
            store = TransitionStore(db, worker=f"api-{n}")
            # The two walk the same tasks in opposite orders, in batches of 30
            order = ids if n == 0 else ids[::-1]
            for start in range(0, len(order), 30):
                barrier.wait()
                batch = order[start : start + 30] + order[::-1][start : start + 30]
                got[n] += [r.task_id for r in store.apply_many(Move(0, "cancel"), batch, S.PENDING)]
        except BaseException as err:
            errors.append(err)
            barrier.abort()
        finally:
            db.dispose()

    # When two bulk cancels run at once over overlapping batches
    race(run, (), 120)

    # Then neither failed (no deadlock), and each task was cancelled exactly once
    assert not errors, errors
    assert sorted(got[0] + got[1]) == ids
    with pg_db.connect() as conn:
        per_task = dict(
            conn.execute(
                select(events_table.c.task_id, func.count()).group_by(events_table.c.task_id)
            ).all()
        )
    assert per_task == {i: 1 for i in ids}
