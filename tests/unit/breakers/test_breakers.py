"""Shared circuit breakers (orchestration.breakers) against the real Redis.

Each defect of pybreaker's stock ``CircuitRedisStorage`` that the package fixes has a
``test_stock_*`` test showing it, beside a test showing ours gets it right. Redis tests
run on a redis-server of this module's own on a spare port (flushed around each test;
the machine's shared Redis is never touched) and fail, not skip, when it cannot start;
tests that stop Redis run one of their own. Reset timeouts and trial leases pass on a
fake clock given to the boards (the stock breaker's by moving its ``opened_at`` back),
never by sleeping.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
    BreakerNotFound,
    BreakerOpen,
    BreakerStateChange,
    BreakerStateUnavailable,
    Permit,
    SharedBreaker,
)
from orchestration.errors import InfrastructureError
from tests.fake_clock import FakeClock
from tests.support import OwnRedis, free_port

# Children come from a fork server that has imported this module once: starting
# a child costs a fork, not a fresh interpreter importing redis, pybreaker and pytest.
CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload([__name__])


class DownstreamDown(Exception):
    """What a broken downstream raises in these tests."""


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_redis() -> Iterator[OwnRedis]:
    """A redis-server of this module's own (fails the tests if it cannot start)."""
    server = OwnRedis().start()
    yield server
    server.stop()


@pytest.fixture
def url(module_redis: OwnRedis) -> Iterator[str]:
    """The module's own Redis, flushed before and after the test."""
    client = redis.Redis.from_url(module_redis.url)
    client.flushdb()
    yield module_redis.url
    client.flushdb()
    client.close()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    yield server
    server.stop()


def _stock_breaker(client: redis.Redis, namespace: str, **kwargs: Any) -> pybreaker.CircuitBreaker:
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace=namespace)
    return pybreaker.CircuitBreaker(state_storage=storage, **kwargs)


def _fail() -> None:
    raise DownstreamDown("down")


def _elapse_stock(client: redis.Redis, namespace: str, reset_timeout_s: float) -> None:
    """Let a stock breaker's reset timeout pass: move its ``opened_at`` (epoch seconds,
    wall clock) back, in Redis (pybreaker's setter only ever moves it forward)."""
    key = f"{namespace}:pybreaker:opened_at"
    opened_at = int(client.get(key) or 0)
    assert opened_at
    client.set(key, opened_at - int(reset_timeout_s) - 2)


def _info(board: BreakerBoard, name: str) -> Any:
    return next(i for i in board.list() if i.name == name)


# -- child processes (module level: children import this module) ----------------


