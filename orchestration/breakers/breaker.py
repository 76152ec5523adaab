"""SharedBreaker: one downstream's breaker, its state shared through a storage.

The call path is split in three (``before_call`` -> the caller's own call ->
``on_success``/``on_failure``) so no lock is ever held while the downstream runs, and so
the execute hop can turn a refusal into a deferral. :class:`.circuit.Circuit` is the
pybreaker ``CircuitBreaker`` underneath: it holds the configuration (``fail_max``,
``reset_timeout``, excluded exceptions, listeners) and routes pybreaker's own entry
points (``call``, the decorator, ``calling()``, ``open()``/``close()``) to the shared,
atomic path.

pybreaker's options, as this breaker takes them:

- Listeners (``breaker.circuit.add_listener``): ``before_call``, ``success``,
  ``failure`` and ``state_change`` are called in pybreaker's order, in the process that
  made the call or the change; ``before_call`` gets ``func=None`` from a bare
  ``before_call()``. A listener's exception is logged, never raised.
- A guarded generator (``call``/the decorator on a generator function) is judged when
  it ends: exhausted is a success, an exception a failure; closed early (the consumer
  stopped) gives no verdict, like ``abandon``. Its permit, a half-open trial's lease
  included, is held until then.
- ``throw_new_error_on_trip`` (pybreaker's default, on): the failure that opens the
  breaker raises ``pybreaker.CircuitBreakerError`` from the downstream's error when it
  came through the circuit's ``call``, decorator or ``calling()``. ``SharedBreaker``'s
  own ``call``/``calling`` and ``on_failure`` (the workers' path) always let the
  downstream's error through.
- ``success_threshold`` is refused (ConfigurationError) unless 1: half-open is one
  cluster-wide trial, and its success closes the breaker for every process.
"""

from __future__ import annotations

import contextlib
import threading
import time
import types
import uuid
from collections.abc import Callable, Generator, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import pybreaker
from redis.exceptions import RedisError

from orchestration.breakers.circuit import Circuit
from orchestration.breakers.model import (
    STATE_CLOSED,
    STATE_OPEN,
    BreakerOpen,
    Permit,
    Reply,
    Snapshot,
    ms_to_datetime,
)
from orchestration.breakers.storage import BreakerStorage
from orchestration.errors import BreakerStateUnavailable
from orchestration.logging import get_logger

if TYPE_CHECKING:
    from orchestration.breakers.board import BreakerBoard

T = TypeVar("T")
log = get_logger(__name__)


