"""The async executor (``workers.aio.AsyncCalls``) driven directly, without a worker: each
outcome a handler can come to, the time limit and the stop as the loop enforces them, the
slots (backpressure), the drain of a warm stop, the context a call runs in, and that a run
is concluded exactly once whatever races with it. ``conclude`` is a recorder here."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from orchestration.agents import AgentSpec, Escalate, PermanentError, TaskView
from workers import aio
from workers.aio import AsyncCalls, RunStop
from workers.calls import CallOutcome, Kind

WAIT_S = 20.0  # a generous bound for what should take a fraction of a second
TASK_ID = 61


def _spec(handler: Any, time_limit_s: float = 60.0, name: str = "unit_aio_agent") -> AgentSpec:
    return AgentSpec(
        name=name, handler=handler, task_types=("unit_work",), time_limit_s=time_limit_s
    )


def _view(stop: RunStop, task_id: int = TASK_ID) -> TaskView:
    return TaskView.build(task_id, 7, "unit_work", {"n": 1}, 1, stop=stop)


def _wait_for(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _discards(log: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (e["task_id"], e["handler"], e["reason"])
        for e in log
        if e["event"] == "late_result_discarded"
    ]


@dataclass
class Written:
    """One call of ``conclude``."""

    outcome: CallOutcome
    stopped: bool
    bound: dict[str, Any]  # structlog's context variables as conclude saw them
    thread: str


@dataclass
class Recorder:
    """``conclude`` for each run, recording every call per task id; ``gate`` (when set)
    holds each write until it is opened."""

    written: dict[int, list[Written]] = field(default_factory=dict)
    gate: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def conclude(self, task_id: int) -> aio.Conclude:
        def write(outcome: CallOutcome, stopped: bool) -> None:
            if self.gate is not None:
                assert self.gate.wait(WAIT_S)
            entry = Written(
                outcome,
                stopped,
                dict(structlog.contextvars.get_contextvars()),
                threading.current_thread().name,
            )
            with self.lock:
                self.written.setdefault(task_id, []).append(entry)

        return write

    def count(self) -> int:
        with self.lock:
            return sum(len(w) for w in self.written.values())

    def one(self, task_id: int = TASK_ID) -> Written:
        _wait_for(lambda: task_id in self.written, f"run {task_id} was never concluded")
        with self.lock:
            [entry] = self.written[task_id]
        return entry


@pytest.fixture
def executor() -> Iterator[AsyncCalls]:
    calls = AsyncCalls(50)
    yield calls
    if not calls.closing:
        calls.drain(0.0)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def quick_recancel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A swallowed cancel is repeated after 0.1 s instead of a second."""
    monkeypatch.setattr(aio, "RECANCEL_AFTER_S", 0.1)


def _start(
    calls: AsyncCalls,
    recorder: Recorder,
    handler: Any,
    *,
    task_id: int = TASK_ID,
    time_limit_s: float = 60.0,
    stop: RunStop | None = None,
) -> RunStop:
    stop = stop if stop is not None else calls.new_stop()
    started = calls.start(
        _spec(handler, time_limit_s), _view(stop, task_id), stop, recorder.conclude(task_id)
    )
    assert started
    return stop


async def _double(task: TaskView) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"double": task.payload["n"] * 2}


# -- outcomes ------------------------------------------------------------------------------


def test_a_result_is_concluded_on_an_outcome_thread(
    executor: AsyncCalls, recorder: Recorder
) -> None:
    _start(executor, recorder, _double)
    written = recorder.one()
    assert (written.outcome, written.stopped) == (
        CallOutcome(Kind.RESULT, result={"double": 2}),
        False,
    )
    assert written.thread.startswith("taskrail-outcome")
    # and its slot is free again once written
    _wait_for(lambda: executor.in_flight == 0, "the run was not let go")


@pytest.mark.parametrize(
    ("raised", "outcome"),
    [
        (Escalate("missing W-2"), (Kind.ESCALATE, "missing W-2")),
        (PermanentError("invalid account"), (Kind.PERMANENT, "invalid account")),
        (ConnectionError("down"), (Kind.ERROR, "ConnectionError: down")),
        (TimeoutError("its own"), (Kind.ERROR, "TimeoutError: its own")),
        (
            asyncio.CancelledError(),
            (Kind.ERROR, "CancelledError: the handler was cancelled by its own code"),
        ),
    ],
)
def test_what_a_handler_raises_is_its_outcome(
    executor: AsyncCalls, recorder: Recorder, raised: BaseException, outcome: tuple[Kind, str]
) -> None:
    async def handler(task: TaskView) -> None:
        await asyncio.sleep(0)
        raise raised

    with capture_logs() as log:
        _start(executor, recorder, handler)
        written = recorder.one()
    assert (written.outcome.kind, written.outcome.reason) == outcome
    assert not written.stopped
    assert _discards(log) == []


