"""Shared breakers on the coroutine path (``acall``, ``acalling``, ``abefore_call``...).

The same semantics as the sync path (tests/unit/breakers/test_breakers.py), over
``redis.asyncio`` with the same scripts and keys: what stock pybreaker does with a
coroutine (a test_stock_* test), the decorator and entry points, cancellation (no
verdict, a half-open trial's lease released at once, also when cancelled while asking
for it or while the outcome is written), the Redis commands a call costs (counted by
the board and by Redis's INFO commandstats, equal to the sync path's), a sync and an
async process on one breaker, and Redis going away. Coroutines run under
``asyncio.run``; time passes on a fake clock. Redis is this session's own
redis-server (``breaker_redis_url``), or a test's own where the test counts server-wide
commands or stops it. Parity with pybreaker and the sync path, and hypothesis:
test_async_breaker_parity.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import multiprocessing
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pybreaker
import pytest
import redis
from structlog.testing import capture_logs

from orchestration.agents import Escalate, PermanentError
from orchestration.breakers import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    BreakerBoard,
    BreakerOpen,
    BreakerStateUnavailable,
    Permit,
    SharedBreaker,
    lua,
)
from orchestration.breakers.async_storage import AsyncRedisBreakerStorage, AsyncScripts
from orchestration.breakers.memory import AsyncMemoryBreakerStorage, MemoryBreakerStorage
from orchestration.breakers.model import Reply
from orchestration.breakers.storage import RedisBreakerStorage, Scripts
from tests.fake_clock import FakeClock
from tests.support import BREAKER_NAMESPACE, OwnRedis
from tests.unit.breakers.aio_support import OutcomeRecorder as Recorder
from tests.unit.breakers.aio_support import cancel_mid_call, run

T = TypeVar("T")

# Children come from a fork server that has imported this module once.
CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload([__name__])


class DownstreamDown(Exception):
    """What a broken downstream raises in these tests."""


# -- helpers ----------------------------------------------------------------------------


def _name() -> str:
    return f"agent:{uuid.uuid4().hex[:10]}"


async def _ok(x: int = 1) -> int:
    await asyncio.sleep(0)
    return x * 2


async def _fail(x: int = 1) -> int:
    await asyncio.sleep(0)
    raise DownstreamDown(f"down {x}")


async def _hang() -> None:
    await asyncio.Event().wait()


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(params=["redis", "memory"])
def board(request: pytest.FixtureRequest, breaker_redis_url: str) -> Iterator[BreakerBoard]:
    """A board on the session's redis-server (or in memory) on a fake clock; state read
    on every call (cache_ttl_s 0) so each step sees the others'."""
    url = breaker_redis_url if request.param == "redis" else None
    made = BreakerBoard(url, namespace=BREAKER_NAMESPACE, cache_ttl_s=0.0, clock=FakeClock())
    yield made
    made.close()


def _clock(board: BreakerBoard) -> FakeClock:
    assert isinstance(board.clock, FakeClock)
    return board.clock


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    yield server
    server.stop()


# -- what stock pybreaker does with coroutines ------------------------------------------


def test_stock_decorator_counts_a_failing_coroutine_as_a_success() -> None:
    # Given stock pybreaker (fail_max 1) decorating an async def that always fails
    recorder = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=1, listeners=[recorder])

    @cb
    async def fetch() -> None:
        raise DownstreamDown("down")

    # When it is awaited three times
    async def three() -> None:
        for _ in range(3):
            with pytest.raises(DownstreamDown):
                await fetch()

    asyncio.run(three())
    # Then each call was judged a success before the coroutine ran; the breaker never opened
    assert recorder.take() == [("before_call",), ("success",)] * 3
    assert cb.current_state == STATE_CLOSED


# -- entry points -----------------------------------------------------------------------


