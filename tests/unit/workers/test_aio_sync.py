"""Sync handlers handed over to handler threads (``--sync-calls``, and the plain worker's
default: workers/aio.py): every outcome, the time limit and a cancel settle the run at
once (a thread cannot be stopped: what it returns later is discarded and logged), the
slots bound the threads, a drain gives back what still runs, and which kind of handler
an executor takes. ``conclude`` is the recorder of test_aio.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestration.agents import Escalate, PermanentError
from orchestration.settings import Settings
from tests.unit.workers.test_aio import TASK_ID, Recorder, _discards, _spec, _view, _wait_for
from workers import aio
from workers.aio import SHUTDOWN, AsyncCalls, RunStop
from workers.calls import Kind


@pytest.fixture
def threads() -> Iterator[AsyncCalls]:
    calls = AsyncCalls(0, sync_limit=3)
    yield calls
    if not calls.closing:
        calls.drain(0.0)


def _start(
    calls: AsyncCalls, recorder: Recorder, handler: Any, *, task_id: int = TASK_ID, **kw: Any
) -> RunStop:
    stop = calls.new_stop()
    spec = _spec(handler, **kw)
    assert calls.start(spec, _view(stop, task_id), stop, recorder.conclude(task_id))
    return stop


def test_the_executor_takes_the_kinds_it_has_slots_for() -> None:
    async def coro(task: Any) -> None:
        return None

    def plain(task: Any) -> None:
        return None

    both, only_async = AsyncCalls(5, sync_limit=5), AsyncCalls(5)
    try:
        assert both.takes(_spec(coro)) and both.takes(_spec(plain))
        assert only_async.takes(_spec(coro)) and not only_async.takes(_spec(plain))
    finally:
        both.drain(0.0)
        only_async.drain(0.0)


@pytest.mark.parametrize("slow", [False, True], ids=["ends-at-once", "slow"])
@pytest.mark.parametrize(
    ("raised", "kind", "reason"),
    [
        (None, Kind.RESULT, ""),
        (Escalate("missing W-2"), Kind.ESCALATE, "missing W-2"),
        (PermanentError("bad account"), Kind.PERMANENT, "bad account"),
        (ConnectionError("reset"), Kind.ERROR, "ConnectionError: reset"),
        (SystemExit(3), Kind.ERROR, "SystemExit: 3"),
    ],
)
def test_a_sync_handler_outcome_is_concluded_once(
    threads: AsyncCalls,
    raised: BaseException | None,
    kind: Kind,
    reason: str,
    slow: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (the hop's wait for a call that ends at once is made long: "at once" must not
    # depend on this machine's speed)
    monkeypatch.setattr(aio, "QUICK_CALL_S", 0.0 if slow else 20.0)
    recorder = Recorder()
    seen: list[str] = []
    release = threading.Event()

    def handler(task: Any) -> dict[str, int]:
        seen.append(threading.current_thread().name)
        if slow:
            release.wait(20)
        if raised is not None:
            raise raised
        return {"n": task.payload["n"]}

    _start(threads, recorder, handler)
    release.set()
    written = recorder.one()
    assert written.outcome.kind is kind
    if kind is Kind.RESULT:
        assert written.outcome.result == {"n": 1}
    else:
        assert written.outcome.reason == reason
    assert seen[0].startswith("taskrail-handler")
    # A call that ends at once is concluded in the hop that started it (no loop, no
    # outcome thread); a slow one on an outcome thread, after the hop went on
    if slow:
        assert written.thread.startswith("taskrail-outcome")
    else:
        assert written.thread == threading.current_thread().name
    assert recorder.count() == 1
    _wait_for(lambda: threads.in_flight == 0, "the run was not let go")


def test_a_sync_handler_returning_a_coroutine_fails_permanently(threads: AsyncCalls) -> None:
    recorder = Recorder()

    async def forgotten() -> None:
        return None

    _start(threads, recorder, lambda task: forgotten())
    written = recorder.one()
    assert written.outcome.kind is Kind.PERMANENT
    assert "an awaitable" in written.outcome.reason


def test_past_its_time_limit_a_sync_call_times_out_at_once_and_its_late_result_is_dropped(
    threads: AsyncCalls,
) -> None:
    recorder = Recorder()
    release = threading.Event()
    returned = threading.Event()

    def hung(task: Any) -> str:
        release.wait(20)
        returned.set()
        return "late"

    with capture_logs() as logs:
        _start(threads, recorder, hung, time_limit_s=0.2)
        written = recorder.one()
        assert written.outcome.kind is Kind.TIMEOUT
        assert written.outcome.reason == "time limit of 0.2 s exceeded"
        release.set()
        _wait_for(lambda: _discards(logs), "the late result was not logged")
    assert returned.is_set()
    assert _discards(logs) == [(TASK_ID, "returned", "time limit")]
    assert recorder.count() == 1


def test_a_cancel_settles_a_running_sync_call_at_once(threads: AsyncCalls) -> None:
    recorder = Recorder()
    release = threading.Event()
    running = threading.Event()

    def slow(task: Any) -> str:
        running.set()
        release.wait(20)
        return "after the cancel"

    with capture_logs() as logs:
        stop = _start(threads, recorder, slow)
        assert running.wait(20)
        stop.set()  # what the lease keeper does when the task was cancelled
        written = recorder.one()
        assert written.outcome.kind is Kind.CANCELLED
        assert written.stopped
        release.set()
        _wait_for(lambda: _discards(logs), "the late result was not logged")
    assert _discards(logs) == [(TASK_ID, "returned", "cancelled")]
    assert recorder.count() == 1


def test_the_sync_slots_bound_the_threads_and_a_drain_gives_back_what_still_runs() -> None:
    calls = AsyncCalls(0, sync_limit=2)
    recorder = Recorder()
    release = threading.Event()
    running: list[int] = []
    lock = threading.Lock()

    def held(task: Any) -> str:
        with lock:
            running.append(task.id)
        release.wait(20)
        return "done"

    for task_id in (1, 2):
        _start(calls, recorder, held, task_id=task_id)
    _wait_for(lambda: len(running) == 2, "two calls never ran")
    # a third waits for a slot: it gives up once the executor closes
    third: list[bool] = []
    waiter = threading.Thread(
        target=lambda: third.append(
            calls.start(_spec(held), _view(RunStop(), 3), RunStop(), recorder.conclude(3))
        )
    )
    waiter.start()
    assert calls.in_flight == 2
    given_up = calls.drain(0.0)
    waiter.join(20)
    assert third == [False]
    assert given_up == 2
    assert {w.outcome.reason for ws in recorder.written.values() for w in ws} == {SHUTDOWN}
    assert sorted(running) == [1, 2]
    release.set()


def test_limits_come_from_the_command_line_then_the_settings_then_the_plain_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aio, "_given", {"async_calls": None, "sync_calls": None})
    monkeypatch.setattr(aio, "_plain_worker", False)
    assert aio.limits(Settings()) == (0, 0)
    monkeypatch.setattr(aio, "_plain_worker", True)
    assert aio.limits(Settings()) == aio.PLAIN_WORKER_LIMITS
    assert aio.limits(Settings(sync_calls=0)) == (aio.PLAIN_WORKER_LIMITS[0], 0)
    aio.set_limit(7)
    aio.set_limit(9, sync=True)
    assert aio.limits(Settings(async_calls=1, sync_calls=1)) == (7, 9)
