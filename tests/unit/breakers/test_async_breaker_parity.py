"""The coroutine path against pybreaker, against the sync path, and against a model.

test_breaker_pybreaker_parity.py holds a SharedBreaker's circuit to stock pybreaker
1.4.1 over its own memory storage; here the same steps go through the coroutine entry
points (``call_async``, the decorator on an ``async def``, ``acalling``) and must show
the same outcomes, states and listener calls. Then any sequence of outcomes, a
cancellation among them, through ``acall`` and through ``call`` must leave the same
trace; and calls overlapping on one event loop, finished in any order, must move the
breaker as a model of its rules says. Each on the session's redis-server and in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import pybreaker
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orchestration.breakers import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    BreakerBoard,
    BreakerOpen,
    Permit,
    SharedBreaker,
)
from tests.fake_clock import FakeClock
from tests.support import BREAKER_NAMESPACE
from tests.unit.breakers.aio_support import OutcomeRecorder, cancel_mid_call, run
from tests.unit.breakers.test_breaker_pybreaker_parity import (
    SHARED_STEPS,
    Business,
    DownstreamDown,
    Recorder,
    _elapse_shared,
    _fail,
    _gen_fail,
    _gen_ok,
    _ok,
    _run_stock,
    _steps,
    _without_self_changes,
)

RESET_S = 60.0
HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _name() -> str:
    return f"b-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["redis", "memory"])
def board(request: pytest.FixtureRequest, breaker_redis_url: str) -> Iterator[BreakerBoard]:
    url = breaker_redis_url if request.param == "redis" else None
    made = BreakerBoard(url, namespace=BREAKER_NAMESPACE, cache_ttl_s=0.0, clock=FakeClock())
    yield made
    made.close()


# -- the circuit's coroutine entry points against stock pybreaker ----------------------


async def _aok(x: int = 1) -> int:
    await asyncio.sleep(0)
    return x * 2


async def _afail(x: int = 1) -> int:
    await asyncio.sleep(0)
    raise DownstreamDown(f"down {x}")


async def _abusiness() -> None:
    raise Business("no such customer")


async def _awith(cb: Any, body: Callable[[], Any]) -> Any:
    async with cb.acalling():
        await asyncio.sleep(0)
        return body()


async def _now(value: Any) -> Any:
    return value


async def _alist(pending: Coroutine[Any, Any, Any]) -> list[Any]:
    return list(await pending)


# The async twin of each of the parity module's steps (the same arguments and errors).
ASYNC_STEPS: dict[str, Callable[[Any], Coroutine[Any, Any, Any]]] = {
    "ok": lambda cb: cb.call_async(_aok, 21),
    "fail": lambda cb: cb.call_async(_afail, 7),
    "business": lambda cb: cb.call_async(_abusiness),
    "decorated": lambda cb: cb(_aok)(x=4),
    "gen_ok": lambda cb: _alist(cb.call_async(_gen_ok)),
    "gen_fail": lambda cb: _alist(cb.call_async(_gen_fail)),
    "with_ok": lambda cb: _awith(cb, lambda: "fine"),
    "with_fail": lambda cb: _awith(cb, _fail),
    "open": lambda cb: _now(cb.open()),
    "close": lambda cb: _now(cb.close()),
}
assert set(ASYNC_STEPS) == set(SHARED_STEPS)


async def _aoutcome(step: Callable[[Any], Coroutine[Any, Any, Any]], cb: Any) -> tuple[str, str]:
    try:
        return ("returned", repr(await step(cb)))
    except pybreaker.CircuitBreakerError:
        return ("raised", "CircuitBreakerError")
    except Exception as exc:
        return ("raised", f"{type(exc).__name__}: {exc}")


def _assert_async_circuit_matches_stock(
    board: BreakerBoard, steps: list[str], fail_max: int
) -> None:
    reference = _run_stock(
        pybreaker.CircuitMemoryStorage(STATE_CLOSED),
        steps,
        fail_max=fail_max,
        reset_timeout=RESET_S,
    )
    shared = board.breaker(_name(), fail_max=fail_max, reset_timeout_s=RESET_S, exclude=(Business,))
    recorder = Recorder()
    shared.circuit.add_listener(recorder)

    async def body() -> None:
        for step, want_outcome, want_seen, want_events in reference:
            if step == "elapse":
                _elapse_shared(board, shared)
            else:
                assert await _aoutcome(ASYNC_STEPS[step], shared.circuit) == want_outcome, step
            assert await shared.astate() == want_seen[0], step
            if want_seen[0] == STATE_CLOSED:  # pybreaker also counts a failed trial
                assert shared.fail_count == want_seen[1], step
            assert recorder.take() == _without_self_changes(want_events), step

    run(board, body)


@pytest.mark.integration
def test_async_circuit_calls_listeners_like_pybreaker(board: BreakerBoard) -> None:
    steps = _steps(
        "ok business fail decorated fail with_ok fail fail ok"
        " elapse with_fail elapse gen_ok gen_fail close open close"
    )
    _assert_async_circuit_matches_stock(board, steps, fail_max=2)


@pytest.mark.integration
@HYPOTHESIS
@given(
    steps=st.lists(st.sampled_from([*SHARED_STEPS, "elapse", "elapse"]), max_size=25),
    fail_max=st.integers(1, 3),
)
def test_any_sequence_through_the_async_circuit_matches_pybreaker(
    board: BreakerBoard, steps: list[str], fail_max: int
) -> None:
    _assert_async_circuit_matches_stock(board, steps, fail_max)


# -- acall against call, cancellation included -----------------------------------------


def _raise_cancelled() -> None:
    # What a sync caller going away looks like to the breaker: not an Exception.
    raise asyncio.CancelledError


def _sync_step(breaker: SharedBreaker, step: str) -> Any:
    if step == "ok":
        return breaker.call(_ok, 21)
    if step == "fail":
        return breaker.call(_fail, 7)
    if step == "business":
        return breaker.call(_business_sync)
    if step == "cancel":
        return breaker.call(_raise_cancelled)
    if step == "abandon":
        breaker.abandon(breaker.before_call())
        return None
    with breaker.calling():  # "with_fail"
        return _fail()


def _business_sync() -> None:
    raise Business("no such customer")


async def _async_step(breaker: SharedBreaker, step: str) -> Any:
    if step == "ok":
        return await breaker.acall(_aok, 21)
    if step == "fail":
        return await breaker.acall(_afail, 7)
    if step == "business":
        return await breaker.acall(_abusiness)
    if step == "cancel":
        await cancel_mid_call(breaker.acall)
        raise asyncio.CancelledError
    if step == "abandon":
        await breaker.aabandon(await breaker.abefore_call())
        return None
    async with breaker.acalling():
        return _fail()


def _seen(outcome: Callable[[], Any]) -> tuple[str, str]:
    try:
        return ("returned", repr(outcome()))
    except (Exception, asyncio.CancelledError) as exc:
        return _failed(exc)


async def _aseen(outcome: Coroutine[Any, Any, Any]) -> tuple[str, str]:
    try:
        return ("returned", repr(await outcome))
    except (Exception, asyncio.CancelledError) as exc:
        return _failed(exc)


def _failed(exc: BaseException) -> tuple[str, str]:
    """How a call that raised ``exc`` is seen: refused, cancelled or raised."""
    if isinstance(exc, BreakerOpen):
        return ("refused", exc.state)
    if isinstance(exc, asyncio.CancelledError):
        return ("cancelled", "")
    return ("raised", f"{type(exc).__name__}: {exc}")


SPLIT_STEPS = ["ok", "fail", "business", "cancel", "abandon", "with_fail"]


@pytest.mark.integration
@HYPOTHESIS
@given(
    steps=st.lists(st.sampled_from([*SPLIT_STEPS, "fail", "elapse"]), max_size=25),
    fail_max=st.integers(1, 3),
)
def test_any_sequence_through_acall_matches_call(
    board: BreakerBoard, steps: list[str], fail_max: int
) -> None:
    # Given a breaker driven through call() and one driven through acall()
    def made() -> tuple[SharedBreaker, OutcomeRecorder]:
        breaker = board.breaker(
            _name(), fail_max=fail_max, reset_timeout_s=RESET_S, exclude=(Business,)
        )
        recorder = OutcomeRecorder()
        breaker.circuit.add_listener(recorder)
        return breaker, recorder

    (sync, sync_heard), (aio, aio_heard) = made(), made()
    # When each goes through the same outcomes (a sync caller going away raises
    # CancelledError itself; the async call is cancelled mid-call)
    want = []
    for step in steps:
        if step == "elapse":
            _elapse_shared(board, sync)
            want.append((step, ("elapsed", ""), sync.state, sync.fail_count, []))
        else:
            outcome = _seen(lambda step=step: _sync_step(sync, step))
            want.append((step, outcome, sync.state, sync.fail_count, sync_heard.take()))

    async def body() -> list[Any]:
        got = []
        for step in steps:
            if step == "elapse":
                _elapse_shared(board, aio)
                outcome = ("elapsed", "")
            else:
                outcome = await _aseen(_async_step(aio, step))
            got.append((step, outcome, await aio.astate(), aio.fail_count, aio_heard.take()))
        return got

    # Then every step shows the same outcome, state, count and listener calls
    assert run(board, body) == want


# -- overlapping calls against a model --------------------------------------------------


@dataclass
class Model:
    """The breaker's rules for one process's calls (lua.py, as the design states them)."""

    fail_max: int
    state: str = STATE_CLOSED
    fails: int = 0
    epoch: int = 0
    due: bool = False  # open, and the reset timeout has passed
    lease: int | None = None  # the call holding the half-open trial
    permits: dict[int, tuple[bool, int]] = field(default_factory=dict)  # call: trial, epoch

    def admit(self, call: int) -> bool:
        if self.state == STATE_CLOSED:
            self.permits[call] = (False, self.epoch)
            return True
        if (self.state == STATE_OPEN and not self.due) or self.lease is not None:
            return False
        self.state, self.lease = STATE_HALF_OPEN, call
        self.permits[call] = (True, self.epoch)
        return True

    def settle(self, call: int, outcome: str) -> None:
        trial, epoch = self.permits.pop(call)
        if outcome == "cancel":
            if trial and self.lease == call:
                self.lease = None
            return
        ok = outcome in ("ok", "business")
        if trial:
            if self.state == STATE_HALF_OPEN and self.lease in (None, call):
                self.lease = None
                if ok:
                    self.state, self.fails, self.epoch = STATE_CLOSED, 0, self.epoch + 1
                else:
                    self._open()
        elif self.state == STATE_CLOSED and epoch == self.epoch:
            self.fails = 0 if ok else self.fails + 1
            if self.fails >= self.fail_max:
                self._open()

    def _open(self) -> None:
        self.state, self.due, self.lease = STATE_OPEN, False, None

    def elapse(self) -> None:
        self.due = True


@dataclass
class InFlight:
    """A call running in its own task, its handler waiting for the test's verdict."""

    task: asyncio.Task[Any]
    verdict: asyncio.Future[str]