@pytest.mark.integration
def test_decorated_async_def_is_guarded_on_the_asyncio_path(board: BreakerBoard) -> None:
    breaker = board.breaker(_name(), fail_max=2, reset_timeout_s=30)
    recorder = Recorder()
    breaker.circuit.add_listener(recorder)
    calls: list[int] = []

    @breaker.circuit
    async def fetch(x: int) -> int:
        calls.append(x)
        if x < 0:
            raise DownstreamDown("down")
        return x * 2

    @breaker.circuit(__pybreaker_call_async=True)  # pybreaker's Tornado switch: ignored
    async def fetch_too(x: int) -> int:
        calls.append(x)
        raise DownstreamDown("down too")

    # The decorated function is still a coroutine function (agents are found by that)
    assert inspect.iscoroutinefunction(fetch) and inspect.iscoroutinefunction(fetch_too)
    assert fetch.__name__ == "fetch"

    async def body() -> None:
        assert await fetch(21) == 42
        assert recorder.take() == [("before_call",), ("success",)]
        with pytest.raises(DownstreamDown):
            await fetch(-1)
        assert breaker.fail_count == 1
        # The failure that trips it: pybreaker's throw_new_error_on_trip, from the cause
        with pytest.raises(pybreaker.CircuitBreakerError) as tripped:
            await fetch_too(-2)
        assert isinstance(tripped.value.__cause__, DownstreamDown)
        # Then refused, nothing called
        with pytest.raises(BreakerOpen):
            await fetch(3)

    run(board, body)
    assert calls == [21, -1, -2]
    assert breaker.state == STATE_OPEN


@pytest.mark.integration
def test_async_generator_functions_are_refused(board: BreakerBoard) -> None:
    breaker = board.breaker(_name(), fail_max=1, reset_timeout_s=30)

    async def stream() -> Any:
        yield 1

    with pytest.raises(TypeError, match="async generator"):
        breaker.circuit(stream)

    async def body() -> None:
        with pytest.raises(TypeError, match="async generator"):
            await breaker.acall(stream)

    run(board, body)
    assert (breaker.state, breaker.fail_count) == (STATE_CLOSED, 0)


@pytest.mark.integration
def test_acall_keeps_the_downstream_error_and_refuses_when_open(board: BreakerBoard) -> None:
    breaker = board.breaker(
        _name(), fail_max=2, reset_timeout_s=30, exclude=(Escalate, PermanentError)
    )
    calls: list[int] = []

    async def record(x: int) -> int:
        calls.append(x)
        return x

    async def body() -> BreakerOpen:
        for exc in (Escalate("missing W-2"), PermanentError("bad")):
            with pytest.raises(type(exc)):
                await breaker.acall(_raiser(exc))
        assert breaker.fail_count == 0  # business outcomes: the downstream answered
        for _ in range(2):
            with pytest.raises(DownstreamDown):  # the original error, also on the trip
                await breaker.acall(_fail)
        with pytest.raises(BreakerOpen) as refused:
            await breaker.acall(record, 1)
        return refused.value

    refused = run(board, body)
    assert calls == []
    assert refused.name == breaker.name and 29.0 < refused.remaining_s <= 30.0
    assert breaker.state == STATE_OPEN


def _raiser(exc: BaseException) -> Callable[[], Coroutine[Any, Any, None]]:
    async def raise_it() -> None:
        raise exc

    return raise_it


@pytest.mark.integration
def test_acalling_guards_a_block(board: BreakerBoard) -> None:
    breaker = board.breaker(_name(), fail_max=1, reset_timeout_s=30)

    async def body() -> None:
        async with breaker.acalling() as permit:
            assert isinstance(permit, Permit) and not permit.trial
        with pytest.raises(DownstreamDown):
            async with breaker.acalling():
                await _fail()
        with pytest.raises(BreakerOpen):
            async with breaker.acalling():
                raise AssertionError("not reached")

    run(board, body)
    assert breaker.state == STATE_OPEN