class SharedBreaker:
    """A circuit breaker whose state every process sharing the storage sees.

    - ``before_call()`` returns a :class:`Permit` or raises :class:`BreakerOpen`
      (nothing called) or :class:`BreakerStateUnavailable` (state unknown: do not call).
      While closed it costs no Redis command unless the cached view is older than the
      board's ``cache_ttl_s``. Once the reset timeout has passed, exactly one caller in
      the cluster gets a trial permit (a lease in Redis, ``SET NX PX``).
    - ``on_success(permit)`` / ``on_failure(permit, exc)`` record the outcome; they never
      raise for a storage error (the outcome is logged as lost and the cached view is
      dropped, so the next ``before_call`` asks the storage again).
    """

    def __init__(
        self,
        board: BreakerBoard,
        name: str,
        storage: BreakerStorage,
        *,
        fail_max: int,
        reset_timeout_s: float,
        exclude: tuple[type[BaseException], ...],
        trial_lease_s: float,
        cache_ttl_s: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self._mono = clock or time.monotonic  # ages the cached view
        self._board = board
        self._storage = storage
        self._cache_ttl_s = cache_ttl_s
        self._trial_lease_s = trial_lease_s
        self._snap: Snapshot | None = None
        self._snap_lock = threading.Lock()  # guards only the swap of the cached view
        self._registered = False
        self.circuit = Circuit(
            self, fail_max=fail_max, reset_timeout=reset_timeout_s, exclude=exclude, name=name
        )
        self.circuit._state_storage = storage  # type: ignore[assignment]

    # -- configuration ---------------------------------------------------------------

    @property
    def fail_max(self) -> int:
        return self.circuit.fail_max

    @property
    def reset_timeout_s(self) -> float:
        return float(self.circuit.reset_timeout)

    def configure(
        self,
        *,
        fail_max: int,
        reset_timeout_s: float,
        exclude: tuple[type[BaseException], ...],
        trial_lease_s: float,
    ) -> None:
        """Apply new settings (a later ``board.breaker()`` call with other values)."""
        if (fail_max, reset_timeout_s) != (self.fail_max, self.reset_timeout_s):
            self._registered = False  # write the new settings with the next read
        self.circuit.fail_max = fail_max
        self.circuit.reset_timeout = reset_timeout_s
        self.circuit._excluded_exceptions = list(exclude)  # type: ignore[arg-type]
        self._trial_lease_s = trial_lease_s

    @property
    def _reset_ms(self) -> int:
        return int(self.reset_timeout_s * 1000)

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (cached up to ``cache_ttl_s``).

        Raises BreakerStateUnavailable when the state has to be read and cannot be.
        """
        return self._current().state

    @property
    def fail_count(self) -> int:
        """Consecutive failures counted so far (cached like ``state``)."""
        return self._current().fail_count

    @property
    def opened_at(self) -> datetime | None:
        return ms_to_datetime(self._current().opened_at_ms)

    def _current(self) -> Snapshot:
        snap = self._snap
        if snap is not None and self._mono() - snap.read_mono < self._cache_ttl_s:
            return snap
        register = not self._registered
        reply = self._ask(
            "read",
            lambda: self._storage.read(
                register=register, fail_max=self.fail_max, reset_ms=self._reset_ms
            ),
        )
        self._registered = True
        return reply.snapshot

    def _absorb(self, reply: Reply) -> None:
        with self._snap_lock:
            current = self._snap
            if current is None or reply.snapshot.now_ms >= current.now_ms:
                self._snap = reply.snapshot
        if reply.changed_from is not None:
            snap = reply.snapshot
            self._board._emit(
                self.name, reply.changed_from, snap.state, snap.fail_count, self.circuit
            )

    def _forget(self) -> None:
        with self._snap_lock:
            self._snap = None

    def _ask(self, op: str, fn: Callable[[], Reply]) -> Reply:
        """Run a storage operation whose answer decides whether to call; fail closed."""
        try:
            reply = fn()
        except RedisError as err:
            self._forget()
            log.error(
                "breaker_state_unavailable",
                name=self.name,
                op=op,
                where=self._board.where,
                error=repr(err),
            )
            raise BreakerStateUnavailable(self.name, self._board.where, repr(err)) from err
        self._absorb(reply)
        return reply

    def _tell(self, op: str, fn: Callable[[], Reply]) -> Reply | None:
        """Record an outcome; a storage error loses it (logged, ``None``), never raises."""
        try:
            reply = fn()
        except RedisError as err:
            self._forget()
            log.warning(
                "breaker_outcome_not_recorded",
                name=self.name,
                op=op,
                where=self._board.where,
                error=repr(err),
            )
            return None
        self._absorb(reply)
        return reply

    def _notify(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook`` of every pybreaker listener; their exceptions are logged."""
        if not self.circuit._listeners:
            return
        for listener in self.circuit.listeners:
            try:
                getattr(listener, hook)(self.circuit, *args, **kwargs)
            except Exception:
                log.exception(
                    "breaker_listener_failed", name=self.name, listener=repr(listener), hook=hook
                )

    # -- the call path ---------------------------------------------------------------

    def before_call(
        self, func: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any
    ) -> Permit:
        """A permit to call the downstream once.

        ``func`` and its arguments, when given, are only passed on to the listeners'
        ``before_call``. Raises BreakerOpen (with ``remaining_s`` until the next trial)
        while open, or while another caller holds the half-open trial; raises
        BreakerStateUnavailable when the shared state cannot be read.
        """
        permit = self._admit()
        self._notify("before_call", func, *args, **kwargs)
        return permit

    def _admit(self) -> Permit:
        snap = self._current()
        if snap.state == STATE_CLOSED:
            return Permit(self.name, trial=False, epoch=snap.epoch)
        if snap.state == STATE_OPEN:
            remaining_s = snap.remaining_s(self._mono())
            if remaining_s > 0:
                raise BreakerOpen(self.name, remaining_s, ms_to_datetime(snap.opened_at_ms))
        token = uuid.uuid4().hex
        lease_ms = max(1, int(self._trial_lease_s * 1000))
        reply = self._ask("acquire_trial", lambda: self._storage.acquire_trial(token, lease_ms))
        snap = reply.snapshot
        if reply.verdict == "closed":
            return Permit(self.name, trial=False, epoch=snap.epoch)
        if reply.verdict == "trial":
            return Permit(self.name, trial=True, epoch=snap.epoch, token=token)
        wait_s = reply.wait_ms / 1000
        if reply.verdict == "busy":
            # The trial usually ends long before its lease; if it fails a fresh reset
            # timeout starts anyway, so waiting longer than that gains nothing.
            wait_s = min(wait_s, self.reset_timeout_s)
        raise BreakerOpen(self.name, wait_s, ms_to_datetime(snap.opened_at_ms), state=snap.state)

    def on_success(self, permit: Permit) -> None:
        """Record a successful call. Writes only when there is a failure count to zero."""
        self._check(permit)
        if permit.trial:
            token = permit.token or ""
            self._tell(
                "finish_trial", lambda: self._storage.finish_trial(token, True, self._reset_ms)
            )
        else:
            snap = self._snap
            if snap is None or (
                snap.state == STATE_CLOSED and snap.epoch == permit.epoch and snap.fail_count > 0
            ):
                self._tell("record_success", lambda: self._storage.record_success(permit.epoch))
        self._notify("success")

    def on_failure(self, permit: Permit, exc: BaseException) -> None:
        """Record a failed call.

        An excluded exception counts as a success. A ``BaseException`` that is not an
        ``Exception`` (KeyboardInterrupt, SystemExit, GeneratorExit: the caller is going
        away) is no verdict on the downstream: a trial's lease is released, nothing is
        counted, no listener is told.
        """
        self._failed(permit, exc)

    def _failed(self, permit: Permit, exc: BaseException) -> bool:
        """:meth:`on_failure`; whether this failure opened the breaker."""
        self._check(permit)
        if not isinstance(exc, Exception):
            self.abandon(permit)
            return False
        if not self.circuit.is_system_error(exc):
            self.on_success(permit)
            return False
        self._notify("failure", exc)
        if permit.trial:
            token = permit.token or ""
            reply = self._tell(
                "finish_trial", lambda: self._storage.finish_trial(token, False, self._reset_ms)
            )
        else:
            reply = self._tell(
                "record_failure",
                lambda: self._storage.record_failure(permit.epoch, self.fail_max, self._reset_ms),
            )
        return (
            reply is not None
            and reply.changed_from is not None
            and reply.snapshot.state == STATE_OPEN
        )

    def _settle_failure(self, permit: Permit, exc: BaseException, new_error_on_trip: bool) -> None:
        """Record ``exc``; when it opened the breaker and ``new_error_on_trip``, raise
        pybreaker.CircuitBreakerError from it (pybreaker's ``throw_new_error_on_trip``).
        """
        if self._failed(permit, exc) and new_error_on_trip:
            what = "Trial call failed" if permit.trial else "Failures threshold reached"
            raise pybreaker.CircuitBreakerError(f"{what}, circuit breaker opened") from exc

    def abandon(self, permit: Permit) -> None:
        """Give a permit back unused (the call was not made): no verdict is recorded.

        A half-open trial's cluster-wide lease is released so another caller can try.
        """
        self._check(permit)
        if permit.trial:
            token = permit.token or ""
            self._tell("abandon_trial", lambda: self._storage.abandon_trial(token))

    def _check(self, permit: Permit) -> None:
        if permit.name != self.name:
            raise ValueError(f"permit of breaker {permit.name!r} given to breaker {self.name!r}")

    def call(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)`` through the breaker; its exception propagates as is.

        Raises BreakerOpen / BreakerStateUnavailable before calling. No lock is held
        while ``func`` runs. A generator is judged when it ends (see the module doc).
        """
        return self._guarded(func, args, kwargs, new_error_on_trip=False)

    def calling(self) -> contextlib.AbstractContextManager[Permit]:
        """``with breaker.calling(): ...`` guards the block like :meth:`call`."""
        return self._guarded_block(new_error_on_trip=False)

    def _guarded(
        self,
        func: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        new_error_on_trip: bool,
    ) -> T:
        permit = self.before_call(func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self._settle_failure(permit, exc, new_error_on_trip)
            raise
        if isinstance(result, types.GeneratorType):
            return self._guarded_generator(permit, result, new_error_on_trip)  # type: ignore[return-value]
        self.on_success(permit)
        return result

    def _guarded_generator(
        self, permit: Permit, inner: Generator[Any, Any, Any], new_error_on_trip: bool
    ) -> Generator[Any, Any, Any]:
        # A generator that is never started never runs this: its permit is left to
        # lapse (a trial's lease expires after trial_lease_s).
        try:
            result = yield from inner
        except BaseException as exc:
            self._settle_failure(permit, exc, new_error_on_trip)
            raise
        self.on_success(permit)
        return result

    @contextlib.contextmanager
    def _guarded_block(self, *, new_error_on_trip: bool) -> Iterator[Permit]:
        permit = self.before_call()
        try:
            yield permit
        except BaseException as exc:
            self._settle_failure(permit, exc, new_error_on_trip)
            raise
        self.on_success(permit)

    # -- operator --------------------------------------------------------------------

    def reset(self) -> None:
        """Close the breaker and zero its counter, for every process."""
        self._ask("reset", self._storage.reset)

    def force_open(self) -> None:
        """Open the breaker now, for every process (a fresh reset timeout starts)."""
        self._ask("force_open", lambda: self._storage.force_open(self._reset_ms))

    def __repr__(self) -> str:
        return f"<SharedBreaker {self.name} fail_max={self.fail_max}>"
