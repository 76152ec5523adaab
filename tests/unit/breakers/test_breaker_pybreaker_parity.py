"""taskrail's breakers against pybreaker 1.4.1's own behaviour.

The promise of :mod:`orchestration.breakers.storage`: a :class:`RedisBreakerStorage`
can be the ``state_storage`` of a stock ``pybreaker.CircuitBreaker``. Every test here
drives the same stock breaker twice, once over pybreaker's own ``CircuitMemoryStorage``
(the reference) and once over ``RedisBreakerStorage``, and compares what a caller sees:
the outcome of each step, state, counters and the listeners' calls. The second half
holds :class:`SharedBreaker` (the workers' breaker) to pybreaker's options it accepts:
listeners, guarded generators, ``throw_new_error_on_trip``, ``success_threshold``.

Redis is a redis-server of this module's own on a spare port; every breaker has a name
of its own, so nothing is flushed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterator
from datetime import timedelta
from typing import Any

import pybreaker
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.breakers import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    BreakerBoard,
    BreakerOpen,
)
from orchestration.breakers.breaker import SharedBreaker
from orchestration.breakers.storage import RedisBreakerStorage, Scripts, breaker_keys
from orchestration.errors import ConfigurationError
from tests.support import OwnRedis

NAMESPACE = "parity"


class DownstreamDown(Exception):
    """A broken downstream."""


class Business(Exception):
    """An excluded outcome: says nothing about the downstream's health."""


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[OwnRedis]:
    """This module's own redis-server (fails the tests if it cannot start)."""
    own = OwnRedis().start()
    yield own
    own.stop()


@pytest.fixture(scope="module")
def client(server: OwnRedis) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(server.url)
    yield conn
    conn.close()


def _fresh_name() -> str:
    return f"b-{uuid.uuid4().hex[:12]}"


def _redis_storage(client: redis.Redis, name: str) -> RedisBreakerStorage:
    return RedisBreakerStorage(client, Scripts(client), NAMESPACE, name)


# -- recording what a caller sees -------------------------------------------------------