@pytest.mark.integration
def test_circuit_call_async_and_acalling_throw_new_error_on_trip(board: BreakerBoard) -> None:
    breaker = board.breaker(_name(), fail_max=1, reset_timeout_s=30)
    circuit = breaker.circuit

    async def body() -> None:
        with pytest.raises(pybreaker.CircuitBreakerError) as tripped:
            await circuit.call_async(_fail, 3)
        assert isinstance(tripped.value.__cause__, DownstreamDown)
        breaker.reset()
        with pytest.raises(pybreaker.CircuitBreakerError):
            async with circuit.acalling():
                await _fail()
        breaker.reset()
        circuit._throw_new_error_on_trip = False
        with pytest.raises(DownstreamDown):
            await circuit.call_async(_fail, 3)

    run(board, body)


@pytest.mark.integration
def test_sync_call_of_a_coroutine_is_judged_when_awaited(board: BreakerBoard) -> None:
    # pybreaker's call() would return the coroutine and record a success at once
    breaker = board.breaker(_name(), fail_max=3, reset_timeout_s=30)

    async def body() -> None:
        pending = breaker.call(_fail, 1)  # a coroutine function: admitted when awaited
        assert breaker.fail_count == 0
        with pytest.raises(DownstreamDown):
            await pending
        assert breaker.fail_count == 1
        with pytest.raises(DownstreamDown):
            await breaker.call(lambda: _fail(2))  # a function returning an awaitable
        assert breaker.fail_count == 2
        assert await breaker.call(_ok, 4) == 8
        assert breaker.fail_count == 0

    run(board, body)


@pytest.mark.integration
def test_listeners_hear_the_async_split_path_in_pybreakers_order(board: BreakerBoard) -> None:
    breaker = board.breaker(_name(), fail_max=1, reset_timeout_s=0.1)
    recorder = Recorder()
    breaker.circuit.add_listener(recorder)

    async def body() -> None:
        permit = await breaker.abefore_call()
        await breaker.aon_success(permit)
        permit = await breaker.abefore_call()
        await breaker.aabandon(permit)
        permit = await breaker.abefore_call()
        await breaker.aon_failure(permit, DownstreamDown("x"))
        _clock(board).advance(0.15)
        permit = await breaker.abefore_call()
        assert permit.trial
        await breaker.aon_success(permit)

    run(board, body)
    assert recorder.take() == [
        ("before_call",),
        ("success",),
        ("before_call",),
        ("before_call",),
        ("failure", "DownstreamDown"),
        ("state_change", STATE_CLOSED, STATE_OPEN),
        ("state_change", STATE_OPEN, STATE_HALF_OPEN),
        ("before_call",),
        ("state_change", STATE_HALF_OPEN, STATE_CLOSED),
        ("success",),
    ]


@pytest.mark.integration
def test_permits_settle_on_either_path(board: BreakerBoard) -> None:
    breaker = board.breaker(_name(), fail_max=2, reset_timeout_s=0.1)
    sync_permit = breaker.before_call()

    async def body() -> Permit:
        await breaker.aon_failure(sync_permit, DownstreamDown("x"))
        return await breaker.abefore_call()

    async_permit = run(board, body)
    assert breaker.fail_count == 1
    breaker.on_failure(async_permit, DownstreamDown("y"))
    assert breaker.state == STATE_OPEN


# -- cancellation -----------------------------------------------------------------------


async def _time_limit_passes_mid_call(breaker: SharedBreaker) -> None:
    """``acall`` under a time limit that passes while the downstream runs."""
    async with asyncio.timeout(None) as limit:

        async def handler() -> None:
            limit.reschedule(asyncio.get_running_loop().time())
            await _hang()

        await breaker.acall(handler)