async def _start(breaker: SharedBreaker) -> InFlight | None:
    """A call through ``acall`` whose handler waits; ``None`` when it was refused."""
    loop = asyncio.get_running_loop()
    verdict: asyncio.Future[str] = loop.create_future()
    running = asyncio.Event()

    async def handler() -> str:
        running.set()
        outcome = await verdict
        if outcome == "fail":
            raise DownstreamDown("down")
        if outcome == "business":
            raise Business("no such customer")
        return outcome

    task = asyncio.ensure_future(breaker.acall(handler))
    started = asyncio.ensure_future(running.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if not running.is_set():
        with pytest.raises(BreakerOpen):
            task.result()
        return None
    return InFlight(task, verdict)


async def _finish(call: InFlight, outcome: str) -> None:
    if outcome == "cancel":
        call.task.cancel()
    else:
        call.verdict.set_result(outcome)
    with contextlib.suppress(asyncio.CancelledError, DownstreamDown, Business):
        await call.task


ACTIONS = st.one_of(
    st.just(("start", 0, "")),
    st.just(("elapse", 0, "")),
    st.tuples(
        st.just("finish"),
        st.integers(0, 7),
        st.sampled_from(["ok", "fail", "fail", "business", "cancel"]),
    ),
)


def _actions(words: str) -> list[tuple[str, int, str]]:
    """``start``, ``elapse`` and ``finish:<pick>:<outcome>`` words as ACTIONS' actions."""
    actions = []
    for word in words.split():
        if word in ("start", "elapse"):
            actions.append((word, 0, ""))
        else:
            _, pick, outcome = word.split(":")
            actions.append(("finish", int(pick), outcome))
    return actions


@pytest.mark.integration
@HYPOTHESIS
@given(actions=st.lists(ACTIONS, max_size=40), fail_max=st.integers(1, 3))
@example(  # a success clears the count; a late failure from before a close is not counted
    actions=_actions(
        "start start finish:0:fail start finish:1:ok finish:0:fail finish:0:fail elapse start start"
    ),
    fail_max=2,
)
@example(  # a cancelled trial frees the lease for the next caller
    actions=_actions(
        "start finish:0:fail elapse start start finish:0:cancel start finish:0:business start"
    ),
    fail_max=1,
)
def test_overlapping_async_calls_follow_the_model(
    board: BreakerBoard, actions: list[tuple[str, int, str]], fail_max: int
) -> None:
    # Given a breaker (a trial lease that never lapses here) and a model of its rules
    breaker = board.breaker(
        _name(),
        fail_max=fail_max,
        reset_timeout_s=RESET_S,
        exclude=(Business,),
        trial_lease_s=1e6,
    )
    model = Model(fail_max)

    async def body() -> None:
        flying: list[tuple[int, InFlight]] = []
        for number, (action, pick, outcome) in enumerate(actions):
            # When calls start, finish in any order with any outcome, and time passes
            if action == "start":
                call = await _start(breaker)
                assert (call is not None) == model.admit(number), (number, action)
                if call is not None:
                    flying.append((number, call))
            elif action == "elapse":
                _elapse_shared(board, breaker)
                model.elapse()
            elif flying:
                started, call = flying.pop(pick % len(flying))
                await _finish(call, outcome)
                model.settle(started, outcome)
            # Then the breaker is where the model says, after every step
            seen = (await breaker.astate(), breaker.fail_count)
            assert seen == (model.state, model.fails), (number, action, outcome)
        for _, call in flying:
            await _finish(call, "cancel")

    run(board, body)


def test_model_agrees_with_the_permit_rules() -> None:
    # The model itself: a late failure of a call admitted before a close is not counted
    model = Model(fail_max=1)
    assert model.admit(0) and model.admit(1)
    model.settle(0, "fail")
    assert model.state == STATE_OPEN
    model.elapse()
    assert model.admit(2) and not model.admit(3)
    model.settle(2, "ok")
    model.settle(1, "fail")
    assert (model.state, model.fails) == (STATE_CLOSED, 0)
    assert isinstance(Permit("x", trial=False, epoch=0), Permit)
