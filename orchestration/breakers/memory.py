"""A breaker's state in process memory: the embedded default, no servers (and the same
state for coroutines: :class:`AsyncMemoryBreakerStorage`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pybreaker

from orchestration.breakers.model import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    BreakerInfo,
    Reply,
    Snapshot,
    ms_to_datetime,
)


class MemoryBreakerStorage(pybreaker.CircuitMemoryStorage):
    """One breaker's state in this process (the embedded default, no servers).

    The same operations as :class:`RedisBreakerStorage`, each under a lock held only
    for the bookkeeping, never across the guarded call. ``clock`` (epoch seconds)
    replaces ``time.time`` and ``time.monotonic`` (tests).
    """

    def __init__(self, name: str, *, clock: Callable[[], float] | None = None) -> None:
        super().__init__(STATE_CLOSED)
        self.breaker_name = name
        self._clock = clock or time.time
        self._mono = clock or time.monotonic
        self._lock = threading.Lock()
        self._epoch = 0
        self._opened_at_ms: int | None = None
        self._next_trial_ms: int | None = None
        self._lease: tuple[str, int] | None = None  # token, expires at (ms)
        self.fail_max: int | None = None
        self.reset_timeout_ms: int | None = None

    def _reply(
        self, now: int, changed: str | None = None, verdict: str = "", wait: int = 0
    ) -> Reply:
        snap = Snapshot(
            self._state,
            self._fail_counter,
            self._epoch,
            self._opened_at_ms,
            self._next_trial_ms if self._state == STATE_OPEN else None,
            now,
            self._mono(),
        )
        return Reply(snap, changed, verdict, wait)

    def _lease_holder(self, now: int) -> str | None:
        if self._lease is not None and self._lease[1] <= now:
            self._lease = None
        return self._lease[0] if self._lease else None

    def _open(self, now: int, reset_ms: int) -> str:
        old, self._state = self._state, STATE_OPEN
        self._opened_at_ms, self._next_trial_ms = now, now + reset_ms
        self._opened_at = ms_to_datetime(now)
        self._lease = None
        self._success_counter = 0
        return old

    def _close(self) -> str | None:
        old, self._state = self._state, STATE_CLOSED
        self._fail_counter, self._epoch = 0, self._epoch + 1
        self._opened_at_ms = self._next_trial_ms = self._opened_at = None
        self._lease = None
        self._success_counter = 0
        return old if old != STATE_CLOSED else None

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def read(self, *, register: bool = False, fail_max: int = 0, reset_ms: int = 0) -> Reply:
        with self._lock:
            if register:
                self.fail_max, self.reset_timeout_ms = fail_max, reset_ms
            return self._reply(self._now())

    def record_failure(self, epoch: int, fail_max: int, reset_ms: int) -> Reply:
        with self._lock:
            now = self._now()
            if self._state != STATE_CLOSED or epoch != self._epoch:
                return self._reply(now)
            self._fail_counter += 1
            changed = self._open(now, reset_ms) if self._fail_counter >= fail_max else None
            return self._reply(now, changed, "counted")

    def record_success(self, epoch: int) -> Reply:
        with self._lock:
            if self._state == STATE_CLOSED and epoch == self._epoch:
                self._fail_counter = 0
            return self._reply(self._now())

    def acquire_trial(self, token: str, lease_ms: int) -> Reply:
        with self._lock:
            now = self._now()
            if self._state == STATE_CLOSED:
                return self._reply(now, verdict="closed")
            due = self._next_trial_ms or 0
            if self._state == STATE_OPEN and now < due:
                return self._reply(now, verdict="open", wait=due - now)
            if self._lease_holder(now) is not None:
                return self._reply(now, verdict="busy", wait=self._lease[1] - now)  # type: ignore[index]
            self._lease = (token, now + lease_ms)
            changed = None
            if self._state != STATE_HALF_OPEN:
                changed, self._state = self._state, STATE_HALF_OPEN
            return self._reply(now, changed, "trial")

    def finish_trial(self, token: str, ok: bool, reset_ms: int) -> Reply:
        with self._lock:
            now = self._now()
            holder = self._lease_holder(now)
            if self._state != STATE_HALF_OPEN or holder not in (None, token):
                return self._reply(now)
            changed = self._close() if ok else self._open(now, reset_ms)
            return self._reply(now, changed, "applied")

    def abandon_trial(self, token: str) -> Reply:
        with self._lock:
            now = self._now()
            if self._lease_holder(now) == token:
                self._lease = None
            return self._reply(now)

    def reset(self, *, known_only: bool = False) -> Reply:
        with self._lock:
            changed = self._close()
            return self._reply(self._now(), changed, "applied")

    def force_open(self, reset_ms: int) -> Reply:
        with self._lock:
            now = self._now()
            old = self._open(now, reset_ms)  # open already: a fresh reset timeout
            return self._reply(now, old if old != STATE_OPEN else None, "applied")

    def info(self) -> BreakerInfo:
        """This breaker as an operator sees it."""
        with self._lock:
            now = self._now()
            return BreakerInfo(
                name=self.breaker_name,
                state=self._state,
                fail_count=self._fail_counter,
                fail_max=self.fail_max,
                reset_timeout_s=self.reset_timeout_ms / 1000 if self.reset_timeout_ms else None,
                opened_at=ms_to_datetime(self._opened_at_ms),
                next_trial_at=ms_to_datetime(self._next_trial_ms)
                if self._state == STATE_OPEN
                else None,
                trial_in_progress=self._lease_holder(now) is not None,
            )


class AsyncMemoryBreakerStorage:
    """:class:`MemoryBreakerStorage`'s operations as coroutines, on the same state.

    Each is a short critical section in process memory, run in place: it never waits on
    anything, so it does not block the event loop.
    """

    def __init__(self, memory: MemoryBreakerStorage) -> None:
        self.memory = memory

    async def read(self, *, register: bool = False, fail_max: int = 0, reset_ms: int = 0) -> Reply:
        return self.memory.read(register=register, fail_max=fail_max, reset_ms=reset_ms)

    async def record_failure(self, epoch: int, fail_max: int, reset_ms: int) -> Reply:
        return self.memory.record_failure(epoch, fail_max, reset_ms)

    async def record_success(self, epoch: int) -> Reply:
        return self.memory.record_success(epoch)

    async def acquire_trial(self, token: str, lease_ms: int) -> Reply:
        return self.memory.acquire_trial(token, lease_ms)

    async def finish_trial(self, token: str, ok: bool, reset_ms: int) -> Reply:
        return self.memory.finish_trial(token, ok, reset_ms)

    async def abandon_trial(self, token: str) -> Reply:
        return self.memory.abandon_trial(token)

    async def reset(self, *, known_only: bool = False) -> Reply:
        return self.memory.reset(known_only=known_only)

    async def force_open(self, reset_ms: int) -> Reply:
        return self.memory.force_open(reset_ms)