class _OpenCounter(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.opens = 0

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self.opens += 1


def _child(body: Callable[..., dict[str, Any]], queue: Any, *args: Any) -> None:
    try:
        queue.put(body(*args))
    except BaseException:
        queue.put({"error": traceback.format_exc()})


def _run_children(body: Callable[..., dict[str, Any]], n: int, *args: Any) -> list[dict[str, Any]]:
    """Run ``body(barrier, *args)`` in ``n`` processes; their result dicts."""
    barrier = CHILDREN.Barrier(n)
    queue = CHILDREN.Queue()
    procs = [CHILDREN.Process(target=_child, args=(body, queue, barrier, *args)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    return results


def _fail_in_flight(barrier: Any, impl: str, url: str, name: str, fail_max: int) -> dict[str, Any]:
    """One call that fails only once every process is inside its call."""

    def handler() -> None:
        barrier.wait(timeout=30)  # every process has read "closed" and is calling
        raise DownstreamDown("down")

    opens: list[BreakerStateChange] = []
    counter = _OpenCounter()
    if impl == "stock":
        cb = _stock_breaker(
            redis.Redis.from_url(url),
            name,
            fail_max=fail_max,
            reset_timeout=60,
            listeners=[counter],
        )
        call: Callable[[], Any] = lambda: cb.call(handler)  # noqa: E731
    else:
        board = BreakerBoard(url, on_state_change=opens.append)
        breaker = board.breaker(name, fail_max=fail_max, reset_timeout_s=60)
        call = lambda: breaker.call(handler)  # noqa: E731
    barrier.wait(timeout=30)
    with contextlib.suppress(DownstreamDown, pybreaker.CircuitBreakerError):
        call()
    return {"opens": counter.opens + sum(1 for ch in opens if ch.new == STATE_OPEN)}


def _hammer(barrier: Any, url: str, name: str, fail_max: int, calls: int) -> dict[str, Any]:
    """Many failing calls in a row through our breaker."""
    handled = 0

    def handler() -> None:
        nonlocal handled
        handled += 1
        raise DownstreamDown("down")

    changes: list[BreakerStateChange] = []
    board = BreakerBoard(url, on_state_change=changes.append)
    breaker = board.breaker(name, fail_max=fail_max, reset_timeout_s=60)
    barrier.wait(timeout=30)
    refused = 0
    for _ in range(calls):
        try:
            breaker.call(handler)
        except DownstreamDown:
            pass
        except BreakerOpen:
            refused += 1
    opens = sum(1 for ch in changes if ch.new == STATE_OPEN)
    return {"handled": handled, "refused": refused, "opens": opens}


def _trial_race(
    barrier: Any,
    impl: str,
    url: str,
    name: str,
    outcome: str,
    reset_timeout_s: float,
    now: float | None = None,
) -> dict[str, Any]:
    """Everyone calls at once after the reset timeout; then everyone calls once more.

    A call that got through holds its handler until every process has called or been
    refused. ``now``: the time on the boards' clock (it stands still).
    """
    handled = 0
    waited = False

    def handler() -> str:
        nonlocal handled, waited
        handled += 1
        waited = True
        barrier.wait(timeout=30)  # the trial is still running while the others try
        if outcome == "fail":
            raise DownstreamDown("still down")
        return "ok"

    result: dict[str, Any] = {}
    if impl == "stock":
        cb = _stock_breaker(
            redis.Redis.from_url(url), name, fail_max=1, reset_timeout=reset_timeout_s
        )
        barrier.wait(timeout=30)
        with contextlib.suppress(DownstreamDown, pybreaker.CircuitBreakerError):
            cb.call(handler)
        if not waited:
            barrier.wait(timeout=30)
        barrier.wait(timeout=30)
        return {"handled": handled}
    board = BreakerBoard(url, clock=None if now is None else lambda: now)
    breaker = board.breaker(name, fail_max=1, reset_timeout_s=reset_timeout_s, trial_lease_s=10)
    barrier.wait(timeout=30)
    try:
        breaker.call(handler)
    except BreakerOpen as refused:
        result["refused_state"] = refused.state
    except DownstreamDown:
        pass
    if not waited:
        barrier.wait(timeout=30)  # with the trial, while it runs
    result["handled"] = handled
    barrier.wait(timeout=30)  # every first call has ended
    try:
        breaker.call(lambda: None)
        result["then"] = "called"
    except BreakerOpen as refused:
        assert refused.opened_at is not None
        result.update(
            then="refused", remaining_s=refused.remaining_s, opened_at=refused.opened_at.timestamp()
        )
    return result


# -- atomic counting across processes ---------------------------------------------------


@pytest.mark.integration
def test_stock_overshoots_fail_max_and_opens_once_per_process(url: str) -> None:
    # Given 8 processes with stock breakers (fail_max 3) whose calls all fail together
    results = _run_children(_fail_in_flight, 8, "stock", url, "stock:inflight", 3)
    # Then the counter runs past fail_max and several processes each "open" the breaker
    counter = int(redis.Redis.from_url(url).get("stock:inflight:pybreaker:fail_counter") or 0)
    assert counter == 8 > 3
    assert sum(r["opens"] for r in results) > 1


@pytest.mark.integration
def test_in_flight_failures_open_exactly_once_at_fail_max(url: str) -> None:
    # Given 8 processes with our breakers (fail_max 3) whose calls all fail together
    results = _run_children(_fail_in_flight, 8, "ours", url, "agent:inflight", 3)
    # Then the count stops at fail_max and one process, once, opened the breaker
    info = _info(BreakerBoard(url), "agent:inflight")
    assert (info.state, info.fail_count) == (STATE_OPEN, 3)
    assert sum(r["opens"] for r in results) == 1


@pytest.mark.integration
def test_hammering_processes_never_overshoot(url: str) -> None:
    # Given 4 processes each making 40 failing calls as fast as they can (fail_max 5)
    n, fail_max = 4, 5
    results = _run_children(_hammer, n, url, "agent:hammer", fail_max, 40)
    # Then the breaker opened once, at exactly fail_max, and the downstream was called
    # at most once more per other process (a call in flight when it opened)
    info = _info(BreakerBoard(url), "agent:hammer")
    assert (info.state, info.fail_count) == (STATE_OPEN, fail_max)
    assert sum(r["opens"] for r in results) == 1
    handled = sum(r["handled"] for r in results)
    assert fail_max <= handled <= fail_max + n - 1
    assert sum(r["refused"] for r in results) == n * 40 - handled


# -- one trial across the cluster -------------------------------------------------------


@pytest.mark.integration
def test_stock_half_open_lets_every_process_try(url: str) -> None:
    # Given a stock breaker opened with a 0.3 s reset timeout, and the timeout passed
    client = redis.Redis.from_url(url)
    cb = _stock_breaker(client, "stock:trial", fail_max=1, reset_timeout=0.3)
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(_fail)
    _elapse_stock(client, "stock:trial", 0.3)
    # When 6 processes call at once
    results = _run_children(_trial_race, 6, "stock", url, "stock:trial", "succeed", 0.3)
    # Then every one of them made a "trial" call
    assert sum(r["handled"] for r in results) == 6


@pytest.mark.integration
def test_one_trial_cluster_wide_and_its_success_closes_for_all(url: str) -> None:
    # Given our breaker opened with a 0.3 s reset timeout, and the timeout passed
    clock = FakeClock()
    board = BreakerBoard(url, clock=clock)
    board.breaker("agent:trial", fail_max=1, reset_timeout_s=0.3).force_open()
    clock.advance(0.4)
    # When 6 processes call at once, and the trial succeeds
    results = _run_children(_trial_race, 6, "ours", url, "agent:trial", "succeed", 0.3, clock.now)
    # Then exactly one called; the others were refused while it ran (half-open)
    assert sum(r["handled"] for r in results) == 1
    assert sorted(r.get("refused_state", "") for r in results) == [""] + [STATE_HALF_OPEN] * 5
    # And afterwards the breaker is closed for every process
    assert [r["then"] for r in results] == ["called"] * 6
    assert _info(BreakerBoard(url), "agent:trial").state == STATE_CLOSED


@pytest.mark.integration
def test_failed_trial_reopens_for_all_with_a_fresh_timeout(url: str) -> None:
    # Given our breaker opened with a 0.3 s reset timeout, and the timeout passed
    clock = FakeClock()
    board = BreakerBoard(url, clock=clock)
    board.breaker("agent:trial-fail", fail_max=1, reset_timeout_s=0.3).force_open()
    first_opened_at = _info(board, "agent:trial-fail").opened_at
    assert first_opened_at is not None
    clock.advance(0.4)
    # When 6 processes (reset timeout now 5 s) call at once, and the trial fails
    results = _run_children(_trial_race, 6, "ours", url, "agent:trial-fail", "fail", 5.0, clock.now)
    # Then exactly one called, and everyone is refused afterwards for about 5 s more
    assert sum(r["handled"] for r in results) == 1
    assert [r["then"] for r in results] == ["refused"] * 6
    assert all(3.5 < r["remaining_s"] <= 5.0 for r in results), results
    assert all(r["opened_at"] > first_opened_at.timestamp() for r in results)
    assert _info(board, "agent:trial-fail").state == STATE_OPEN


@pytest.mark.integration
def test_trial_lease_expires_when_its_caller_died(url: str) -> None:
    # Given an open breaker whose trial permit went to a caller that never reports
    clock = FakeClock()
    a, b = BreakerBoard(url, cache_ttl_s=0.0, clock=clock), BreakerBoard(url, clock=clock)
    breaker_a = a.breaker("agent:lease", fail_max=1, reset_timeout_s=0.2, trial_lease_s=0.3)
    breaker_b = b.breaker("agent:lease", fail_max=1, reset_timeout_s=0.2, trial_lease_s=0.3)
    breaker_a.force_open()
    clock.advance(0.25)
    assert breaker_a.before_call().trial
    # Then others are refused while the lease lasts ...
    with pytest.raises(BreakerOpen) as refused:
        breaker_b.before_call()
    assert refused.value.state == STATE_HALF_OPEN
    assert 0 < refused.value.remaining_s <= 0.3
    assert _info(b, "agent:lease").trial_in_progress
    # ... and one of them gets the trial once it lapsed
    clock.advance(0.35)
    permit = breaker_b.before_call()
    assert permit.trial
    breaker_b.on_success(permit)
    assert breaker_a.state == breaker_b.state == STATE_CLOSED


@pytest.mark.integration
def test_interrupted_trial_frees_the_lease_without_a_verdict(url: str) -> None:
    clock = FakeClock()
    board = BreakerBoard(url, cache_ttl_s=0.0, clock=clock)
    breaker = board.breaker("agent:interrupt", fail_max=1, reset_timeout_s=0.1)
    breaker.force_open()
    clock.advance(0.15)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        breaker.call(interrupted)
    assert breaker.state == STATE_HALF_OPEN
    assert breaker.before_call().trial  # the lease was released at once


# -- no lock across the call ------------------------------------------------------------


def _eight_sleepers(call: Callable[[], Any]) -> float:
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait(timeout=10)
        call()

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(one) for _ in range(8)]:
            future.result()
    return time.monotonic() - start


@pytest.mark.integration
def test_stock_breaker_serialises_threads(url: str) -> None:
    cb = _stock_breaker(redis.Redis.from_url(url), "stock:threads")
    assert _eight_sleepers(lambda: cb.call(time.sleep, 0.2)) >= 8 * 0.2 * 0.9


@pytest.mark.integration
def test_threads_do_not_serialise_through_a_closed_breaker(url: str) -> None:
    breaker = BreakerBoard(url).breaker("agent:threads", fail_max=3, reset_timeout_s=10)
    assert _eight_sleepers(lambda: breaker.call(time.sleep, 0.2)) < 1.0
    memory = BreakerBoard(None).breaker("agent:threads", fail_max=3, reset_timeout_s=10)
    assert _eight_sleepers(lambda: memory.call(time.sleep, 0.2)) < 1.0


# -- Redis errors -----------------------------------------------------------------------


@pytest.mark.integration
def test_unreachable_redis_refuses_the_call(url: str) -> None:
    # Given a board whose Redis does not listen (building it and its breakers connects to nothing)
    board = BreakerBoard(f"redis://127.0.0.1:{free_port()}/0")
    breaker = board.breaker("agent:nowhere", fail_max=3, reset_timeout_s=10)
    calls: list[int] = []
    # When a call is made
    with capture_logs() as logs, pytest.raises(BreakerStateUnavailable) as unavailable:
        breaker.call(calls.append, 1)
    # Then nothing was called, the error is an infrastructure error, and it was logged
    assert calls == []
    assert isinstance(unavailable.value, InfrastructureError)
    assert unavailable.value.name == "agent:nowhere"
    assert any(e["event"] == "breaker_state_unavailable" for e in logs)
    with pytest.raises(BreakerStateUnavailable):
        board.list()


@pytest.mark.integration
def test_stock_breaker_reads_closed_when_redis_is_down(own_redis: OwnRedis) -> None:
    # Given an open stock breaker
    cb = _stock_breaker(
        redis.Redis.from_url(own_redis.url), "stock:down", fail_max=1, reset_timeout=60
    )
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(_fail)
    calls: list[int] = []
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(calls.append, 1)
    # When Redis stops
    own_redis.stop()
    # Then the broken downstream is called, unguarded
    cb.call(calls.append, 1)
    assert calls == [1]


@pytest.mark.integration
def test_redis_stopped_then_restarted(own_redis: OwnRedis) -> None:
    # Given an open breaker and a board that always reads Redis
    board = BreakerBoard(own_redis.url, cache_ttl_s=0.0)
    breaker = board.breaker("agent:down", fail_max=1, reset_timeout_s=60)
    breaker.force_open()
    calls: list[int] = []
    # When Redis stops
    own_redis.stop()
    # Then calls are refused as "state unavailable", not let through
    with pytest.raises(BreakerStateUnavailable):
        breaker.call(calls.append, 1)
    assert calls == []
    # And when a Redis comes back (this one without persistence: every breaker closed)
    own_redis.start()
    breaker.call(calls.append, 1)
    assert calls == [1]
    assert breaker.state == STATE_CLOSED
    assert [i.name for i in board.list()] == ["agent:down"]  # registered again


@pytest.mark.integration
def test_outcome_lost_while_redis_down_is_logged_not_raised(own_redis: OwnRedis) -> None:
    # Given a permit from a closed breaker whose state is cached for 60 s
    board = BreakerBoard(own_redis.url, cache_ttl_s=60.0)
    breaker = board.breaker("agent:lost", fail_max=3, reset_timeout_s=60)
    permit = breaker.before_call()
    # When Redis stops during the call and the call fails
    own_redis.stop()
    with capture_logs() as logs:
        breaker.on_failure(permit, DownstreamDown("down"))
    # Then recording it does not raise, it is logged, and the cache is dropped: the next
    # call is refused instead of trusting a view that may be stale
    assert [e["event"] for e in logs] == ["breaker_outcome_not_recorded"]
    with pytest.raises(BreakerStateUnavailable):
        breaker.before_call()
    own_redis.start()
    assert not breaker.before_call().trial


# -- decode_responses -------------------------------------------------------------------


@pytest.mark.integration
def test_stock_storage_breaks_with_decode_responses(url: str) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    with pytest.raises(AttributeError, match="decode"):
        _stock_breaker(client, "stock:decode")


@pytest.mark.integration
@pytest.mark.parametrize("how", ["option", "url"])
def test_decode_responses_is_fine(url: str, how: str) -> None:
    clock = FakeClock()
    board = (
        BreakerBoard(url, redis_options={"decode_responses": True}, clock=clock)
        if how == "option"
        else BreakerBoard(f"{url}?decode_responses=true", clock=clock)
    )
    breaker = board.breaker("agent:decode", fail_max=2, reset_timeout_s=0.2)
    for _ in range(2):
        with pytest.raises(DownstreamDown):
            breaker.call(_fail)
    with pytest.raises(BreakerOpen):
        breaker.call(_fail)
    info = _info(board, "agent:decode")
    assert (info.state, info.fail_count) == (STATE_OPEN, 2)
    assert info.opened_at is not None and info.next_trial_at is not None
    clock.advance(0.25)
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state == STATE_CLOSED
    board.reset("agent:decode")


# -- overhead ---------------------------------------------------------------------------


def _server_commands(admin: redis.Redis) -> int:
    stats = admin.info("commandstats")
    return sum(
        int(v["calls"])
        for k, v in stats.items()
        if k.split("|")[0] not in ("cmdstat_info", "cmdstat_config")
    )


@pytest.mark.integration
def test_closed_breaker_costs_well_under_one_command_per_call(
    own_redis: OwnRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a closed breaker whose cached view expires every 0.1 s (10x the default rate)
    admin = redis.Redis.from_url(own_redis.url)
    board = BreakerBoard(own_redis.url, cache_ttl_s=0.1)
    breaker = board.breaker("agent:fast", fail_max=5, reset_timeout_s=30)
    breaker.call(lambda: None)  # scripts loaded, breaker registered
    admin.config_resetstat()
    before = board.command_count()
    # When 1,000 calls succeed (about 1 ms each)
    for _ in range(1000):
        breaker.call(time.sleep, 0.001)
    # Then bookkeeping cost at most 0.2 commands per call, by our count and by Redis's
    ours = (board.command_count() - before) / 1000
    server = _server_commands(admin) / 1000
    # And the stock breaker costs more than one per call
    cb = _stock_breaker(admin, "stock:fast")
    admin.config_resetstat()
    for _ in range(1000):
        cb.call(time.sleep, 0.001)
    stock = _server_commands(admin) / 1000
    with capsys.disabled():
        print(
            f"\nbreaker commands per successful call: ours {ours:.3f} sent "
            f"({server:.3f} executed by Redis, script internals included); stock {stock:.3f}"
        )
    assert ours <= 0.2
    assert server <= 0.2
    assert stock >= 1.0


@pytest.mark.integration
def test_failures_counted_at_once_and_cleared_by_one_success(url: str) -> None:
    board = BreakerBoard(url, cache_ttl_s=60.0)
    breaker = board.breaker("agent:count", fail_max=3, reset_timeout_s=30)
    with pytest.raises(DownstreamDown):  # a first failure and success load their scripts
        breaker.call(_fail)
    breaker.call(lambda: None)
    other = BreakerBoard(url, cache_ttl_s=0.0).breaker(
        "agent:count", fail_max=3, reset_timeout_s=30
    )
    sent = board.command_count()
    with pytest.raises(DownstreamDown):
        breaker.call(_fail)
    assert board.command_count() == sent + 1  # counted at once ...
    assert other.fail_count == 1  # ... and visible to every process
    breaker.call(lambda: None)
    assert board.command_count() == sent + 2  # one write zeroes the count ...
    assert other.fail_count == 0
    breaker.call(lambda: None)
    assert board.command_count() == sent + 2  # ... and later successes write nothing


# -- semantics --------------------------------------------------------------------------


@pytest.mark.integration
def test_open_breaker_refuses_with_time_to_next_trial(url: str) -> None:
    breaker = BreakerBoard(url).breaker("agent:open", fail_max=2, reset_timeout_s=30)
    calls: list[int] = []
    for _ in range(2):
        with pytest.raises(DownstreamDown):  # the original error, not CircuitBreakerError
            breaker.call(_fail)
    with pytest.raises(BreakerOpen) as refused:
        breaker.call(calls.append, 1)
    assert calls == []
    assert refused.value.name == "agent:open"
    assert 29.0 < refused.value.remaining_s <= 30.0
    assert refused.value.opened_at is not None
    assert isinstance(refused.value, pybreaker.CircuitBreakerError)
    assert refused.value.fields()["breaker"] == "agent:open"


@pytest.mark.integration
def test_excluded_exceptions_count_as_successes(url: str) -> None:
    breaker = BreakerBoard(url).breaker(
        "agent:excl", fail_max=2, reset_timeout_s=30, exclude=(Escalate, PermanentError)
    )
    for exc in (Escalate("missing W-2"), PermanentError("bad"), Escalate("again")):
        with pytest.raises(type(exc)):
            breaker.call(_raiser(exc))
    assert (breaker.state, breaker.fail_count) == (STATE_CLOSED, 0)
    with pytest.raises(DownstreamDown):
        breaker.call(_fail)
    assert breaker.fail_count == 1
    with pytest.raises(Escalate):  # a business outcome: the downstream answered
        breaker.call(_raiser(Escalate("x")))
    assert breaker.fail_count == 0


def _raiser(exc: BaseException) -> Callable[[], None]:
    def raise_it() -> None:
        raise exc

    return raise_it


@pytest.mark.integration
def test_state_changes_are_logged_and_reported_once(url: str) -> None:
    changes: list[BreakerStateChange] = []
    clock = FakeClock()
    board = BreakerBoard(url, on_state_change=changes.append, clock=clock)
    breaker = board.breaker("agent:log", fail_max=1, reset_timeout_s=0.1)
    with capture_logs() as logs:
        with pytest.raises(DownstreamDown):
            breaker.call(_fail)
        clock.advance(0.15)
        with pytest.raises(DownstreamDown):
            breaker.call(_fail)  # trial fails
        clock.advance(0.15)
        breaker.call(lambda: None)  # trial succeeds
    expected = [
        (STATE_CLOSED, STATE_OPEN),
        (STATE_OPEN, STATE_HALF_OPEN),
        (STATE_HALF_OPEN, STATE_OPEN),
        (STATE_OPEN, STATE_HALF_OPEN),
        (STATE_HALF_OPEN, STATE_CLOSED),
    ]
    assert [(ch.old, ch.new) for ch in changes] == expected
    lines = [e for e in logs if e["event"] == "breaker_state_change"]
    assert [(e["old"], e["new"]) for e in lines] == expected
    assert all(e["name"] == "agent:log" and "fail_count" in e for e in lines)


@pytest.mark.integration
def test_a_failing_hook_is_logged_not_raised(url: str) -> None:
    def broken(change: BreakerStateChange) -> None:
        raise RuntimeError("metrics down")

    breaker = BreakerBoard(url, on_state_change=broken).breaker(
        "agent:hook", fail_max=1, reset_timeout_s=30
    )
    with capture_logs() as logs, pytest.raises(DownstreamDown):
        breaker.call(_fail)
    assert "breaker_listener_failed" in [e["event"] for e in logs]
    assert breaker.state == STATE_OPEN


@pytest.mark.integration
def test_failures_of_calls_admitted_before_a_close_are_not_counted(url: str) -> None:
    # Given a call admitted while closed, then an open/trial/close cycle meanwhile
    clock = FakeClock()
    breaker = BreakerBoard(url, clock=clock).breaker("agent:stale", fail_max=1, reset_timeout_s=0.1)
    slow = breaker.before_call()
    with pytest.raises(DownstreamDown):
        breaker.call(_fail)
    clock.advance(0.15)
    breaker.call(lambda: None)
    # When the old call fails at last
    breaker.on_failure(slow, DownstreamDown("late"))
    # Then the recovered breaker does not count it
    assert (breaker.state, breaker.fail_count) == (STATE_CLOSED, 0)


@pytest.mark.integration
def test_list_shows_every_process_breakers_and_reset_closes_for_all(url: str) -> None:
    # Given breakers made by one board (process), one of them open
    worker = BreakerBoard(url, cache_ttl_s=0.0)
    worker.breaker("agent:ok", fail_max=3, reset_timeout_s=30).call(lambda: None)
    bad = worker.breaker("agent:bad", fail_max=2, reset_timeout_s=30)
    for _ in range(2):
        with pytest.raises(DownstreamDown):
            bad.call(_fail)
    # When an operator with a board of its own lists them
    operator = BreakerBoard(url)
    infos = {i.name: i for i in operator.list()}
    # Then both show, with state, count, opened at and next trial
    assert set(infos) == {"agent:ok", "agent:bad"}
    assert (infos["agent:ok"].state, infos["agent:ok"].fail_count) == (STATE_CLOSED, 0)
    b = infos["agent:bad"]
    assert (b.state, b.fail_count, b.fail_max, b.reset_timeout_s) == (STATE_OPEN, 2, 2, 30.0)
    assert b.opened_at is not None and b.next_trial_at is not None
    assert 29.0 < (b.next_trial_at - b.opened_at).total_seconds() <= 30.0
    json.dumps([i.to_dict() for i in infos.values()])
    # And a reset from the operator's board closes it for the worker too
    with capture_logs() as logs:
        operator.reset("agent:bad")
    assert (bad.state, bad.fail_count) == (STATE_CLOSED, 0)
    assert [(e["old"], e["new"]) for e in logs] == [(STATE_OPEN, STATE_CLOSED)]
    with pytest.raises(BreakerNotFound):
        operator.reset("agent:typo")


@pytest.mark.integration
def test_stock_storages_without_namespace_share_one_state(url: str) -> None:
    client = redis.Redis.from_url(url)
    first = pybreaker.CircuitBreaker(
        fail_max=1, state_storage=pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client)
    )
    second = pybreaker.CircuitBreaker(
        fail_max=1, state_storage=pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client)
    )
    with pytest.raises(pybreaker.CircuitBreakerError):
        first.call(_fail)
    assert second.current_state == pybreaker.STATE_OPEN  # pybreaker #88


@pytest.mark.integration
def test_breakers_and_namespaces_are_independent(url: str) -> None:
    board = BreakerBoard(url)
    board.breaker("agent:a", fail_max=1, reset_timeout_s=30).force_open()
    assert board.breaker("agent:b", fail_max=1, reset_timeout_s=30).state == STATE_CLOSED
    elsewhere = BreakerBoard(url, namespace="other")
    assert elsewhere.breaker("agent:a", fail_max=1, reset_timeout_s=30).state == STATE_CLOSED
    assert [i.name for i in elsewhere.list()] == ["agent:a"]


@pytest.mark.integration
def test_pybreaker_entry_points_use_the_shared_path(url: str) -> None:
    board = BreakerBoard(url, cache_ttl_s=0.0)
    breaker = board.breaker("agent:pyb", fail_max=2, reset_timeout_s=30)
    circuit = breaker.circuit
    assert isinstance(circuit, pybreaker.CircuitBreaker)
    assert isinstance(circuit._state_storage, pybreaker.CircuitRedisStorage)

    @circuit
    def handler(x: int) -> int:
        return x * 2

    assert handler(21) == 42
    assert circuit.call(lambda: "ok") == "ok"
    assert circuit.current_state == STATE_CLOSED and circuit.fail_counter == 0
    circuit.open()
    assert breaker.state == STATE_OPEN
    with pytest.raises(pybreaker.CircuitBreakerError):
        handler(1)
    circuit.close()
    assert breaker.state == STATE_CLOSED
    assert board.breaker("agent:pyb", fail_max=2, reset_timeout_s=30) is breaker


# -- the embedded default ---------------------------------------------------------------


def test_in_memory_board_has_the_same_behaviour() -> None:
    changes: list[BreakerStateChange] = []
    clock = FakeClock()
    board = BreakerBoard(None, on_state_change=changes.append, clock=clock)
    breaker = board.breaker("agent:mem", fail_max=2, reset_timeout_s=0.1, exclude=(Escalate,))
    assert isinstance(breaker, SharedBreaker)
    with pytest.raises(Escalate):
        breaker.call(_raiser(Escalate("x")))
    for _ in range(2):
        with pytest.raises(DownstreamDown):
            breaker.call(_fail)
    with pytest.raises(BreakerOpen) as refused:
        breaker.call(_fail)
    assert 0 < refused.value.remaining_s <= 0.1
    assert [(i.name, i.state, i.fail_count) for i in board.list()] == [("agent:mem", "open", 2)]
    clock.advance(0.15)
    trial = breaker.before_call()
    assert isinstance(trial, Permit) and trial.trial
    with pytest.raises(BreakerOpen):
        breaker.before_call()  # one trial at a time
    breaker.on_success(trial)
    assert breaker.state == STATE_CLOSED
    assert [ch.new for ch in changes] == [STATE_OPEN, STATE_HALF_OPEN, STATE_CLOSED]
    breaker.force_open()
    board.reset("agent:mem")
    assert breaker.state == STATE_CLOSED
    with pytest.raises(BreakerNotFound):
        board.reset("agent:typo")
    assert board.command_count() == 0
