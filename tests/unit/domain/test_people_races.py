"""Two people, or a person and a worker, moving the same task at the same moment on the
real PostgreSQL (issue 21): exactly one move wins, the other is told why (WrongState,
AlreadyClaimed), and each move that happened has exactly one audit event."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestration import api
from orchestration.errors import AlreadyClaimed, TaskrailError, WrongState
from orchestration.filters import TaskFilter
from orchestration.models import TaskStatus
from orchestration.store.transitions import apply_transition
from tests.support import assert_valid_path
from tests.support import race as on_two_threads
from tests.unit.domain.people_support import Backend, open_backend

pytestmark = pytest.mark.integration

S = TaskStatus
ROUNDS = 25


@pytest.fixture
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    with open_backend("postgres", request, tmp_path, monkeypatch) as opened:
        yield opened


Call = Callable[[api.Taskrail, int], Any]


def race(backend: Backend, ids: list[int], calls: tuple[Call, Call]) -> list[list[Any]]:
    """For each task, ``calls[0]`` and ``calls[1]`` at the same moment on two threads,
    each with its own client (own connections). Returns per task the two outcomes: None
    for a move made, else the TaskrailError raised."""
    barrier = threading.Barrier(2, timeout=30)
    outcomes: list[list[Any]] = [[None, None] for _ in ids]
    errors: list[BaseException] = []
    trails = [api.Taskrail(backend.settings), api.Taskrail(backend.settings)]

    def run(n: int) -> None:
        try:
            trails[n].get(ids[0])  # connect before the race
            for i, task_id in enumerate(ids):
                barrier.wait()
                try:
                    calls[n](trails[n], task_id)
                except TaskrailError as err:
                    outcomes[i][n] = err
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    on_two_threads(run, trails, 120)
    assert not errors, errors
    return outcomes


def one_winner(outcomes: list[list[Any]], loser: type[Exception]) -> Counter[int]:
    """Each round has one winner and one ``loser`` error; returns the wins per thread."""
    wins: Counter[int] = Counter()
    for pair in outcomes:
        assert sorted(type(o).__name__ for o in pair) == sorted(["NoneType", loser.__name__]), pair
        wins[pair.index(None)] += 1
    return wins


def events_of(backend: Backend, task_id: int, event: str) -> list[dict[str, Any]]:
    return [e for e in backend.events(task_id) if e["event"] == event]


def test_two_people_resolving_one_task_one_wins(backend: Backend) -> None:
    # Given escalated tasks
    ids = [backend.put(S.ESCALATED) for _ in range(ROUNDS)]

    # When ana and bob resolve each at the same moment
    outcomes = race(
        backend,
        ids,
        (
            lambda t, i: t.resolve(i, {"by": "ana"}, by="ana"),
            lambda t, i: t.resolve(i, {"by": "bob"}, by="bob"),
        ),
    )

    # Then one wins, the other is told the task is completed; one resolve event, the
    # winner's, whose result is stored
    one_winner(outcomes, WrongState)
    for task_id, pair in zip(ids, outcomes, strict=True):
        winner = ("ana", "bob")[pair.index(None)]
        [resolved] = events_of(backend, task_id, "resolve")
        assert resolved["actor"] == winner
        assert backend.trail.get(task_id).result == {"by": winner}
        loss = next(o for o in pair if o is not None)
        assert loss.status == "completed"


def test_two_people_reopening_one_task_one_wins_and_one_hop_is_sent(backend: Backend) -> None:
    ids = [backend.put(S.ESCALATED) for _ in range(ROUNDS)]
    hops = len(backend.assign_hops())

    outcomes = race(
        backend,
        ids,
        (
            lambda t, i: t.reopen(i, payload={"w2": "ana.pdf"}, by="ana"),
            lambda t, i: t.reopen(i, payload={"w2": "bob.pdf", "x": 1}, by="bob"),
        ),
    )

    one_winner(outcomes, WrongState)
    for task_id, pair in zip(ids, outcomes, strict=True):
        winner = pair.index(None)
        [reopened] = events_of(backend, task_id, "reopen")
        assert reopened["actor"] == ("ana", "bob")[winner]
        want = [{"year": 2025, "w2": "ana.pdf"}, {"year": 2025, "w2": "bob.pdf", "x": 1}]
        assert backend.trail.get(task_id).payload == want[winner]
    assert len(backend.assign_hops()) == hops + len(ids)


def test_two_people_claiming_one_task_one_holds_it(backend: Backend) -> None:
    ids = [backend.put(S.ESCALATED) for _ in range(ROUNDS)]

    outcomes = race(
        backend, ids, (lambda t, i: t.claim(i, by="ana"), lambda t, i: t.claim(i, by="bob"))
    )

    wins = one_winner(outcomes, AlreadyClaimed)
    for task_id, pair in zip(ids, outcomes, strict=True):
        winner = ("ana", "bob")[pair.index(None)]
        assert backend.trail.get(task_id).claimed_by == winner
        assert [e["actor"] for e in events_of(backend, task_id, "claim")] == [winner]
        assert next(o for o in pair if o is not None).claimed_by == winner
    assert sum(wins.values()) == ROUNDS


def test_a_resolve_and_a_reopen_at_once_one_wins(backend: Backend) -> None:
    ids = [backend.put(S.ESCALATED, claimed_by="ana") for _ in range(ROUNDS)]

    outcomes = race(
        backend,
        ids,
        (
            lambda t, i: t.resolve(i, {"ok": True}, by="ana"),
            lambda t, i: t.reopen(i, payload={"w2": "x"}, by="bob"),
        ),
    )

    one_winner(outcomes, WrongState)
    for task_id, pair in zip(ids, outcomes, strict=True):
        events = [e["event"] for e in backend.events(task_id)]
        if pair[0] is None:
            assert events[-1] == "resolve" and "reopen" not in events
            assert backend.trail.get(task_id).status is S.COMPLETED
        else:
            assert events[-1] == "reopen" and "resolve" not in events
            # the loser saw the task pending, or already further along
            assert pair[0].status in ("pending", "assigned", "in_progress")


def test_a_cancel_racing_the_workers_moves_ends_in_one_final_state(backend: Backend) -> None:
    # Given pending tasks
    ids = [backend.put(S.PENDING) for _ in range(ROUNDS * 2)]
    applied: Counter[int] = Counter()

    def worker(trail: api.Taskrail, task_id: int) -> None:
        # The hops' own moves: assign, start, complete, each from the state it expects
        for event, expected in (
            ("assign", S.PENDING),
            ("start", S.ASSIGNED),
            ("complete", S.IN_PROGRESS),
        ):
            moved = apply_transition(
                trail.db,
                task_id,
                event,
                expected=expected,
                agent="personal_tax_agent" if event == "assign" else None,
                worker="w-1",
                set_={"result": {"ok": 1}} if event == "complete" else None,
            )
            if not moved.applied:
                return
            applied[task_id] += 1
            time.sleep(random.uniform(0, 0.004))  # a hop's own work: the cancel may land anywhere

    # When a person cancels each while a worker drives it
    outcomes = race(backend, ids, (worker, lambda t, i: t.cancel(i, reason="stop", by="ana")))

    # Then each task is cancelled or completed, never both; its events replay on the
    # state machine and there is one per transition that happened
    finals: Counter[str] = Counter()
    for task_id, (_, cancel) in zip(ids, outcomes, strict=True):
        task = backend.trail.get(task_id)
        events = backend.events(task_id)
        path = [(e["event"], e["from_status"].value, e["to_status"].value) for e in events]
        assert_valid_path(task_id, path, task.status.value)
        finals[task.status.value] += 1
        if cancel is None:
            assert task.status is S.CANCELLED
            assert len(events) == applied[task_id] + 1
            assert [e["actor"] for e in events if e["event"] == "cancel"] == ["ana"]
            assert task.result is None
        else:
            assert isinstance(cancel, WrongState)
            assert (cancel.status, task.status) == ("completed", S.COMPLETED)
            assert len(events) == applied[task_id] == 3
    assert set(finals) <= {"cancelled", "completed"}
    assert sum(finals.values()) == len(ids)


def test_a_bulk_cancel_racing_the_workers_counts_every_task_once(backend: Backend) -> None:
    # Given 120 pending tasks, and a worker driving them newest first to completion
    ids = [backend.put(S.PENDING) for _ in range(120)]
    db = backend.db
    started = threading.Event()

    def work() -> None:
        started.set()
        for task_id in reversed(ids):
            for event, expected in (
                ("assign", S.PENDING),
                ("start", S.ASSIGNED),
                ("complete", S.IN_PROGRESS),
            ):
                moved = apply_transition(
                    db,
                    task_id,
                    event,
                    expected=expected,
                    agent="personal_tax_agent" if event == "assign" else None,
                    worker="w-1",
                )
                if not moved.applied:
                    break

    worker = threading.Thread(target=work)
    worker.start()
    started.wait(10)

    # When every pending or assigned task is cancelled meanwhile, in batches of 7
    trail = api.Taskrail(backend.settings)
    try:
        result = trail.bulk(
            "cancel", TaskFilter.build(status=["pending", "assigned"]), by="ana", batch=7
        )
    finally:
        trail.close()
    worker.join(60)

    # Then each task matched was cancelled once or skipped, and counted as one of them;
    # every task's events replay, one per transition, ending in its status
    assert result.matched == result.moved + result.skipped
    cancelled = [i for i in ids if backend.trail.get(i).status is S.CANCELLED]
    assert len(cancelled) == result.moved
    for task_id in ids:
        task = backend.trail.get(task_id)
        events = backend.events(task_id)
        path = [(e["event"], e["from_status"].value, e["to_status"].value) for e in events]
        assert_valid_path(task_id, path, task.status.value)
        assert task.status in (S.CANCELLED, S.COMPLETED, S.IN_PROGRESS), path
        cancels = [e for e in events if e["event"] == "cancel"]
        assert len(cancels) == (1 if task.status is S.CANCELLED else 0)
        assert [e["actor"] for e in cancels] == (["ana"] if cancels else [])