@pytest.mark.integration
def test_cancelled_call_gives_no_verdict(board: BreakerBoard) -> None:
    # Given a closed breaker with one failure counted
    breaker = board.breaker(_name(), fail_max=2, reset_timeout_s=30)
    recorder = Recorder()
    breaker.circuit.add_listener(recorder)

    async def body() -> None:
        with pytest.raises(DownstreamDown):
            await breaker.acall(_fail)
        recorder.take()
        # When calls are cancelled mid-call: by a cancel, by a time limit, in a block
        await cancel_mid_call(breaker.acall)
        with pytest.raises(TimeoutError):
            await _time_limit_passes_mid_call(breaker)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as limit, breaker.acalling():
                limit.reschedule(asyncio.get_running_loop().time())
                await _hang()

    run(board, body)
    # Then neither success nor failure: the count stands, no listener heard an outcome
    assert (breaker.state, breaker.fail_count) == (STATE_CLOSED, 1)
    assert recorder.take() == [("before_call",)] * 3


@pytest.mark.integration
def test_a_time_limit_passing_while_redis_is_asked_is_not_lost(board: BreakerBoard) -> None:
    # redis-py sends through asyncio.wait_for, which on Python 3.11 returns a finished
    # send and drops a cancel that came meanwhile: the call then ran past its limit.
    breaker = board.breaker(_name(), fail_max=1, reset_timeout_s=30)
    started: list[int] = []

    async def handler() -> None:
        started.append(1)
        await _hang()

    async def limited() -> None:
        for _ in range(3):
            assert await breaker.acall(_ok, 1) == 2  # connected (a cancel disconnects)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0):  # passes at the first wait: the read
                    await breaker.acall(handler)

    async def body() -> None:
        task = asyncio.ensure_future(limited())
        await asyncio.wait({task}, timeout=30)
        assert task.done(), "a time limit was lost: the handler is still running"
        task.result()

    run(board, body)
    assert started == ([] if board.shared else [1, 1, 1])
    assert (breaker.state, breaker.fail_count) == (STATE_CLOSED, 0)


@pytest.mark.integration
def test_cancelled_trial_frees_the_lease_for_another_process_at_once(
    board: BreakerBoard,
) -> None:
    # Given an open breaker whose reset timeout passed, seen by two processes' boards
    name = _name()
    clock = _clock(board)
    other = BreakerBoard(board._redis_url, namespace=board.namespace, cache_ttl_s=0.0, clock=clock)
    if not board.shared:
        other = board  # in memory a process has one board
    mine = board.breaker(name, fail_max=1, reset_timeout_s=0.1)
    theirs = other.breaker(name, fail_max=1, reset_timeout_s=0.1)
    mine.force_open()
    clock.advance(0.15)
    seen: list[str] = []

    async def trial(handler: Callable[[], Awaitable[Any]]) -> Any:
        permit = await mine.abefore_call()
        assert permit.trial
        seen.append(mine.state)
        with pytest.raises(BreakerOpen) as refused:  # the other process waits meanwhile
            theirs.before_call()
        seen.append(refused.value.state)
        try:
            return await handler()
        except BaseException as exc:
            await mine.aon_failure(permit, exc)
            raise

    # When the trial is cancelled mid-call (no time passes)
    run(board, lambda: cancel_mid_call(trial))
    # Then the other process gets the next trial at once, and its success closes it
    assert seen == [STATE_HALF_OPEN, STATE_HALF_OPEN]
    assert mine.state == STATE_HALF_OPEN
    permit = theirs.before_call()
    assert permit.trial
    theirs.on_success(permit)
    assert mine.state == theirs.state == STATE_CLOSED
    other.close()


class GatedStorage(AsyncMemoryBreakerStorage):
    """A memory storage whose operation ``op`` waits for ``gate``: before its work (the
    command still on its way) or after it (the reply still on its way)."""

    def __init__(self, memory: MemoryBreakerStorage, op: str, *, work_first: bool) -> None:
        super().__init__(memory)
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()
        inner = getattr(self, op)

        async def gated(*args: Any, **kwargs: Any) -> Reply:
            if work_first:
                reply: Reply = await inner(*args, **kwargs)
            self.reached.set()
            await self.gate.wait()
            if not work_first:
                reply = await inner(*args, **kwargs)
            return reply

        setattr(self, op, gated)


