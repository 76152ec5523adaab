"""What a shared breaker decides, apart from how it asks its storage.

:class:`BreakerCore` holds a breaker's configuration (through its pybreaker
:class:`.circuit.Circuit`), the in-process cached view of the shared state, the
listeners, and every decision of the call path as a pure step: which storage operation
to run (a :class:`StorageOp`) and what its reply means. :class:`.breaker.SharedBreaker`
runs those operations twice over, on a blocking storage for threads and on an awaited
one for coroutines; both paths make the same decisions on the same cached view, so they
cost the same Redis commands and see one state.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import pybreaker

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
from orchestration.logging import get_logger

if TYPE_CHECKING:
    from orchestration.breakers.board import BreakerBoard

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StorageOp:
    """One storage operation: the method's name (also the log line's ``op``) and its
    arguments. The same op runs on a blocking storage or, awaited, on an async one."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, storage: Any) -> Any:
        """``storage.<name>(*args, **kwargs)``: a Reply, or an awaitable of one."""
        return getattr(storage, self.name)(*self.args, **self.kwargs)


class Verdict(Enum):
    """What an exception out of a guarded call says about the downstream."""

    NONE = "none"  # not an Exception (cancelled, interrupted, closed): the caller went away
    SUCCESS = "success"  # an excluded exception: the downstream answered
    FAILURE = "failure"


class BreakerCore:
    """A breaker's configuration, cached view, listeners and decisions (no I/O here).

    The subclass makes ``circuit``, which holds ``fail_max``, the reset timeout, the
    excluded exceptions and the listeners.
    """

    circuit: Circuit

    def __init__(
        self,
        board: BreakerBoard,
        name: str,
        *,
        trial_lease_s: float,
        cache_ttl_s: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self._mono = clock or time.monotonic  # ages the cached view
        self._board = board
        self._cache_ttl_s = cache_ttl_s
        self._trial_lease_s = trial_lease_s
        self._snap: Snapshot | None = None
        self._snap_lock = threading.Lock()  # guards only the swap of the cached view
        self._registered = False

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

    # -- the cached view -------------------------------------------------------------

    def _fresh(self) -> Snapshot | None:
        """The cached view while younger than ``cache_ttl_s``, else ``None`` (read it)."""
        snap = self._snap
        if snap is not None and self._mono() - snap.read_mono < self._cache_ttl_s:
            return snap
        return None

    def _read_op(self) -> StorageOp:
        # The first read (and the first after new settings) registers the breaker.
        return StorageOp(
            "read",
            kwargs={
                "register": not self._registered,
                "fail_max": self.fail_max,
                "reset_ms": self._reset_ms,
            },
        )

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

    # -- listeners -------------------------------------------------------------------

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

    # -- decisions -------------------------------------------------------------------

    def _admission(self, snap: Snapshot) -> Permit | None:
        """A permit from the view alone, ``None`` when a trial must be asked for.

        Raises BreakerOpen while open and the reset timeout has not passed.
        """
        if snap.state == STATE_CLOSED:
            return Permit(self.name, trial=False, epoch=snap.epoch)
        if snap.state == STATE_OPEN:
            remaining_s = snap.remaining_s(self._mono())
            if remaining_s > 0:
                raise BreakerOpen(self.name, remaining_s, ms_to_datetime(snap.opened_at_ms))
        return None

    def _trial_op(self) -> tuple[str, StorageOp]:
        """A fresh token and the operation that asks for the trial lease with it."""
        token = uuid.uuid4().hex
        lease_ms = max(1, int(self._trial_lease_s * 1000))
        return token, StorageOp("acquire_trial", (token, lease_ms))

    def _trial_permit(self, reply: Reply, token: str) -> Permit:
        """The permit the trial request's ``reply`` grants; raises BreakerOpen if none."""
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

    def _success_op(self, permit: Permit) -> StorageOp | None:
        """What records a success: a trial's close, or zeroing a failure count (only
        when the view shows one, or shows nothing); ``None`` when nothing needs writing."""
        if permit.trial:
            return StorageOp("finish_trial", (permit.token or "", True, self._reset_ms))
        snap = self._snap
        if snap is None or (
            snap.state == STATE_CLOSED and snap.epoch == permit.epoch and snap.fail_count > 0
        ):
            return StorageOp("record_success", (permit.epoch,))
        return None

    def _verdict(self, exc: BaseException) -> Verdict:
        if not isinstance(exc, Exception):
            return Verdict.NONE
        if not self.circuit.is_system_error(exc):
            return Verdict.SUCCESS
        return Verdict.FAILURE

    def _failure_op(self, permit: Permit) -> StorageOp:
        if permit.trial:
            return StorageOp("finish_trial", (permit.token or "", False, self._reset_ms))
        return StorageOp("record_failure", (permit.epoch, self.fail_max, self._reset_ms))

    @staticmethod
    def _abandon_op(permit: Permit) -> StorageOp | None:
        return StorageOp("abandon_trial", (permit.token or "",)) if permit.trial else None

    @staticmethod
    def _opened(reply: Reply | None) -> bool:
        """Whether the operation that answered ``reply`` opened the breaker."""
        return (
            reply is not None
            and reply.changed_from is not None
            and reply.snapshot.state == STATE_OPEN
        )

    @staticmethod
    def _trip_error(permit: Permit) -> pybreaker.CircuitBreakerError:
        """pybreaker's ``throw_new_error_on_trip`` error (raise it from the failure)."""
        what = "Trial call failed" if permit.trial else "Failures threshold reached"
        return pybreaker.CircuitBreakerError(f"{what}, circuit breaker opened")

    def _check(self, permit: Permit) -> None:
        if permit.name != self.name:
            raise ValueError(f"permit of breaker {permit.name!r} given to breaker {self.name!r}")