def test_a_handler_raised_before_its_first_await_is_its_outcome_too(
    executor: AsyncCalls, recorder: Recorder
) -> None:
    def handler(task: TaskView) -> Any:  # not even a coroutine: it raises when called
        raise PermanentError("bad input")

    _start(executor, recorder, handler)
    assert recorder.one().outcome.kind is Kind.PERMANENT


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()])
@pytest.mark.parametrize("where", ["handler", "its own task"])
def test_a_handler_raising_system_exit_fails_and_the_loop_goes_on(
    executor: AsyncCalls, recorder: Recorder, raised: BaseException, where: str
) -> None:
    # Given a handler that raises SystemExit or KeyboardInterrupt, itself or in a task it
    # awaits (asyncio re-raises those out of the loop's run_forever)
    async def inner() -> None:
        await asyncio.sleep(0)
        raise raised

    async def handler(task: TaskView) -> None:
        if where == "handler":
            await inner()
        else:
            await asyncio.gather(asyncio.ensure_future(inner()))

    # and a call in flight beside it
    release = threading.Event()

    async def bystander(task: TaskView) -> str:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "still served"

    _start(executor, recorder, bystander, task_id=1)
    # When it runs
    _start(executor, recorder, handler)
    # Then it is that call's failure, a transient error
    written = recorder.one()
    assert written.outcome.kind is Kind.ERROR
    assert written.outcome.reason.startswith(type(raised).__name__)
    # and the loop goes on: the bystander ends, and a new call runs
    release.set()
    assert recorder.one(1).outcome == CallOutcome(Kind.RESULT, result="still served")
    _start(executor, recorder, _double, task_id=2)
    assert recorder.one(2).outcome.kind is Kind.RESULT


def test_a_handler_returning_an_awaitable_fails_permanently(
    executor: AsyncCalls, recorder: Recorder
) -> None:
    ran: list[bool] = []
    returned: list[Any] = []

    async def work() -> str:
        ran.append(True)
        return "never"

    async def handler(task: TaskView) -> Any:
        returned.append(work())  # forgot to await it
        return returned[-1]

    _start(executor, recorder, handler)
    outcome = recorder.one().outcome
    assert outcome.kind is Kind.PERMANENT
    assert "returned coroutine (an awaitable), not a result" in outcome.reason
    assert ran == []
    assert returned[0].cr_frame is None  # closed: no "never awaited" warning later


def test_a_conclude_that_raises_still_frees_the_slot(executor: AsyncCalls) -> None:
    def broken(outcome: CallOutcome, stopped: bool) -> None:
        raise RuntimeError("database gone")

    stop = executor.new_stop()
    with capture_logs() as log:
        assert executor.start(_spec(_double), _view(stop), stop, broken)
        _wait_for(lambda: executor.in_flight == 0, "the run was not let go")
    [line] = [e for e in log if e["event"] == "outcome_not_written"]
    assert (line["task_id"], line["error"]) == (TASK_ID, "database gone")


# -- the time limit --------------------------------------------------------------------------


def test_at_its_time_limit_the_outcome_is_a_timeout_and_the_coroutine_is_cancelled(
    executor: AsyncCalls, recorder: Recorder
) -> None:
    # Given a handler awaiting for a minute, with a 0.3 s limit
    saw_cancel = threading.Event()

    async def handler(task: TaskView) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise
        return "late"

    with capture_logs() as log:
        _start(executor, recorder, handler, time_limit_s=0.3)
        # Then the run is concluded as timed out
        written = recorder.one()
        assert written.outcome == CallOutcome(Kind.TIMEOUT, reason="time limit of 0.3 s exceeded")
        assert not written.stopped
        # and its coroutine got CancelledError at its await, logged as discarded
        assert saw_cancel.wait(WAIT_S)
        _wait_for(lambda: _discards(log), "the cancelled run was not logged")
    assert _discards(log) == [(TASK_ID, "cancelled", "time limit")]


