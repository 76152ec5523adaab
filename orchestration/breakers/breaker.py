"""SharedBreaker: one downstream's breaker, its state shared through a storage.

The call path is split in three (``before_call`` -> the caller's own call ->
``on_success``/``on_failure``) so no lock is ever held while the downstream runs, and so
the execute hop can turn a refusal into a deferral. It exists twice over the same
decisions (:mod:`.core`) and the same cached view: blocking, for threads, and awaited,
for coroutines (``abefore_call``, ``aon_success``, ``aon_failure``, ``aabandon``; the
Redis round trips go through ``redis.asyncio`` and never block the event loop). A sync
and an async caller in one process, or in many, see one state and pay the same number
of Redis commands. :mod:`.guards` wraps a call or a block in either path;
:class:`.circuit.Circuit` is the pybreaker ``CircuitBreaker`` underneath: it holds the
configuration (``fail_max``, ``reset_timeout``, excluded exceptions, listeners) and
routes pybreaker's own entry points (``call``, ``call_async``, the decorator,
``calling()``, ``open()``/``close()``) to the shared, atomic path.

pybreaker's options, as this breaker takes them:

- Listeners (``breaker.circuit.add_listener``): ``before_call``, ``success``,
  ``failure`` and ``state_change`` are called in pybreaker's order, in the process that
  made the call or the change; ``before_call`` gets ``func=None`` from a bare
  ``before_call()``. A listener's exception is logged, never raised. On the coroutine
  path they are called on the event loop (they are plain functions, as in pybreaker).
- A guarded generator (``call``/the decorator on a generator function) is judged when
  it ends: exhausted is a success, an exception a failure; closed early (the consumer
  stopped) gives no verdict, like ``abandon``. Its permit, a half-open trial's lease
  included, is held until then.
- A cancelled coroutine (``asyncio.CancelledError``) gives no verdict either, like any
  ``BaseException`` that is not an ``Exception``: nothing counted, no listener told, a
  trial's lease released at once.
- ``throw_new_error_on_trip`` (pybreaker's default, on): the failure that opens the
  breaker raises ``pybreaker.CircuitBreakerError`` from the downstream's error when it
  came through the circuit's ``call``, ``call_async``, decorator, ``calling()`` or
  ``acalling()``. ``SharedBreaker``'s own ``call``/``calling``/``acall``/``acalling``
  and ``on_failure``/``aon_failure`` (the workers' path) always let the downstream's
  error through.
- ``success_threshold`` is refused (ConfigurationError) unless 1: half-open is one
  cluster-wide trial, and its success closes the breaker for every process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

from redis.exceptions import RedisError

from orchestration.breakers.circuit import Circuit
from orchestration.breakers.core import BreakerCore, StorageOp, Verdict
from orchestration.breakers.guards import Guards
from orchestration.breakers.model import Permit, Reply, Snapshot, ms_to_datetime
from orchestration.breakers.storage import AsyncBreakerStorage, BreakerStorage
from orchestration.errors import BreakerStateUnavailable
from orchestration.logging import get_logger

if TYPE_CHECKING:
    from orchestration.breakers.board import BreakerBoard

log = get_logger(__name__)


class SharedBreaker(Guards, BreakerCore):
    """A circuit breaker whose state every process sharing the storage sees.

    - ``before_call()`` returns a :class:`Permit` or raises :class:`BreakerOpen`
      (nothing called) or :class:`BreakerStateUnavailable` (state unknown: do not call).
      While closed it costs no Redis command unless the cached view is older than the
      board's ``cache_ttl_s``. Once the reset timeout has passed, exactly one caller in
      the cluster gets a trial permit (a lease in Redis, ``SET NX PX``).
    - ``on_success(permit)`` / ``on_failure(permit, exc)`` record the outcome; they never
      raise for a storage error (the outcome is logged as lost and the cached view is
      dropped, so the next ``before_call`` asks the storage again).
    - ``abefore_call``, ``aon_success``, ``aon_failure``, ``aabandon``: the same, awaited,
      on the board's ``redis.asyncio`` client for the running event loop. A permit from
      either path may be settled on either.
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
        super().__init__(
            board, name, trial_lease_s=trial_lease_s, cache_ttl_s=cache_ttl_s, clock=clock
        )
        self._storage = storage
        self.circuit = Circuit(
            self, fail_max=fail_max, reset_timeout=reset_timeout_s, exclude=exclude, name=name
        )
        self.circuit._state_storage = storage  # type: ignore[assignment]

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (cached up to ``cache_ttl_s``).

        Raises BreakerStateUnavailable when the state has to be read and cannot be.
        """
        return self._current().state

    async def astate(self) -> str:
        """:attr:`state`, read without blocking the event loop."""
        return (await self._acurrent()).state

    @property
    def fail_count(self) -> int:
        """Consecutive failures counted so far (cached like ``state``)."""
        return self._current().fail_count

    @property
    def opened_at(self) -> datetime | None:
        return ms_to_datetime(self._current().opened_at_ms)

    def _current(self) -> Snapshot:
        snap = self._fresh()
        if snap is not None:
            return snap
        reply = self._ask(self._read_op())
        self._registered = True
        return reply.snapshot

    async def _acurrent(self) -> Snapshot:
        snap = self._fresh()
        if snap is not None:
            return snap
        reply = await self._aask(self._read_op())
        self._registered = True
        return reply.snapshot

    # -- asking the storage ------------------------------------------------------------

    def _ask(self, op: StorageOp) -> Reply:
        """Run an operation whose answer decides whether to call; fail closed."""
        try:
            reply: Reply = op.run(self._storage)
        except RedisError as err:
            self._unavailable(op, err)
        self._absorb(reply)
        return reply

    async def _aask(self, op: StorageOp) -> Reply:
        """:meth:`_ask`, awaited. A cancellation that arrives meanwhile is raised, also
        when redis-py finished the command and swallowed it (see docs/design.md)."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            reply: Reply = await op.run(self._async_storage())
        except RedisError as err:
            self._unavailable(op, err)
        self._absorb(reply)
        if task is not None and task.cancelling() > cancels:
            # redis-py sends through asyncio.wait_for, which on Python 3.11 returns the
            # finished send and drops a cancel that came meanwhile: the caller's time
            # limit or cancel would be lost, and the guarded call made after all.
            raise asyncio.CancelledError
        return reply

    def _unavailable(self, op: StorageOp, err: RedisError) -> NoReturn:
        self._forget()
        log.error(
            "breaker_state_unavailable",
            name=self.name,
            op=op.name,
            where=self._board.where,
            error=repr(err),
        )
        raise BreakerStateUnavailable(self.name, self._board.where, repr(err)) from err

    def _tell(self, op: StorageOp | None) -> Reply | None:
        """Record an outcome; a storage error loses it (logged, ``None``), never raises."""
        if op is None:
            return None
        try:
            reply: Reply = op.run(self._storage)
        except RedisError as err:
            self._lost(op, err)
            return None
        self._absorb(reply)
        return reply

    async def _atell(self, op: StorageOp | None) -> Reply | None:
        """:meth:`_tell`, awaited. Shielded: the call has happened, so its outcome is
        recorded even when the caller is cancelled again while it is being written."""
        if op is None:
            return None
        return await asyncio.shield(self._atell_now(op, self._async_storage()))

    async def _atell_now(self, op: StorageOp, storage: AsyncBreakerStorage) -> Reply | None:
        try:
            reply: Reply = await op.run(storage)
        except RedisError as err:
            self._lost(op, err)
            return None
        self._absorb(reply)
        return reply

    def _lost(self, op: StorageOp, err: RedisError) -> None:
        self._forget()
        log.warning(
            "breaker_outcome_not_recorded",
            name=self.name,
            op=op.name,
            where=self._board.where,
            error=repr(err),
        )

    def _async_storage(self) -> AsyncBreakerStorage:
        """This breaker's async storage on the running event loop (redis.asyncio clients
        belong to one loop; the board keeps one per loop). Asked for only when a
        Redis command is about to be sent."""
        return self._board._async_storage(self.name, asyncio.get_running_loop())

    # -- the call path, for threads ----------------------------------------------------

    def before_call(
        self, func: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any
    ) -> Permit:
        """A permit to call the downstream once.

        ``func`` and its arguments, when given, are only passed on to the listeners'
        ``before_call``. Raises BreakerOpen (with ``remaining_s`` until the next trial)
        while open, or while another caller holds the half-open trial; raises
        BreakerStateUnavailable when the shared state cannot be read.
        """
        permit = self._admission(self._current())
        if permit is None:
            token, op = self._trial_op()
            permit = self._trial_permit(self._ask(op), token)
        self._notify("before_call", func, *args, **kwargs)
        return permit

    def on_success(self, permit: Permit) -> None:
        """Record a successful call. Writes only when there is a failure count to zero."""
        self._check(permit)
        self._tell(self._success_op(permit))
        self._notify("success")

    def on_failure(self, permit: Permit, exc: BaseException) -> None:
        """Record a failed call.

        An excluded exception counts as a success. A ``BaseException`` that is not an
        ``Exception`` (KeyboardInterrupt, SystemExit, GeneratorExit,
        asyncio.CancelledError: the caller is going away) is no verdict on the
        downstream: a trial's lease is released, nothing is counted, no listener is told.
        """
        self._failed(permit, exc)

    def _failed(self, permit: Permit, exc: BaseException) -> bool:
        """:meth:`on_failure`; whether this failure opened the breaker."""
        self._check(permit)
        verdict = self._verdict(exc)
        if verdict is Verdict.NONE:
            self.abandon(permit)
            return False
        if verdict is Verdict.SUCCESS:
            self.on_success(permit)
            return False
        self._notify("failure", exc)
        return self._opened(self._tell(self._failure_op(permit)))

    def _settle_failure(self, permit: Permit, exc: BaseException, new_error_on_trip: bool) -> None:
        """Record ``exc``; when it opened the breaker and ``new_error_on_trip``, raise
        pybreaker.CircuitBreakerError from it (pybreaker's ``throw_new_error_on_trip``).
        """
        if self._failed(permit, exc) and new_error_on_trip:
            raise self._trip_error(permit) from exc

    def abandon(self, permit: Permit) -> None:
        """Give a permit back unused (the call was not made): no verdict is recorded.

        A half-open trial's cluster-wide lease is released so another caller can try.
        """
        self._check(permit)
        self._tell(self._abandon_op(permit))

    # -- the call path, for coroutines -------------------------------------------------

    async def abefore_call(
        self, func: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any
    ) -> Permit:
        """:meth:`before_call`, awaited. Cancelled while asking for the trial, it gives
        the lease back (whether or not the request got it)."""
        permit = self._admission(await self._acurrent())
        if permit is None:
            token, op = self._trial_op()
            try:
                reply = await self._aask(op)
            except asyncio.CancelledError:
                await self._atell(StorageOp("abandon_trial", (token,)))
                raise
            permit = self._trial_permit(reply, token)
        self._notify("before_call", func, *args, **kwargs)
        return permit

    async def aon_success(self, permit: Permit) -> None:
        """:meth:`on_success`, awaited."""
        self._check(permit)
        await self._atell(self._success_op(permit))
        self._notify("success")

    async def aon_failure(self, permit: Permit, exc: BaseException) -> None:
        """:meth:`on_failure`, awaited: ``asyncio.CancelledError`` is no verdict."""
        await self._afailed(permit, exc)

    async def _afailed(self, permit: Permit, exc: BaseException) -> bool:
        self._check(permit)
        verdict = self._verdict(exc)
        if verdict is Verdict.NONE:
            await self.aabandon(permit)
            return False
        if verdict is Verdict.SUCCESS:
            await self.aon_success(permit)
            return False
        self._notify("failure", exc)
        return self._opened(await self._atell(self._failure_op(permit)))

    async def _asettle_failure(
        self, permit: Permit, exc: BaseException, new_error_on_trip: bool
    ) -> None:
        if await self._afailed(permit, exc) and new_error_on_trip:
            raise self._trip_error(permit) from exc

    async def aabandon(self, permit: Permit) -> None:
        """:meth:`abandon`, awaited."""
        self._check(permit)
        await self._atell(self._abandon_op(permit))

    # -- operator --------------------------------------------------------------------

    def reset(self) -> None:
        """Close the breaker and zero its counter, for every process."""
        self._ask(StorageOp("reset"))

    def force_open(self) -> None:
        """Open the breaker now, for every process (a fresh reset timeout starts)."""
        self._ask(StorageOp("force_open", (self._reset_ms,)))

    def __repr__(self) -> str:
        return f"<SharedBreaker {self.name} fail_max={self.fail_max}>"