class Recorder(pybreaker.CircuitBreakerListener):
    """Every listener callback, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        self.events.append(("before_call", args, tuple(sorted(kwargs.items()))))

    def success(self, cb: Any) -> None:
        self.events.append(("success",))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.events.append(("failure", type(exc).__name__))

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.events.append(("state_change", old_state and old_state.name, new_state.name))

    def take(self) -> list[tuple[Any, ...]]:
        taken, self.events = self.events, []
        return taken


def _ok(x: int = 1) -> int:
    return x * 2


def _fail(x: int = 1) -> int:
    raise DownstreamDown(f"down {x}")


def _business() -> None:
    raise Business("no such customer")


def _gen_ok() -> Generator[int, None, None]:
    yield 1
    yield 2


def _gen_fail() -> Generator[int, None, None]:
    yield 1
    raise DownstreamDown("down mid-stream")


def _outcome(step: Callable[[Any], Any], cb: Any) -> tuple[str, str]:
    try:
        return ("returned", repr(step(cb)))
    except pybreaker.CircuitBreakerError:
        # The refusal's wording is each implementation's own; its type is the contract.
        return ("raised", "CircuitBreakerError")
    except Exception as exc:
        return ("raised", f"{type(exc).__name__}: {exc}")


def _with_block(cb: Any, body: Callable[[], Any]) -> Any:
    with cb.calling():
        return body()


def _elapse(storage: pybreaker.CircuitBreakerStorage, reset_timeout_s: float) -> None:
    """Let the reset timeout pass: move ``opened_at`` back (pybreaker reads the wall clock)."""
    opened_at = storage.opened_at
    if opened_at is not None:
        storage.opened_at = opened_at - timedelta(seconds=reset_timeout_s + 1)


STEPS: dict[str, Callable[[Any], Any]] = {
    "ok": lambda cb: cb.call(_ok, 21),
    "fail": lambda cb: cb.call(_fail, 7),
    "business": lambda cb: cb.call(_business),
    "decorated": lambda cb: cb(_ok)(x=4),
    "gen_ok": lambda cb: list(cb.call(_gen_ok)),
    "gen_fail": lambda cb: list(cb.call(_gen_fail)),
    "with_ok": lambda cb: _with_block(cb, lambda: "fine"),
    "with_fail": lambda cb: _with_block(cb, _fail),
    "open": lambda cb: cb.open(),
    "close": lambda cb: cb.close(),
    "half_open": lambda cb: cb.half_open(),
}


def _run_stock(
    storage: pybreaker.CircuitBreakerStorage, steps: list[str], **options: Any
) -> list[tuple[Any, ...]]:
    """Drive a stock CircuitBreaker over ``storage``; what it showed after every step."""
    recorder = Recorder()
    cb = pybreaker.CircuitBreaker(
        state_storage=storage, listeners=[recorder], exclude=[Business], **options
    )
    trace: list[tuple[Any, ...]] = []
    for step in steps:
        if step == "elapse":
            _elapse(storage, cb.reset_timeout)
            outcome: tuple[str, str] = ("elapsed", "")
        else:
            outcome = _outcome(STEPS[step], cb)
        seen = (cb.current_state, cb.fail_counter, cb.success_counter)
        trace.append((step, outcome, seen, recorder.take()))
    return trace


def _assert_same(client: redis.Redis, steps: list[str], **options: Any) -> None:
    reference = _run_stock(pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED), steps, **options)
    ours = _run_stock(_redis_storage(client, _fresh_name()), steps, **options)
    for want, got in zip(reference, ours, strict=True):
        assert got == want, f"after {[s for s, *_ in ours[: ours.index(got) + 1]]}"


# -- RedisBreakerStorage under a stock CircuitBreaker ----------------------------------


def _steps(text: str) -> list[str]:
    return text.split()


TRIP_AND_RECOVER = _steps("fail fail fail ok elapse ok ok fail")


@pytest.mark.integration
def test_stock_breaker_on_our_storage_leaves_half_open(client: redis.Redis) -> None:
    # Given a stock breaker over RedisBreakerStorage that tripped
    storage = _redis_storage(client, _fresh_name())
    cb = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=60, state_storage=storage)
    for _ in range(2):
        with pytest.raises((DownstreamDown, pybreaker.CircuitBreakerError)):
            cb.call(_fail)
    assert cb.current_state == STATE_OPEN
    # When the reset timeout passes and the trial call succeeds
    _elapse(storage, 60)
    assert cb.call(_ok, 2) == 4
    # Then the breaker is closed again, for this breaker and any other on the same key
    assert cb.current_state == STATE_CLOSED
    assert cb.success_counter == 0
    assert pybreaker.CircuitBreaker(state_storage=storage).current_state == STATE_CLOSED


@pytest.mark.integration
def test_reading_through_pybreaker_writes_nothing(client: redis.Redis) -> None:
    name = _fresh_name()
    storage = _redis_storage(client, name)
    cb = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=60, state_storage=storage)
    assert (cb.current_state, cb.fail_counter, cb.success_counter) == (STATE_CLOSED, 0, 0)
    assert storage.opened_at is None
    key, registry, _ = breaker_keys(NAMESPACE, name)
    assert client.hgetall(key) == {}
    assert not client.sismember(registry, name)


@pytest.mark.integration
def test_breaker_used_by_stock_pybreaker_lists_without_made_up_settings(
    client: redis.Redis, server: OwnRedis
) -> None:
    # Given a stock breaker over our storage that read its state, then tripped
    name = _fresh_name()
    cb = pybreaker.CircuitBreaker(
        fail_max=1, reset_timeout=60, state_storage=_redis_storage(client, name)
    )
    assert cb.current_state == STATE_CLOSED
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.call(_fail)
    # Then an operator sees it open, and no fail_max/reset timeout nobody configured
    info = next(i for i in BreakerBoard(server.url, namespace=NAMESPACE).list() if i.name == name)
    assert (info.state, info.fail_count, info.fail_max, info.reset_timeout_s) == (
        STATE_OPEN,
        1,
        None,
        None,
    )
    assert info.opened_at is not None


@pytest.mark.integration
@pytest.mark.parametrize(
    ("options", "steps"),
    [
        pytest.param({"fail_max": 3}, TRIP_AND_RECOVER, id="trip-and-recover"),
        pytest.param(
            {"fail_max": 2, "success_threshold": 3},
            _steps("fail fail elapse ok ok ok ok fail fail elapse ok ok fail ok"),
            id="success-threshold-3",
        ),
        pytest.param(
            {"fail_max": 2, "throw_new_error_on_trip": False},
            _steps("fail fail elapse fail elapse ok"),
            id="throw-original-error-on-trip",
        ),
        pytest.param(
            {"fail_max": 2, "throw_new_error_on_trip": True},
            _steps("fail fail elapse fail elapse ok"),
            id="throw-new-error-on-trip",
        ),
        pytest.param(
            {"fail_max": 2},
            _steps("gen_ok gen_fail gen_ok gen_fail gen_fail elapse gen_ok"),
            id="generators",
        ),
        pytest.param(
            {"fail_max": 2},
            _steps(
                "business fail business decorated with_fail with_fail with_ok elapse with_ok"
                " open open close close half_open fail"
            ),
            id="listeners-and-entry-points",
        ),
    ],
)
def test_stock_breaker_on_our_storage_behaves_as_on_pybreakers_own(
    client: redis.Redis, options: dict[str, Any], steps: list[str]
) -> None:
    _assert_same(client, steps, reset_timeout=60, **options)


@pytest.mark.integration
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(st.sampled_from([*STEPS, "elapse", "elapse"]), min_size=1, max_size=25),
    fail_max=st.integers(1, 3),
    success_threshold=st.integers(1, 3),
    throw_new_error_on_trip=st.booleans(),
)
def test_any_sequence_on_our_storage_matches_pybreakers_own(
    client: redis.Redis,
    steps: list[str],
    fail_max: int,
    success_threshold: int,
    throw_new_error_on_trip: bool,
) -> None:
    _assert_same(
        client,
        steps,
        fail_max=fail_max,
        reset_timeout=60,
        success_threshold=success_threshold,
        throw_new_error_on_trip=throw_new_error_on_trip,
    )


@pytest.mark.integration
def test_success_threshold_counts_successes_of_every_process(server: OwnRedis) -> None:
    # Given two processes' stock breakers (own connections) on one breaker's state
    name = _fresh_name()
    clients = [redis.Redis.from_url(server.url) for _ in range(2)]
    a, b = (
        pybreaker.CircuitBreaker(
            fail_max=1,
            reset_timeout=60,
            success_threshold=2,
            state_storage=_redis_storage(conn, name),
        )
        for conn in clients
    )
    with pytest.raises(pybreaker.CircuitBreakerError):
        a.call(_fail)
    _elapse(a._state_storage, 60)
    a.half_open()
    # pybreaker zeroes the success counter when an instance first notices half-open
    # (its own rule, the same over its own CircuitRedisStorage): let both notice it.
    assert (a.state.name, b.state.name) == (STATE_HALF_OPEN, STATE_HALF_OPEN)
    # When each lets one successful call through while half-open
    a.call(_ok)
    assert (b.current_state, b.success_counter) == (STATE_HALF_OPEN, 1)
    b.call(_ok)
    # Then the two successes together close it, for both
    assert (a.current_state, b.current_state) == (STATE_CLOSED, STATE_CLOSED)
    for conn in clients:
        conn.close()


# -- SharedBreaker: the pybreaker options it accepts ------------------------------------


@pytest.fixture(params=["redis", "memory"])
def board(request: pytest.FixtureRequest, server: OwnRedis) -> Iterator[BreakerBoard]:
    made = BreakerBoard(
        server.url if request.param == "redis" else None, namespace=NAMESPACE, cache_ttl_s=0.0
    )
    yield made
    made.close()


def _elapse_shared(board: BreakerBoard, breaker: SharedBreaker) -> None:
    """Let the reset timeout pass (the next trial is due at the storage's clock)."""
    if board.shared:
        key, _, _ = breaker_keys(board.namespace, breaker.name)
        assert board._client is not None
        board._client.hset(key, "next_trial_ms", "0")
    else:
        breaker._storage._next_trial_ms = 0  # type: ignore[attr-defined]


def _without_self_changes(events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    # pybreaker also tells listeners of open->open and closed->closed (open() on an open
    # breaker); taskrail reports changes only.
    return [e for e in events if not (e[0] == "state_change" and e[1] == e[2])]


@pytest.mark.integration
def test_shared_breaker_calls_listeners_like_pybreaker(board: BreakerBoard) -> None:
    # Given the same listener on a stock breaker and on a SharedBreaker's circuit
    steps = _steps(
        "ok business fail decorated fail with_ok fail fail ok"
        " elapse with_fail elapse gen_ok gen_fail close open close"
    )
    reference = _run_stock(
        pybreaker.CircuitMemoryStorage(STATE_CLOSED), steps, fail_max=2, reset_timeout=60
    )
    shared = board.breaker(_fresh_name(), fail_max=2, reset_timeout_s=60, exclude=(Business,))
    recorder = Recorder()
    shared.circuit.add_listener(recorder)
    # When both go through the same steps
    for step, want_outcome, want_seen, want_events in reference:
        if step == "elapse":
            _elapse_shared(board, shared)
        else:
            outcome = _outcome(STEPS[step], shared.circuit)
            assert outcome == want_outcome, step
        # Then each step shows the same outcome, state and listener calls
        assert shared.state == want_seen[0], step
        assert recorder.take() == _without_self_changes(want_events), step


SHARED_STEPS = [s for s in STEPS if s != "half_open"]  # half-open only by a trial


@pytest.mark.integration
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(st.sampled_from([*SHARED_STEPS, "elapse", "elapse"]), max_size=25),
    fail_max=st.integers(1, 3),
)
def test_any_sequence_through_the_circuit_matches_pybreaker(
    board: BreakerBoard, steps: list[str], fail_max: int
) -> None:
    # Given a stock breaker on pybreaker's own storage and a SharedBreaker's circuit
    reference = _run_stock(
        pybreaker.CircuitMemoryStorage(STATE_CLOSED), steps, fail_max=fail_max, reset_timeout=60
    )
    shared = board.breaker(
        _fresh_name(), fail_max=fail_max, reset_timeout_s=60, exclude=(Business,)
    )
    recorder = Recorder()
    shared.circuit.add_listener(recorder)
    # When both go through the same steps, one at a time
    for step, want_outcome, want_seen, want_events in reference:
        if step == "elapse":
            _elapse_shared(board, shared)
        else:
            assert _outcome(STEPS[step], shared.circuit) == want_outcome, step
        # Then each step shows the same outcome, state, listener calls (and failure
        # count while closed: pybreaker also counts a failed trial, taskrail does not)
        assert shared.state == want_seen[0], step
        if want_seen[0] == STATE_CLOSED:
            assert shared.fail_count == want_seen[1], step
        assert recorder.take() == _without_self_changes(want_events), step


@pytest.mark.integration
def test_listeners_hear_the_workers_split_call_path(board: BreakerBoard) -> None:
    shared = board.breaker(_fresh_name(), fail_max=1, reset_timeout_s=60)
    recorder = Recorder()
    shared.circuit.add_listener(recorder)
    permit = shared.before_call()
    shared.on_success(permit)
    permit = shared.before_call()
    shared.abandon(permit)
    permit = shared.before_call()
    shared.on_failure(permit, DownstreamDown("x"))
    assert recorder.take() == [
        ("before_call", (), ()),
        ("success",),
        ("before_call", (), ()),
        ("before_call", (), ()),
        ("failure", "DownstreamDown"),
        ("state_change", STATE_CLOSED, STATE_OPEN),
    ]


@pytest.mark.integration
def test_a_failing_listener_is_logged_not_raised(board: BreakerBoard) -> None:
    class Broken(pybreaker.CircuitBreakerListener):
        def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("listener bug")

        def success(self, cb: Any) -> None:
            raise RuntimeError("listener bug")

    shared = board.breaker(_fresh_name(), fail_max=1, reset_timeout_s=60)
    shared.circuit.add_listener(Broken())
    assert shared.call(_ok, 5) == 10
    assert shared.state == STATE_CLOSED


@pytest.mark.integration
def test_guarded_generator_is_judged_when_it_ends(board: BreakerBoard) -> None:
    # Given a closed breaker with one failure counted
    shared = board.breaker(_fresh_name(), fail_max=2, reset_timeout_s=60)
    with pytest.raises(DownstreamDown):
        shared.call(_fail)
    # When a guarded generator is made but not yet run
    stream = shared.call(_gen_fail)
    # Then nothing is recorded yet (no success zeroing the count)
    assert shared.fail_count == 1
    # When it fails mid-stream, the failure counts and trips the breaker
    assert next(stream) == 1
    with pytest.raises(DownstreamDown):
        next(stream)
    assert (shared.state, shared.fail_count) == (STATE_OPEN, 2)


@pytest.mark.integration
def test_generator_trial_holds_the_trial_until_it_ends(board: BreakerBoard) -> None:
    shared = board.breaker(_fresh_name(), fail_max=1, reset_timeout_s=60)
    shared.force_open()
    _elapse_shared(board, shared)
    stream = shared.circuit.call(_gen_ok)
    assert shared.state == STATE_HALF_OPEN
    with pytest.raises(pybreaker.CircuitBreakerError):
        shared.before_call()  # the trial is still running
    assert list(stream) == [1, 2]
    assert shared.state == STATE_CLOSED


@pytest.mark.integration
def test_closing_a_generator_early_gives_no_verdict(board: BreakerBoard) -> None:
    shared = board.breaker(_fresh_name(), fail_max=1, reset_timeout_s=60)
    shared.force_open()
    _elapse_shared(board, shared)
    stream = shared.call(_gen_ok)
    assert next(stream) == 1
    stream.close()  # the consumer stopped: the downstream did not fail
    assert shared.state == STATE_HALF_OPEN
    trial = shared.before_call()  # the lease was given back
    assert trial.trial
    shared.on_success(trial)
    assert shared.state == STATE_CLOSED


@pytest.mark.integration
def test_circuit_honours_throw_new_error_on_trip(board: BreakerBoard) -> None:
    # Given a SharedBreaker one failure from opening, and its pybreaker face
    shared = board.breaker(_fresh_name(), fail_max=2, reset_timeout_s=60)
    circuit = shared.circuit
    with pytest.raises(DownstreamDown):
        circuit.call(_fail)
    # When the failure that trips it comes through pybreaker's entry point
    with pytest.raises(pybreaker.CircuitBreakerError) as tripped:
        circuit.call(_fail)
    # Then pybreaker's default: a CircuitBreakerError, the downstream's error its cause
    assert isinstance(tripped.value.__cause__, DownstreamDown)
    # And a failed trial through a `with` block trips it the same way
    _elapse_shared(board, shared)
    with pytest.raises(pybreaker.CircuitBreakerError), circuit.calling():
        _fail()
    assert shared.state == STATE_OPEN
    # And with the option off, the downstream's own error
    circuit._throw_new_error_on_trip = False
    _elapse_shared(board, shared)
    with pytest.raises(DownstreamDown):
        circuit.call(_fail)
    assert circuit.open() is False


@pytest.mark.integration
def test_opening_an_open_breaker_restarts_its_reset_timeout(board: BreakerBoard) -> None:
    # Given an open breaker whose reset timeout has passed
    steps = _steps("fail elapse open ok")
    reference = _run_stock(
        pybreaker.CircuitMemoryStorage(STATE_CLOSED), steps, fail_max=1, reset_timeout=60
    )
    shared = board.breaker(_fresh_name(), fail_max=1, reset_timeout_s=60)
    with pytest.raises(DownstreamDown):
        shared.call(_fail)
    _elapse_shared(board, shared)
    # When it is opened again (pybreaker's open(), an operator's trip)
    assert shared.circuit.open() is True
    # Then a fresh reset timeout starts, as in pybreaker: the next call is refused
    assert _outcome(STEPS["ok"], shared.circuit) == reference[-1][1]
    with pytest.raises(BreakerOpen) as refused:
        shared.before_call()
    assert refused.value.remaining_s > 59


@pytest.mark.integration
def test_shared_breaker_call_keeps_the_downstream_error_on_trip(board: BreakerBoard) -> None:
    shared = board.breaker(_fresh_name(), fail_max=1, reset_timeout_s=60)
    with pytest.raises(DownstreamDown):
        shared.call(_fail)
    assert shared.state == STATE_OPEN


def test_shared_breaker_refuses_a_success_threshold() -> None:
    shared = BreakerBoard(None).breaker("agent:x", fail_max=1, reset_timeout_s=60)
    with pytest.raises(ConfigurationError, match="success_threshold"):
        shared.circuit.success_threshold = 2
    shared.circuit.success_threshold = 1
    assert shared.circuit.success_threshold == 1