def test_the_timeout_is_written_before_a_swallowing_coroutine_ends(
    executor: AsyncCalls, recorder: Recorder, quick_recancel: None
) -> None:
    # Given a handler that swallows every cancel and goes on until released
    release = threading.Event()
    cancels: list[int] = []

    async def handler(task: TaskView) -> str:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancels.append(1)
        return "late"

    with capture_logs() as log:
        _start(executor, recorder, handler, time_limit_s=0.3)
        # Then the timeout is concluded while the coroutine still runs
        assert recorder.one().outcome.kind is Kind.TIMEOUT
        assert not release.is_set()
        # and it is cancelled again RECANCEL_TIMES more times, then left (logged)
        _wait_for(
            lambda: any(e["event"] == "handler_ignores_cancel" for e in log),
            "the ignored cancel was not logged",
        )
        _wait_for(lambda: len(cancels) == 1 + aio.RECANCEL_TIMES, "not cancelled again")
        # and the slot is free: the lease is let go with the outcome
        _wait_for(lambda: executor.in_flight == 0, "the run kept its slot")
        # When it finally returns, its result is discarded, nothing more written
        release.set()
        _wait_for(lambda: _discards(log), "the late result was not logged")
    assert _discards(log) == [(TASK_ID, "returned", "time limit")]
    assert len(cancels) == 1 + aio.RECANCEL_TIMES
    assert recorder.count() == 1
    [ignored] = [e for e in log if e["event"] == "handler_ignores_cancel"]
    assert (ignored["task_id"], ignored["reason"]) == (TASK_ID, "time limit")


def test_a_coroutine_swallowing_the_first_cancel_is_cancelled_again(
    executor: AsyncCalls, recorder: Recorder, quick_recancel: None
) -> None:
    cancels: list[str] = []
    ended = threading.Event()

    async def handler(task: TaskView) -> str:
        try:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancels.append("swallowed")
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancels.append("raised")
            raise
        finally:
            ended.set()
        return "late"

    with capture_logs() as log:
        _start(executor, recorder, handler, time_limit_s=0.3)
        assert recorder.one().outcome.kind is Kind.TIMEOUT
        assert ended.wait(WAIT_S)
        _wait_for(lambda: _discards(log), "the cancelled run was not logged")
    assert cancels == ["swallowed", "raised"]
    assert _discards(log) == [(TASK_ID, "cancelled", "time limit")]
    assert not any(e["event"] == "handler_ignores_cancel" for e in log)


# -- a stopped run (the task was cancelled) ---------------------------------------------------


def test_a_run_stopped_before_it_starts_never_calls_the_handler(
    executor: AsyncCalls, recorder: Recorder
) -> None:
    called: list[bool] = []

    async def handler(task: TaskView) -> str:
        called.append(True)
        return "no"

    stop = executor.new_stop()
    stop.set()
    _start(executor, recorder, handler, stop=stop)
    written = recorder.one()
    assert (written.outcome, written.stopped) == (
        CallOutcome(Kind.CANCELLED, reason="cancelled"),
        True,
    )
    assert called == []


def test_a_run_stopped_while_it_awaits_is_cancelled_at_once(
    executor: AsyncCalls, recorder: Recorder
) -> None:
    # Given a handler awaiting a long call
    started = threading.Event()
    flag_seen: list[bool] = []

    async def handler(task: TaskView) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            flag_seen.append(task.cancelled)
            raise
        return "late"

    with capture_logs() as log:
        stop = _start(executor, recorder, handler)
        assert started.wait(WAIT_S)
        # When the lease keeper sets the run's stop (from its own thread)
        threading.Thread(target=stop.set).start()
        # Then the run is concluded as cancelled, and its coroutine saw CancelledError
        # with the view saying so
        written = recorder.one()
        assert (written.outcome, written.stopped) == (
            CallOutcome(Kind.CANCELLED, reason="cancelled"),
            True,
        )
        _wait_for(lambda: _discards(log), "the cancelled run was not logged")
    assert flag_seen == [True]
    assert _discards(log) == [(TASK_ID, "cancelled", "cancelled")]


def test_a_stop_after_the_outcome_changes_nothing(executor: AsyncCalls, recorder: Recorder) -> None:
    stop = _start(executor, recorder, _double)
    assert recorder.one().outcome.kind is Kind.RESULT
    _wait_for(lambda: executor.in_flight == 0, "the run was not let go")
    stop.set()
    _start(executor, recorder, _double, task_id=2)  # the loop's next turn has come
    recorder.one(2)
    assert recorder.count() == 2


# -- slots (backpressure) ---------------------------------------------------------------------


