"""``async def`` handlers in ``workers.calls`` (no worker process): how they are found, run
on an event loop in their call thread, cancelled at the time limit and when their run is
stopped, cancelled again when they swallow the cancel, and left like a hung sync handler
when they go on regardless. And a sync handler that returns an awaitable by mistake."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestration.agents import AgentSpec, Escalate, PermanentError, TaskView
from workers import calls
from workers.calls import CallOutcome, Kind

WAIT_S = 20.0  # a generous bound for what should take a fraction of a second


def _spec(handler: Any, time_limit_s: float = 60.0, name: str = "unit_async_agent") -> AgentSpec:
    return AgentSpec(
        name=name, handler=handler, task_types=("unit_work",), time_limit_s=time_limit_s
    )


def _view(stop: threading.Event | None = None) -> TaskView:
    return TaskView.build(61, 7, "unit_work", {"n": 1}, 1, stop=stop)


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


@pytest.fixture
def quick_recancel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A swallowed cancel is repeated after 0.1 s instead of a second."""
    monkeypatch.setattr(calls, "RECANCEL_AFTER_S", 0.1)


# -- which handlers are async ---------------------------------------------------------------


async def _double(task: TaskView) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"double": task.payload["n"] * 2}


class _AsyncCallable:
    async def __call__(self, task: TaskView) -> str:
        await asyncio.sleep(0)
        return "object"

    async def method(self, task: TaskView) -> str:
        return "method"


class _SyncCallable:
    def __call__(self, task: TaskView) -> str:
        return "sync object"


@pytest.mark.parametrize(
    ("handler", "is_async"),
    [
        (_double, True),
        (functools.partial(_double), True),
        (_AsyncCallable(), True),
        (_AsyncCallable().method, True),
        (functools.partial(_AsyncCallable()), True),
        (lambda task: "sync", False),
        (_SyncCallable(), False),
        (functools.partial(_SyncCallable()), False),
    ],
)
def test_an_agent_spec_records_whether_its_handler_is_async(handler: Any, is_async: bool) -> None:
    spec = _spec(handler)
    assert spec.is_async is is_async
    # and a copy with another handler works it out again
    assert dataclasses.replace(spec, handler=lambda task: None).is_async is False
    assert dataclasses.replace(spec, handler=_double).is_async is True


@pytest.mark.parametrize(
    ("handler", "result"),
    [
        (_double, {"double": 2}),
        (functools.partial(_double), {"double": 2}),
        (_AsyncCallable(), "object"),
        (_AsyncCallable().method, "method"),
    ],
)
def test_an_async_handler_gives_its_result(handler: Any, result: Any) -> None:
    assert calls.call(_spec(handler), _view()) == CallOutcome(Kind.RESULT, result=result)


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (Escalate("up"), Kind.ESCALATE),
        (PermanentError("no"), Kind.PERMANENT),
        (ConnectionError("down"), Kind.ERROR),
        (TimeoutError("the service's own timeout"), Kind.ERROR),
        (asyncio.CancelledError(), Kind.ERROR),  # its own doing: no one cancelled it
    ],
)
def test_what_an_async_handler_raises_is_its_outcome(raised: BaseException, kind: Kind) -> None:
    async def handler(task: TaskView) -> None:
        await asyncio.sleep(0)
        raise raised

    with capture_logs() as log:
        outcome = calls.call(_spec(handler), _view())
    assert outcome.kind is kind
    assert _discards(log) == []


def test_an_async_handler_sees_the_callers_context_on_a_thread_of_its_own() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("unit_async_var", default="unset")
    hop_thread = threading.get_ident()

    async def handler(task: TaskView) -> dict[str, Any]:
        return {"var": var.get(), "other_thread": threading.get_ident() != hop_thread}

    token = var.set("hop context")
    try:
        outcome = calls.call(_spec(handler), _view())
    finally:
        var.reset(token)
    assert outcome.result == {"var": "hop context", "other_thread": True}


# -- the time limit ---------------------------------------------------------------------------