def _gate(breaker: SharedBreaker, op: str, *, work_first: bool) -> GatedStorage:
    memory = breaker._storage
    assert isinstance(memory, MemoryBreakerStorage)
    gated = GatedStorage(memory, op, work_first=work_first)
    breaker._async_storage = lambda: gated  # type: ignore[method-assign]
    return gated


def test_cancelled_while_taking_the_trial_gives_the_lease_back() -> None:
    clock = FakeClock()
    board = BreakerBoard(None, clock=clock)
    breaker = board.breaker(_name(), fail_max=1, reset_timeout_s=0.1)
    breaker.force_open()
    clock.advance(0.15)

    async def body() -> None:
        gated = _gate(breaker, "acquire_trial", work_first=True)
        # When the caller is cancelled after its trial request took the lease, before
        # the reply came back
        task = asyncio.ensure_future(breaker.acall(_ok))
        await gated.reached.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()

    run(board, body)
    # Then the lease was given back: the next caller gets the trial at once
    assert breaker.state == STATE_HALF_OPEN
    assert breaker.before_call().trial


@pytest.mark.parametrize("outcome", ["failure", "trial_success"])
def test_outcome_is_written_even_when_cancelled_while_writing_it(outcome: str) -> None:
    clock = FakeClock()
    board = BreakerBoard(None, clock=clock)
    breaker = board.breaker(_name(), fail_max=1, reset_timeout_s=0.1)
    if outcome == "trial_success":
        breaker.force_open()
        clock.advance(0.15)
    op = "record_failure" if outcome == "failure" else "finish_trial"

    async def body() -> None:
        gated = _gate(breaker, op, work_first=False)
        task = asyncio.ensure_future(breaker.acall(_fail if outcome == "failure" else _ok))
        await gated.reached.wait()
        # When the caller is cancelled while its outcome is being written
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert breaker.state == (STATE_CLOSED if outcome == "failure" else STATE_HALF_OPEN)
        # And the write goes on once its command gets through
        gated.gate.set()
        for _ in range(3):  # the shielded write resumes on the next loop iterations
            await asyncio.sleep(0)

    run(board, body)
    # Then the outcome was recorded all the same
    assert breaker.state == (STATE_OPEN if outcome == "failure" else STATE_CLOSED)


# -- bookkeeping cost -------------------------------------------------------------------


def test_one_source_for_the_scripts() -> None:
    sync = vars(Scripts(redis.Redis()))
    aio = vars(AsyncScripts(redis.asyncio.Redis()))
    assert sync.keys() == aio.keys()
    assert [s.sha for s in sync.values()] == [s.sha for s in aio.values()]
    assert {s.script for s in aio.values()} == {
        lua.READ,
        lua.FAILURE,
        lua.SUCCESS,
        lua.TRIAL,
        lua.TRIAL_DONE,
        lua.ABANDON,
        lua.RESET,
        lua.FORCE_OPEN,
    }