def test_a_start_waits_for_a_slot_until_an_outcome_is_written(recorder: Recorder) -> None:
    # Given an executor of two slots, both taken by calls that wait to be released,
    # and outcome writes held at a gate
    calls = AsyncCalls(2)
    releases = {n: threading.Event() for n in (1, 2, 3)}
    running: list[int] = []
    most = [0]

    def handler_for(n: int) -> Any:
        async def handler(task: TaskView) -> int:
            running.append(n)
            most[0] = max(most[0], len(running))
            while not releases[n].is_set():
                await asyncio.sleep(0.01)
            running.remove(n)
            return n

        return handler

    recorder.gate = threading.Event()
    try:
        _start(calls, recorder, handler_for(1), task_id=1)
        _start(calls, recorder, handler_for(2), task_id=2)
        _wait_for(lambda: len(running) == 2, "the two calls did not start")
        # When a third is started (a hop's thread)
        third = threading.Thread(
            target=_start, args=(calls, recorder, handler_for(3)), kwargs={"task_id": 3}
        )
        third.start()
        # and the first call ends, but its outcome is not written yet
        releases[1].set()
        _wait_for(lambda: running == [2], "the first call did not end")
        # Then the third start still waits: a slot is freed by the write, not the end
        assert third.is_alive()
        assert 3 not in running
        assert calls.in_flight == 2
        # When the write goes through
        recorder.gate.set()
        # Then the third call starts
        third.join(WAIT_S)
        assert not third.is_alive()
        _wait_for(lambda: 3 in running, "the third call did not start")
        releases[2].set()
        releases[3].set()
        for n in (1, 2, 3):
            assert recorder.one(n).outcome == CallOutcome(Kind.RESULT, result=n)
        # and never were more than two calls in flight
        assert most[0] == 2
    finally:
        for release in releases.values():
            release.set()
        recorder.gate.set()
        calls.drain(0.0)


# -- drain (a warm stop) ----------------------------------------------------------------------


def test_a_drain_concludes_the_calls_that_end_and_gives_up_on_the_rest(
    recorder: Recorder,
) -> None:
    # Given a call that ends when released and one that would await for an hour
    calls = AsyncCalls(10)
    release = threading.Event()
    saw_cancel = threading.Event()

    async def ends(task: TaskView) -> str:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "finished in time"

    async def hangs(task: TaskView) -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise
        return "never"

    _start(calls, recorder, ends, task_id=1)
    _start(calls, recorder, hangs, task_id=2)
    _wait_for(lambda: calls.in_flight == 2, "not both in flight")
    # When the executor drains with a grace period, and the first call ends within it
    given_up: list[int] = []
    with capture_logs() as log:
        drainer = threading.Thread(target=lambda: given_up.append(calls.drain(3.0)))
        drainer.start()
        _wait_for(lambda: calls.closing, "the drain did not begin")
        release.set()
        drainer.join(WAIT_S)
        assert not drainer.is_alive()
    # Then the call that ended is concluded normally
    assert recorder.one(1).outcome == CallOutcome(Kind.RESULT, result="finished in time")
    # and the other one with the reason "shutdown", its coroutine cancelled
    written = recorder.one(2)
    assert (written.outcome, written.stopped) == (
        CallOutcome(Kind.CANCELLED, reason=aio.SHUTDOWN),
        False,
    )
    assert saw_cancel.is_set()
    assert given_up == [1]
    # and no line calls the shutdown's cancel a discarded result
    assert _discards(log) == []
    # and nothing starts after it
    stop = calls.new_stop()
    assert calls.start(_spec(_double), _view(stop, 3), stop, recorder.conclude(3)) is False
    assert recorder.count() == 2


def test_a_start_waiting_for_a_slot_when_the_drain_begins_starts_nothing(
    recorder: Recorder,
) -> None:
    # Given an executor of one slot, taken by a call that awaits for an hour
    calls = AsyncCalls(1)

    async def hangs(task: TaskView) -> None:
        await asyncio.sleep(3600)

    called: list[bool] = []

    async def handler(task: TaskView) -> None:
        called.append(True)

    _start(calls, recorder, hangs, task_id=1)
    # and a hop waiting for a slot
    answer: list[bool] = []

    def waiting_hop() -> None:
        stop = calls.new_stop()
        answer.append(calls.start(_spec(handler), _view(stop, 2), stop, recorder.conclude(2)))

    hop = threading.Thread(target=waiting_hop)
    hop.start()
    # When the executor drains with no grace
    assert calls.drain(0.0) == 1
    hop.join(WAIT_S)
    # Then the waiting hop is told nothing started (it gives its attempt back)
    assert answer == [False]
    assert called == []
    assert recorder.one(1).outcome == CallOutcome(Kind.CANCELLED, reason=aio.SHUTDOWN)
    assert 2 not in recorder.written


# -- context ---------------------------------------------------------------------------------