def test_at_its_time_limit_an_async_handler_is_cancelled() -> None:
    # Given an async handler that would await for a minute, with a 0.3 s limit
    saw_cancel = threading.Event()

    async def handler(task: TaskView) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise
        return "late"

    with capture_logs() as log:
        outcome = calls.call(_spec(handler, time_limit_s=0.3), _view())
        # Then the attempt ends at the limit as a sync handler's would
        assert outcome == CallOutcome(Kind.TIMEOUT, reason="time limit of 0.3 s exceeded")
        # and the coroutine itself was cancelled, not only abandoned
        assert saw_cancel.wait(WAIT_S)
        _wait_for(lambda: _discards(log), "the cancelled run was not logged")
    assert _discards(log) == [(61, "cancelled", "time limit")]


def test_a_handler_that_swallows_the_cancel_once_is_cancelled_again(quick_recancel: None) -> None:
    # Given a handler that swallows the first cancel (as asyncio.wait_for can on 3.11)
    cancels: list[float] = []
    ended = threading.Event()

    async def handler(task: TaskView) -> str:
        try:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancels.append(time.monotonic())
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancels.append(time.monotonic())
            raise
        finally:
            ended.set()
        return "late"

    with capture_logs() as log:
        outcome = calls.call(_spec(handler, time_limit_s=0.3), _view())
        assert outcome.kind is Kind.TIMEOUT
        # Then it is cancelled a second time, and ends
        assert ended.wait(WAIT_S)
        _wait_for(lambda: _discards(log), "the cancelled run was not logged")
    assert len(cancels) == 2
    assert _discards(log) == [(61, "cancelled", "time limit")]


def test_a_handler_that_ignores_every_cancel_is_left_like_a_hung_sync_handler(
    quick_recancel: None,
) -> None:
    # Given a handler that swallows every cancel and goes on until it is released
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
        # Then the hop stops waiting at the limit
        outcome = calls.call(_spec(handler, time_limit_s=0.3), _view())
        assert outcome == CallOutcome(Kind.TIMEOUT, reason="time limit of 0.3 s exceeded")
        # and the next call is not held up by it
        assert calls.call(_spec(_double), _view()) == CallOutcome(Kind.RESULT, result={"double": 2})
        # and the handler was cancelled once and again RECANCEL_TIMES more times, then left
        _wait_for(
            lambda: any(e["event"] == "handler_ignores_cancel" for e in log),
            "the ignored cancel was not logged",
        )
        _wait_for(lambda: len(cancels) == 1 + calls.RECANCEL_TIMES, "not cancelled again")
        # When it finally returns, its result is discarded
        release.set()
        _wait_for(lambda: _discards(log), "the late result was not logged")
    assert _discards(log) == [(61, "returned", "time limit")]
    assert len(cancels) == 1 + calls.RECANCEL_TIMES  # and no more after the last
    [ignored] = [e for e in log if e["event"] == "handler_ignores_cancel"]
    assert (ignored["task_id"], ignored["reason"]) == (61, "time limit")


# -- a stopped run (the task was cancelled) ---------------------------------------------------


def test_a_stopped_run_cancels_the_coroutine_and_its_result_is_discarded() -> None:
    # Given an async handler awaiting a long call
    stop = threading.Event()
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

    # When the run is stopped once it runs (the lease keeper found the task cancelled)
    result, log = _stopped_run(handler, stop, started)
    # Then the hop's outcome is cancelled, and the coroutine got CancelledError with the
    # view saying so
    assert result == [CallOutcome(Kind.CANCELLED, reason="cancelled")]
    assert flag_seen == [True]
    # and one line says the run was discarded
    assert _discards(log) == [(61, "cancelled", "cancelled")]


def _stopped_run(
    handler: Any, stop: threading.Event, started: threading.Event
) -> tuple[list[CallOutcome], list[dict[str, Any]]]:
    """``handler`` called on a hop thread, ``stop`` set once it has started; the hop's
    outcome and the log, once the discarded run was logged."""
    result: list[CallOutcome] = []
    with capture_logs() as log:
        hop = threading.Thread(
            target=lambda: result.append(calls.call(_spec(handler), _view(stop)))
        )
        hop.start()
        assert started.wait(WAIT_S)
        stop.set()
        hop.join(WAIT_S)
        _wait_for(lambda: _discards(log), "the stopped run was not logged")
    return result, log


def test_a_stopped_run_whose_handler_swallows_the_cancel_and_returns_is_discarded() -> None:
    stop = threading.Event()
    started = threading.Event()

    async def handler(task: TaskView) -> str:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed
            await asyncio.sleep(60)
        return "returned anyway"

    result, log = _stopped_run(handler, stop, started)
    assert result == [CallOutcome(Kind.CANCELLED, reason="cancelled")]
    assert _discards(log) == [(61, "returned", "cancelled")]