@pytest.mark.integration
def test_async_storage_answers_as_the_sync_storage(breaker_redis_url: str) -> None:
    # Given each storage on a breaker of its own, on one clock
    clock = FakeClock()
    client = redis.Redis.from_url(breaker_redis_url)
    sync = RedisBreakerStorage(client, Scripts(client), BREAKER_NAMESPACE, _name(), clock=clock)
    ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("read", (), {"register": True, "fail_max": 2, "reset_ms": 100}),
        ("record_failure", (0, 2, 100), {}),
        ("record_success", (0,), {}),
        ("record_failure", (0, 2, 100), {}),
        ("record_failure", (0, 2, 100), {}),
        ("acquire_trial", ("t1", 500), {}),
        ("tick", (), {}),
        ("acquire_trial", ("t1", 500), {}),
        ("acquire_trial", ("t2", 500), {}),
        ("abandon_trial", ("t1",), {}),
        ("acquire_trial", ("t2", 500), {}),
        ("finish_trial", ("t2", False, 100), {}),
        ("tick", (), {}),
        ("acquire_trial", ("t3", 500), {}),
        ("finish_trial", ("t3", True, 100), {}),
        ("force_open", (100,), {}),
        ("reset", (), {"known_only": True}),
        ("read", (), {}),
    ]

    def drive_sync() -> list[Reply]:
        replies = []
        for op, args, kwargs in ops:
            if op == "tick":
                clock.advance(0.15)
            else:
                replies.append(getattr(sync, op)(*args, **kwargs))
        return replies

    start = clock.now
    want = drive_sync()
    clock.now = start

    async def drive_async() -> list[Reply]:
        aclient = redis.asyncio.Redis.from_url(breaker_redis_url)
        aio = AsyncRedisBreakerStorage(
            aclient, AsyncScripts(aclient), BREAKER_NAMESPACE, _name(), clock=clock
        )
        replies = []
        for op, args, kwargs in ops:
            if op == "tick":
                clock.advance(0.15)
            else:
                replies.append(await getattr(aio, op)(*args, **kwargs))
        await aclient.aclose()
        return replies

    got = asyncio.run(drive_async())
    # Then every operation answers the same
    assert got == want
    assert [r.verdict for r in got].count("trial") == 3
    client.close()


def _preload_scripts(admin: redis.Redis) -> None:
    for text in (lua.READ, lua.FAILURE, lua.SUCCESS, lua.TRIAL, lua.TRIAL_DONE, lua.ABANDON):
        admin.script_load(text)


def _server_calls(admin: redis.Redis) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {
        k: int(v["calls"])
        for k, v in stats.items()
        if k.split("|")[0] not in ("cmdstat_info", "cmdstat_config")
    }


# A workload on one breaker (fail_max 3, reset 10 s, cache 1 s): "ok"/"fail" a call,
# a number the seconds that pass.
WORKLOAD = [
    *["ok", "0.25"] * 12,  # closed: one read per cache_ttl_s
    "fail",  # counted at once
    "ok",  # one write zeroes the count
    "ok",
    "fail",
    "fail",
    "fail",  # opens
    "ok",  # refused from the cached open view
    "11",
    "ok",  # the trial: lease, then close
    "ok",
    *["ok", "0.5"] * 4,
]


def _step_sync(breaker: SharedBreaker, step: str) -> None:
    if step == "ok":
        with contextlib.suppress(BreakerOpen):
            breaker.call(lambda: None)
    else:
        with contextlib.suppress(DownstreamDown):
            breaker.call(_raise_down)


def _raise_down() -> None:
    raise DownstreamDown("down")


async def _step_async(breaker: SharedBreaker, step: str) -> None:
    if step == "ok":
        with contextlib.suppress(BreakerOpen):
            await breaker.acall(_ok)
    else:
        with contextlib.suppress(DownstreamDown):
            await breaker.acall(_fail)


