"""Bulk moves by filter (issue 21): ``retry_many``, ``cancel_many`` and ``bulk``, on
SQLite and PostgreSQL. A dry run changes nothing; a real run moves every matching task
with one audit event each, sends retried tasks to the workers, and skips (and counts)
a task that moved on between the read of its id and the write."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from orchestration import api
from orchestration.errors import InvalidClientId, InvalidField, InvalidFilter
from orchestration.filters import TaskFilter
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.moves import RUN_COLUMNS, Move
from orchestration.store import listing
from orchestration.store.transitions import TransitionStore
from tests.unit.domain.people_support import WORKER, Backend, move_to

S = TaskStatus


def everything(backend: Backend) -> tuple[Any, ...]:
    """Every task row, every audit row and every hop message."""
    with backend.db.connect() as conn:
        tasks = [dict(r) for r in conn.execute(select(tasks_table).order_by("id")).mappings()]
        events = [dict(r) for r in conn.execute(select(events_table).order_by("id")).mappings()]
    return tasks, events, backend.hops()


def put_many(backend: Backend, status: TaskStatus, n: int, **kwargs: Any) -> list[int]:
    return [backend.put(status, **kwargs) for _ in range(n)]


# -- dry runs ----------------------------------------------------------------------


def test_a_dry_run_counts_and_shows_the_first_ids_and_changes_nothing(backend: Backend) -> None:
    # Given 13 failed tasks among others
    failed = put_many(backend, S.FAILED, 13)
    backend.put(S.ESCALATED)
    backend.put(S.PENDING)
    before = everything(backend)

    # When a retry of every failed task is tried dry
    result = backend.trail.retry_many(dry_run=True, by="ana")

    # Then it says how many and which (the ten newest), and nothing changed
    assert result.dry_run
    assert (result.event, result.matched, result.moved, result.skipped) == ("retry", 13, 0, 0)
    assert list(result.first_ids) == failed[::-1][:10]
    assert everything(backend) == before
    assert result.to_dict() == {
        "event": "retry",
        "dry_run": True,
        "matched": 13,
        "moved": 0,
        "skipped": 0,
        "first_ids": failed[::-1][:10],
    }


def test_a_dry_run_of_a_cancel_by_filter(backend: Backend) -> None:
    pending = put_many(backend, S.PENDING, 2, task_type="payroll")
    put_many(backend, S.PENDING, 2, task_type="bookkeeping")
    before = everything(backend)

    result = backend.trail.cancel_many(status="pending", task_type="payroll", dry_run=True)

    assert (result.matched, result.moved, list(result.first_ids)) == (2, 0, pending[::-1])
    assert everything(backend) == before


# -- real runs ---------------------------------------------------------------------


def test_retry_many_moves_every_failed_task_audits_each_and_sends_each(
    backend: Backend,
) -> None:
    # Given 7 failed tasks, and tasks in other states
    failed = put_many(backend, S.FAILED, 7)
    others = [backend.put(s) for s in (S.ESCALATED, S.COMPLETED, S.PENDING, S.CANCELLED)]
    history = {i: backend.events(i) for i in failed + others}
    hops = backend.assign_hops()
    seen: list[tuple[int, int]] = []

    # When ana retries them, three at a time
    result = backend.trail.bulk(
        "retry",
        TaskFilter.build(status="failed"),
        by="ana",
        note="tax service is back",
        batch=3,
        progress=lambda done, total: seen.append((done, total)),
    )

    # Then every failed task is pending again, fresh, with one retry event by ana
    assert (result.matched, result.moved, result.skipped, result.dry_run) == (7, 7, 0, False)
    assert list(result.first_ids) == failed[::-1]
    assert seen == [(3, 7), (6, 7), (7, 7)]
    for task_id in failed:
        task = backend.trail.get(task_id)
        assert (task.status, task.attempts, task.assigned_agent) == (S.PENDING, 0, None)
        events = backend.events(task_id)
        assert events[:-1] == history[task_id]
        new = events[-1]
        assert (new["event"], new["from_status"], new["to_status"]) == (
            "retry",
            S.FAILED,
            S.PENDING,
        )
        assert (new["actor"], new["note"], new["worker"], new["detail"]) == (
            "ana",
            "tax service is back",
            "api",
            None,
        )
    # and sent to the workers: one assign hop per retried task
    assert sorted(backend.assign_hops()[len(hops) :]) == sorted(failed)
    # The others did not move
    assert {i: backend.events(i) for i in others} == {i: history[i] for i in others}


def test_cancel_many_from_several_statuses_audits_the_status_each_task_left(
    backend: Backend,
) -> None:
    # Given pending, assigned and in-progress tasks (one leased), and an escalated one
    by_status = {s: put_many(backend, s, 2) for s in (S.PENDING, S.ASSIGNED, S.IN_PROGRESS)}
    escalated = backend.put(S.ESCALATED)
    hops = backend.hops()

    # When bob cancels every active task, two at a time
    result = backend.trail.bulk(
        "cancel",
        TaskFilter.build(status=["pending", "assigned", "in_progress"]),
        reason="client left",
        by="bob",
        batch=2,
    )

    # Then each is cancelled with one event naming the status it left and its agent
    assert (result.matched, result.moved, result.skipped) == (6, 6, 0)
    for status, ids in by_status.items():
        for task_id in ids:
            row = backend.row(task_id)
            assert row["status"] == S.CANCELLED
            assert row["last_error"] == "client left"
            assert [row[c] for c in RUN_COLUMNS] == [None] * len(RUN_COLUMNS)
            new = backend.events(task_id)[-1]
            assert (new["event"], new["from_status"], new["to_status"]) == (
                "cancel",
                status,
                S.CANCELLED,
            )
            assert (new["actor"], new["detail"], new["worker"], new["note"]) == (
                "bob",
                "client left",
                "api",
                None,
            )
            want_agent = None if status is S.PENDING else "personal_tax_agent"
            assert new["agent"] == want_agent
    assert backend.trail.get(escalated).status is S.ESCALATED
    assert backend.hops() == hops  # nothing sent for a cancel


def test_cancel_many_gives_the_default_reason(backend: Backend) -> None:
    task_id = backend.put(S.PENDING)

    result = api.cancel_many(status="pending")

    assert result.moved == 1
    assert backend.trail.get(task_id).last_error == "cancelled"
    assert backend.trail.history(task_id)[-1].detail == "cancelled"


def test_bulk_moves_only_what_the_filters_match(backend: Backend) -> None:
    payroll = put_many(backend, S.FAILED, 2, task_type="payroll", client_id=7)
    put_many(backend, S.FAILED, 1, task_type="payroll", client_id=8)
    put_many(backend, S.FAILED, 1, task_type="bookkeeping", client_id=7)

    result = api.retry_many(task_type="payroll", client_id=7, since="1h", by="ana")

    assert (result.matched, result.moved, sorted(result.first_ids)) == (2, 2, payroll)
    assert sorted(backend.assign_hops()[-2:]) == payroll
    assert backend.count() == 4
    assert {t.id for t in backend.trail.list_tasks(status="failed")} & set(payroll) == set()


def test_bulk_on_nothing_moves_nothing(backend: Backend) -> None:
    backend.put(S.PENDING)
    before = everything(backend)

    result = backend.trail.retry_many()

    assert (result.matched, result.moved, result.skipped, result.first_ids) == (0, 0, 0, ())
    assert everything(backend) == before


# -- tasks that move on meanwhile ---------------------------------------------------


def test_a_task_that_moves_on_between_the_read_and_the_write_is_skipped_and_counted(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 6 pending tasks
    ids = put_many(backend, S.PENDING, 6)
    newest_first = ids[::-1]
    store = TransitionStore(backend.db, worker=WORKER)
    read_pages: list[list[int]] = []

    def pages_read_then_moved(*args: Any, **kwargs: Any) -> Iterator[list[int]]:
        # Each page of ids is read; then, before the bulk writes it, a hop assigns the
        # page's last task and a worker finishes the one before it
        for page in real_page_ids(*args, **kwargs):
            read_pages.append(page)
            if len(page) == 2:
                assign = Move(page[-1], "assign", expected=S.PENDING, agent="payroll_agent")
                assert store.apply(assign).applied
            if len(read_pages) == 2:
                move_to(backend.db, page[0], S.ESCALATED)  # from pending, through running
            yield page

    real_page_ids = listing.page_ids
    monkeypatch.setattr(listing, "page_ids", pages_read_then_moved)

    # When every pending task is cancelled, two at a time
    result = backend.trail.bulk("cancel", TaskFilter.build(status="pending"), batch=2, by="ana")

    # Then the tasks that moved on are skipped and counted, the others cancelled
    assert read_pages == [newest_first[0:2], newest_first[2:4], newest_first[4:6]]
    skipped = {newest_first[1], newest_first[2], newest_first[3], newest_first[5]}
    assert (result.matched, result.moved, result.skipped) == (6, 2, 4)
    assert set(result.first_ids) == set(ids) - skipped
    for task_id in ids:
        events = [e["event"] for e in backend.events(task_id)]
        if task_id in skipped:
            assert "cancel" not in events
            assert backend.trail.get(task_id).status in (S.ASSIGNED, S.ESCALATED)
        else:
            assert events == ["cancel"]
            assert backend.trail.get(task_id).status is S.CANCELLED


# -- refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda t: t.retry_many(status="pending"), "status"),
        (lambda t: t.retry_many(status=["failed", "escalated"]), "status"),
        (lambda t: t.retry_many(status=None), "status"),
        (lambda t: t.retry_many(status=[]), "status"),
        (lambda t: t.retry_many(status="failure"), "status"),
        (lambda t: t.cancel_many(status="completed"), "status"),
        (lambda t: t.cancel_many(status="cancelled"), "status"),
        (lambda t: t.cancel_many(status=["pending", "failed"]), "status"),
        (lambda t: t.cancel_many(status=None), "status"),
        (lambda t: t.cancel_many(status="pending", since="soon"), "since"),
        (lambda t: t.cancel_many(status="pending", task_type=""), "task type"),
        (lambda t: t.bulk("resolve", TaskFilter.build(status="escalated")), "event"),
        (lambda t: t.bulk("retry", TaskFilter.build(status="failed"), batch=0), "batch"),
        (lambda t: t.bulk("retry", TaskFilter.build(status="failed"), batch=True), "batch"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_bulk_move_the_filter_cannot_make_is_refused_and_writes_nothing(
    backend: Backend, call: Any, name: str
) -> None:
    for status in TaskStatus:
        backend.put(status)
    before = everything(backend)

    with pytest.raises(InvalidFilter) as info:
        call(backend.trail)

    assert str(info.value).startswith(f"invalid {name}: ")
    assert "\n" not in str(info.value)
    assert everything(backend) == before


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"by": ""}, InvalidField, "by"),
        ({"by": "ana\x00"}, InvalidField, "by"),
        ({"note": "x" * 4001}, InvalidField, "note"),
        ({"note": 5}, InvalidField, "note"),
        ({"reason": ""}, InvalidField, "reason"),
        ({"reason": 5}, InvalidField, "reason"),
        ({"client_id": -1}, InvalidClientId, "client id"),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_bad_input_to_a_bulk_move_is_refused_and_writes_nothing(
    backend: Backend, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    backend.put(S.PENDING)
    backend.put(S.FAILED)
    before = everything(backend)

    with pytest.raises(error) as info:
        backend.trail.cancel_many(status="pending", **kwargs)
    if "reason" not in kwargs:
        with pytest.raises(error):
            backend.trail.retry_many(**kwargs)

    assert name in str(info.value)
    assert everything(backend) == before


@pytest.mark.parametrize("name", ["claimed_by", "after", "colour"])
def test_a_bulk_move_takes_no_filter_it_does_not_know_and_writes_nothing(
    backend: Backend, name: str
) -> None:
    # Given tasks a bulk retry and a bulk cancel could move
    backend.put(S.PENDING)
    backend.put(S.FAILED)
    before = everything(backend)

    # When a filter the bulk moves do not take is given (list_tasks takes the first two)
    # Then each refuses it as a call with an unknown keyword is refused, naming it
    with pytest.raises(TypeError, match=name):
        backend.trail.retry_many(**{name: 1})
    with pytest.raises(TypeError, match=name):
        backend.trail.cancel_many(status="pending", **{name: 1})
    assert everything(backend) == before