def test_an_async_handler_that_returned_before_the_stop_keeps_its_result() -> None:
    stop = threading.Event()

    async def handler(task: TaskView) -> str:
        stop.set()  # the hop decides with the flag; the call reports what the handler did
        return "done"

    assert calls.call(_spec(handler), _view(stop)) == CallOutcome(Kind.RESULT, result="done")


# -- a sync handler returning an awaitable -------------------------------------------------


def test_a_sync_handler_returning_a_coroutine_fails_with_the_reason() -> None:
    ran: list[bool] = []
    returned: list[Coroutine[Any, Any, str]] = []

    async def work(task: TaskView) -> str:
        ran.append(True)
        return "never"

    def handler(task: TaskView) -> Any:
        returned.append(work(task))  # forgot to await, or to make the handler async
        return returned[-1]

    outcome = calls.call(_spec(handler, name="forgetful_agent"), _view())
    assert outcome == CallOutcome(
        Kind.PERMANENT,
        reason=(
            "the handler of agent 'forgetful_agent' returned coroutine (an awaitable), not a "
            "result: make it an async def, or await it inside"
        ),
    )
    # and the coroutine never ran, and was closed (no "never awaited" warning later)
    assert ran == []
    assert returned[0].cr_frame is None


def test_a_sync_handler_returning_a_future_fails_with_the_reason() -> None:
    loop = asyncio.new_event_loop()
    try:
        outcome = calls.call(_spec(lambda task: loop.create_future()), _view())
    finally:
        loop.close()
    assert outcome.kind is Kind.PERMANENT
    assert "returned Future (an awaitable)" in outcome.reason


# -- isolated (a child process, ~0.5 s each) -----------------------------------------------

_CHILD_AGENTS = """
import asyncio

from orchestration.agents import Escalate, agent


@agent("unit_async_child_ok", task_types=["unit_child"])
async def ok(task):
    await asyncio.sleep(0.01)
    return {"n": task.payload["n"], "loop": asyncio.get_running_loop() is not None}


@agent("unit_async_child_escalates", task_types=["unit_child"])
async def escalates(task):
    await asyncio.sleep(0)
    raise Escalate("missing W-2")


@agent("unit_async_child_hangs", task_types=["unit_child"])
async def hangs(task):
    await asyncio.sleep(60)


async def _work(task):
    return "never"


@agent("unit_async_child_forgetful", task_types=["unit_child"])
def forgetful(task):
    return _work(task)
"""


@pytest.fixture
def child_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, ...]]:
    (tmp_path / "unit_async_child_agents.py").write_text(textwrap.dedent(_CHILD_AGENTS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(Path(calls.__file__).resolve().parents[1]))
    yield ("unit_async_child_agents",)


@pytest.mark.parametrize(
    ("agent", "outcome"),
    [
        ("unit_async_child_ok", CallOutcome(Kind.RESULT, result={"n": 1, "loop": True})),
        ("unit_async_child_escalates", CallOutcome(Kind.ESCALATE, reason="missing W-2")),
    ],
)
def test_an_isolated_async_handler_runs_in_its_child(
    child_agents: tuple[str, ...], agent: str, outcome: CallOutcome
) -> None:
    assert calls.call_isolated(_spec(None, name=agent), _view(), child_agents) == outcome


def test_an_isolated_sync_handler_returning_a_coroutine_fails_with_the_reason(
    child_agents: tuple[str, ...],
) -> None:
    outcome = calls.call_isolated(
        _spec(None, name="unit_async_child_forgetful"), _view(), child_agents
    )
    assert outcome.kind is Kind.PERMANENT
    assert "returned coroutine (an awaitable)" in outcome.reason


def test_an_isolated_async_handler_past_its_limit_is_killed(
    child_agents: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calls, "ISOLATED_START_GRACE_S", 2.0)
    outcome = calls.call_isolated(
        _spec(None, time_limit_s=0.2, name="unit_async_child_hangs"), _view(), child_agents
    )
    assert outcome == CallOutcome(Kind.TIMEOUT, reason="time limit of 0.2 s exceeded")