@pytest.mark.integration
def test_async_calls_cost_the_same_commands_as_sync_calls(own_redis: OwnRedis) -> None:
    # Given a sync and an async board on a redis-server of this test's own, each
    # connected, the scripts loaded, on clocks that move alike
    admin = redis.Redis.from_url(own_redis.url)
    _preload_scripts(admin)
    sync_clock, async_clock = FakeClock(), FakeClock()
    sync_board = BreakerBoard(own_redis.url, cache_ttl_s=1.0, clock=sync_clock)
    async_board = BreakerBoard(own_redis.url, cache_ttl_s=1.0, clock=async_clock)
    sync_breaker = sync_board.breaker("agent:sync", fail_max=3, reset_timeout_s=10)
    async_breaker = async_board.breaker("agent:async", fail_max=3, reset_timeout_s=10)
    sync_breaker.call(lambda: None)

    # When each runs the same workload, step by step
    sync_steps: list[int] = []
    admin.config_resetstat()
    for step in WORKLOAD:
        before = sync_board.command_count()
        if step in ("ok", "fail"):
            _step_sync(sync_breaker, step)
        else:
            sync_clock.advance(float(step))
        sync_steps.append(sync_board.command_count() - before)
    sync_server = _server_calls(admin)

    async def workload() -> tuple[list[int], dict[str, int]]:
        await async_breaker.acall(_ok)  # connected and registered, like the sync one
        admin.config_resetstat()
        steps = []
        for step in WORKLOAD:
            before = async_board.command_count()
            if step in ("ok", "fail"):
                await _step_async(async_breaker, step)
            else:
                async_clock.advance(float(step))
            steps.append(async_board.command_count() - before)
        return steps, _server_calls(admin)

    async_steps, async_server = run(async_board, workload)
    # Then every step cost the same commands, by the boards' count and by Redis's
    assert async_steps == sync_steps
    assert async_server == sync_server
    # And the closed breaker's successes cost one read per cache_ttl_s, nothing else
    assert sum(sync_steps[:24]) == 2
    assert sync_server["cmdstat_evalsha"] == sum(sync_steps)
    assert async_breaker.state == sync_breaker.state == STATE_CLOSED
    for b in (sync_board, async_board):
        b.close()
    admin.close()


@pytest.mark.integration
def test_closed_breaker_success_costs_no_command_while_cached(breaker_redis_url: str) -> None:
    board = BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE, clock=FakeClock())
    breaker = board.breaker(_name(), fail_max=3, reset_timeout_s=30)

    async def body() -> int:
        await breaker.acall(_ok)
        before = board.command_count()
        for _ in range(500):
            await breaker.acall(_ok)
        return board.command_count() - before

    assert run(board, body) == 0
    board.close()


# -- one state for sync and async processes --------------------------------------------


def _child(body: Callable[..., dict[str, Any]], queue: Any, *args: Any) -> None:
    try:
        queue.put(body(*args))
    except BaseException:
        queue.put({"error": traceback.format_exc()})