def test_the_hops_context_is_seen_by_the_handler_and_by_conclude(
    executor: AsyncCalls, recorder: Recorder
) -> None:
    # Given two hops on one thread, each binding its own log context before the start
    seen: dict[int, dict[str, Any]] = {}

    async def handler(task: TaskView) -> None:
        await asyncio.sleep(0)
        seen[task.id] = dict(structlog.contextvars.get_contextvars())

    for task_id in (1, 2):
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(task_id=task_id, hop="execute", agent="a")
        _start(executor, recorder, handler, task_id=task_id)
    # and the thread moves on to another hop
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=99, hop="assign")
    try:
        # Then each handler and each outcome write sees its own hop's variables
        for task_id in (1, 2):
            want = {"task_id": task_id, "hop": "execute", "agent": "a"}
            assert recorder.one(task_id).bound == want
            assert seen[task_id] == want
    finally:
        structlog.contextvars.clear_contextvars()


# -- exactly one conclude, whatever races -----------------------------------------------------

BEHAVIOURS = ("returns", "escalates", "raises", "exits", "awaits_long", "swallows")


async def _behave(how: str, task: TaskView) -> Any:
    await asyncio.sleep(0.001 * (task.id % 7))
    if how == "returns":
        return task.id
    if how == "escalates":
        raise Escalate("up")
    if how == "raises":
        raise ConnectionError("down")
    if how == "exits":
        raise SystemExit(1)
    if how == "swallows":  # every cancel, for a while
        for _ in range(20):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)
        return "late"
    await asyncio.sleep(3600)  # awaits_long: ended by its limit, a stop or the drain
    return "never"


@dataclass(frozen=True)
class Plan:
    how: str
    time_limit_s: float
    stop_at: str  # "never", "before" the start, "after_start", "later" (after all starts)


plans = st.builds(
    Plan,
    how=st.sampled_from(BEHAVIOURS),
    time_limit_s=st.sampled_from([0.001, 0.02, 0.2]),
    stop_at=st.sampled_from(["never", "before", "after_start", "later"]),
)


# No target phase (nothing here calls target()): its lazy import of hypothesis's
# optimiser, compiled while the executor's threads run, can hit CPython 3.11's "AST
# constructor recursion depth mismatch" (python/cpython#106905).
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(
    runs=st.lists(plans, min_size=1, max_size=12),
    limit=st.integers(1, 4),
    drain_after=st.integers(0, 12) | st.none(),
    grace_s=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_every_started_run_is_concluded_exactly_once_whatever_races(
    runs: list[Plan], limit: int, drain_after: int | None, grace_s: float
) -> None:
    # Given an executor of a few slots, and hops (a thread each) starting runs that
    # return, raise, await until their limit or swallow cancels, stopped at various
    # moments, and a drain that may begin while they start
    calls = AsyncCalls(limit)
    recorder = Recorder()
    started: dict[int, bool] = {}
    later: list[RunStop] = []

    def hop(n: int, plan: Plan) -> None:
        stop = calls.new_stop()
        if plan.stop_at == "before":
            stop.set()

        async def handler(task: TaskView) -> Any:
            return await _behave(plan.how, task)

        spec = _spec(handler, plan.time_limit_s)
        started[n] = calls.start(spec, _view(stop, n), stop, recorder.conclude(n))
        if plan.stop_at == "after_start":
            stop.set()
        elif plan.stop_at == "later":
            later.append(stop)

    drainer = threading.Thread(target=calls.drain, args=(grace_s,))
    with capture_logs():
        hops = []
        for n, plan in enumerate(runs):
            if n == drain_after:
                drainer.start()
            hops.append(threading.Thread(target=hop, args=(n, plan)))
            hops[-1].start()
        for thread in hops:
            thread.join(WAIT_S)
            assert not thread.is_alive(), "a hop never got a slot"
        for stop in later:
            stop.set()
        # When every run has ended or been given up on, and the executor has drained
        if drainer.ident is None:  # not begun while the hops started
            drainer.start()
        drainer.join(WAIT_S)
        assert not drainer.is_alive(), "the drain never ended"
    # Then every run that started was concluded exactly once, the others never
    assert len(started) == len(runs)
    assert sorted(recorder.written) == sorted(n for n, ok in started.items() if ok)
    for n, plan in enumerate(runs):
        if started[n]:
            [written] = recorder.written[n]
            if plan.stop_at == "before":
                assert written.outcome == CallOutcome(Kind.CANCELLED, reason="cancelled")
    if drain_after is None or drain_after >= len(runs):
        assert all(started.values())
    # and every slot is free again, none released twice
    assert calls.in_flight == 0
    for _ in range(limit):
        assert calls._slots.acquire(blocking=False)
    assert not calls._slots.acquire(blocking=False)