def _in_child(body: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``body(*args)`` in another process; its result dict."""
    queue = CHILDREN.Queue()
    proc = CHILDREN.Process(target=_child, args=(body, queue, *args))
    proc.start()
    try:
        result: dict[str, Any] = queue.get(timeout=60)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert "error" not in result, result.get("error")
    return result


def _async_process(
    url: str, namespace: str, name: str, actions: list[str], now: float
) -> dict[str, Any]:
    """An asyncio process: ``actions`` through ``acall`` on a board of its own (in the
    parent's namespace: tests.support makes one per process)."""
    board = BreakerBoard(url, namespace=namespace, cache_ttl_s=0.0, clock=lambda: now)
    breaker = board.breaker(name, fail_max=3, reset_timeout_s=30, trial_lease_s=30)

    async def body() -> dict[str, Any]:
        seen: list[str] = []
        for action in actions:
            try:
                if action == "fail":
                    await breaker.acall(_fail)
                elif action == "ok":
                    await breaker.acall(_ok)
                else:
                    await cancel_mid_call(breaker.acall)
                seen.append(action)
            except DownstreamDown:
                seen.append("failed")
            except BreakerOpen as refused:
                seen.append(f"refused:{refused.state}")
        return {"seen": seen, "fail_count": breaker.fail_count, "state": await breaker.astate()}

    return run(board, body)


@pytest.mark.integration
def test_sync_and_async_processes_share_one_breaker(breaker_redis_url: str) -> None:
    # Given a sync process (this one) and async processes on one breaker name
    clock = FakeClock()
    name = _name()
    board = BreakerBoard(
        breaker_redis_url, namespace=BREAKER_NAMESPACE, cache_ttl_s=0.0, clock=clock
    )
    breaker = board.breaker(name, fail_max=3, reset_timeout_s=30, trial_lease_s=30)
    where = (breaker_redis_url, BREAKER_NAMESPACE)
    # When the sync side counts a failure, an async process sees it and adds one
    with pytest.raises(DownstreamDown):
        breaker.call(_raise_down)
    got = _in_child(_async_process, *where, name, ["fail"], clock.now)
    assert (got["seen"], got["fail_count"]) == (["failed"], 2)
    assert breaker.fail_count == 2
    # When an async process's failure trips it, the sync side is refused
    got = _in_child(_async_process, *where, name, ["fail", "ok"], clock.now)
    assert got["seen"] == ["failed", f"refused:{STATE_OPEN}"]
    calls: list[int] = []
    with pytest.raises(BreakerOpen):
        breaker.call(calls.append, 1)
    assert calls == []
    # When the reset timeout passes and an async process's trial is cancelled mid-call
    clock.advance(31)
    got = _in_child(_async_process, *where, name, ["cancel"], clock.now)
    assert (got["seen"], got["state"]) == (["cancel"], STATE_HALF_OPEN)
    # Then the sync side takes the next trial at once (the lease outlives no one)
    permit = breaker.before_call()
    assert permit.trial
    breaker.on_success(permit)
    got = _in_child(_async_process, *where, name, ["ok"], clock.now)
    assert (got["seen"], got["state"]) == (["ok"], STATE_CLOSED)
    board.close()


# -- Redis errors -----------------------------------------------------------------------


@pytest.mark.integration
def test_redis_down_refuses_async_calls_and_loses_outcomes_quietly(own_redis: OwnRedis) -> None:
    board = BreakerBoard(own_redis.url, cache_ttl_s=60.0)
    breaker = board.breaker("agent:down", fail_max=3, reset_timeout_s=60)
    calls: list[int] = []

    async def record() -> None:
        calls.append(1)

    async def body() -> list[str]:
        permit = await breaker.abefore_call()  # a cached closed view, 60 s
        own_redis.stop()
        with capture_logs() as logs:
            await breaker.aon_failure(permit, DownstreamDown("down"))  # not raised
            # The cache was dropped: the next call is refused, not let through
            with pytest.raises(BreakerStateUnavailable):
                await breaker.acall(record)
        return [e["event"] for e in logs]

    events = run(board, body)
    assert events == ["breaker_outcome_not_recorded", "breaker_state_unavailable"]
    assert calls == []
    own_redis.start()

    async def again() -> str:
        await breaker.acall(record)
        return await breaker.astate()

    assert run(board, again) == STATE_CLOSED
    assert calls == [1]
    board.close()


@pytest.mark.integration
def test_a_board_serves_event_loops_one_after_another(breaker_redis_url: str) -> None:
    board = BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE, cache_ttl_s=0.0)
    breaker = board.breaker(_name(), fail_max=3, reset_timeout_s=30)
    for _ in range(3):  # each asyncio.run is a new loop: a client of its own
        with pytest.raises(DownstreamDown):
            run(board, lambda: breaker.acall(_fail))
    assert breaker.state == STATE_OPEN
    assert board.command_count() >= 6
    board.close()


@pytest.mark.integration
def test_aclose_leaves_no_connection_open_on_its_loop(own_redis: OwnRedis) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    board = BreakerBoard(own_redis.url, cache_ttl_s=0.0)
    breaker = board.breaker("agent:close", fail_max=3, reset_timeout_s=30)

    async def settled(expected: int) -> int:
        # The server drops a closed connection from CLIENT LIST a moment after the close.
        for _ in range(100):
            count = len(admin.client_list())
            if count == expected:
                return count
            await asyncio.sleep(0.05)
        return count

    async def body() -> list[int]:
        open_clients = []
        for _ in range(2):  # a call after aclose() on the same loop opens a new client
            await breaker.acall(_ok)
            open_clients.append(await settled(2))
            await board.aclose()
            open_clients.append(await settled(1))
        return open_clients

    # Then each aclose() closed what the calls before it opened (the admin's is the 1)
    assert asyncio.run(body()) == [2, 1, 2, 1]
    board.close()
    admin.close()
