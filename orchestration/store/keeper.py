"""The lease keeper: renews the execution leases of the handlers running in a process,
and tells a handler when its task was cancelled."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import BigInteger, String, all_, any_, bindparam, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from orchestration import constants as c
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, tasks_table
from orchestration.store.db import Database

log = get_logger("taskrail.leases")

# A held lease is renewed when this share of its TTL is left.
RENEW_MARGIN_FRACTION = 1 / 3

_t = tasks_table
# On PostgreSQL the keeper's two statements take their ids and tokens as two arrays: the
# same statement text whatever the number of runs held (compiled once, prepared by the
# server), where IN (...) lists cost ~47 ms of CPU a check at 2,500 runs held (~4 ms as
# arrays; docs/performance.md, "Async agents").
_PG_RENEW = (
    update(_t)
    .where(_t.c.lease_owner == any_(bindparam("tokens", type_=ARRAY(String))))
    .values(lease_expires_at=bindparam("until", type_=_t.c.lease_expires_at.type))
)
_PG_CHECK = select(_t.c.id, _t.c.status, _t.c.lease_owner).where(
    _t.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))),
    or_(
        _t.c.status != TaskStatus.IN_PROGRESS,
        _t.c.lease_owner.is_(None),
        _t.c.lease_owner != all_(bindparam("tokens", type_=ARRAY(String))),
    ),
)


@dataclass(slots=True)
class _Lease:
    task_id: int
    expires: float  # epoch s the lease lapses
    stop: threading.Event | None = None  # set when the run is no longer wanted
    watched_from: float = 0.0  # epoch s from which the run is checked for a cancel


@dataclass(frozen=True, slots=True)
class Stopped:
    """A watched run the database no longer gives to its holder."""

    task_id: int
    token: str
    status: str  # the task's status now
    owner: str | None  # the task's lease owner now

    @property
    def cancelled(self) -> bool:
        return self.status == TaskStatus.CANCELLED


class LeaseKeeper:
    """Renews the leases of the handlers running in this process, and stops the runs
    whose task was cancelled.

    One background thread per process renews a held lease when a third of its TTL is
    left, all leases due together in a single statement; a handler that ends before
    that costs no renewal at all. When the process dies the renewals stop, the leases
    expire and the sweeper re-drives.

    A lease held with a ``stop`` event is watched: every ``cancel_poll_s`` while such
    leases are held, one statement asks which of their tasks are no longer in progress
    under this lease (cancelled, or taken over by another worker); for each, the keeper
    sets the run's ``stop`` event (the handler's ``TaskView.cancelled``) and stops
    renewing its lease. A run is first checked ``cancel_poll_s`` after its hold began,
    so a handler that ends sooner costs no check.

    ``clock`` gives the time in epoch seconds. With ``background=False`` no thread is
    started: the caller drives the wake-ups with :meth:`wake_once` (tests, with a fake
    clock).
    """

    def __init__(
        self,
        db: Database,
        ttl_s: float,
        *,
        cancel_poll_s: float = c.DEFAULT_CANCEL_POLL_S,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.margin_s = ttl_s * RENEW_MARGIN_FRACTION
        self.cancel_poll_s = cancel_poll_s
        self.clock = clock
        self.background = background
        self._held: dict[str, _Lease] = {}  # token -> lease
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # epoch s the keeper's thread wakes up next (by itself)
        self._checked_at = float("-inf")  # epoch s of the last cancel check

    @contextlib.contextmanager
    def hold(
        self,
        task_id: int,
        token: str,
        expires_at: float | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> Iterator[None]:
        """Keep the lease ``token`` on ``task_id`` alive while the block runs.

        ``expires_at`` (epoch seconds) is when the lease lapses now; by default a full
        TTL from now (a lease just claimed). ``stop``: watch the run, and set this event
        when its task is cancelled or its lease lost (then the lease is renewed no
        more). A nested hold of the same token keeps the outer one's record.
        """
        now = self.clock()
        expires = now + self.ttl_s if expires_at is None else expires_at
        with self._lock:
            nested = token in self._held
            if not nested:
                self._held[token] = _Lease(task_id, expires, stop, now + self.cancel_poll_s)
            if self.background and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(
                    target=self._run, name="taskrail-lease-keeper", daemon=True
                )
                self._thread.start()
            # Wake the keeper only if this lease is due before it wakes up anyway: a
            # lease taken after the others is due after them.
            due = expires - self.margin_s
            if stop is not None:
                due = min(due, now + self.cancel_poll_s)
            sooner = due < self._wakes_at
        if sooner:
            self._wake.set()  # the keeper recomputes when it must wake up next
        try:
            yield
        finally:
            if not nested:
                with self._lock:
                    self._held.pop(token, None)

    @property
    def wake_requested(self) -> bool:
        """Whether a hold asked the keeper to wake up before its planned time."""
        return self._wake.is_set()

    def renew_due(self, *, everything: bool = False) -> int:
        """Renew the held leases with a third of their TTL or less left (or all of them).

        Returns how many rows were extended.
        """
        now = self.clock()
        with self._lock:
            tokens = [
                token
                for token, lease in self._held.items()
                if everything or lease.expires - now <= self.margin_s
            ]
        if not tokens:
            return 0
        t = tasks_table
        until = now + self.ttl_s
        expires = datetime.fromtimestamp(until, UTC)
        if self.db.is_postgres:
            with self.db.connect(autocommit=True) as conn:
                result = conn.execute(_PG_RENEW, {"tokens": tokens, "until": expires})
        else:
            with self.db.begin() as conn:
                result = conn.execute(
                    update(t).where(t.c.lease_owner.in_(tokens)).values(lease_expires_at=expires)
                )
        with self._lock:
            for token in tokens:
                lease = self._held.get(token)
                if lease is not None:
                    lease.expires = until
        return result.rowcount

    def renew_all(self) -> int:
        """Renew every held lease now; returns how many rows were extended."""
        return self.renew_due(everything=True)

    def _check_due_at(self) -> float | None:
        """When the next cancel check is due (epoch s), or None: no run is watched.
        Call with the lock held."""
        first = min(
            (lease.watched_from for lease in self._held.values() if lease.stop is not None),
            default=None,
        )
        if first is None:
            return None
        return max(first, self._checked_at + self.cancel_poll_s)

    def check_cancelled(self, *, everything: bool = False) -> list[Stopped]:
        """If a cancel check is due (or ``everything``), ask the database in one statement
        which watched runs are no longer theirs: the task left in_progress (cancelled) or
        its lease went to another owner. Sets each one's ``stop`` event and forgets its
        lease (no more renewals). Returns them; raises DatabaseUnavailable.
        """
        now = self.clock()
        with self._lock:
            due_at = self._check_due_at()
            if due_at is None or (not everything and due_at > now):
                return []
            self._checked_at = now
            watched = {token: lease.task_id for token, lease in self._held.items() if lease.stop}
        t = tasks_table
        ids = sorted(set(watched.values()))
        if self.db.is_postgres:
            with self.db.connect(autocommit=True) as conn:
                found = conn.execute(_PG_CHECK, {"ids": ids, "tokens": list(watched)})
                rows = {row.id: row for row in found}
        else:
            query = select(t.c.id, t.c.status, t.c.lease_owner).where(
                t.c.id.in_(ids),
                or_(
                    t.c.status != TaskStatus.IN_PROGRESS,
                    t.c.lease_owner.is_(None),
                    t.c.lease_owner.not_in(list(watched)),
                ),
            )
            with self.db.connect() as conn:
                rows = {row.id: row for row in conn.execute(query)}
        stopped = []
        for token, task_id in watched.items():
            row = rows.get(task_id)
            if row is None or (row.status == TaskStatus.IN_PROGRESS and row.lease_owner == token):
                continue
            stopped.append(Stopped(task_id, token, str(row.status), row.lease_owner))
        with self._lock:
            for run in stopped:
                lease = self._held.pop(run.token, None)
                if lease is not None and lease.stop is not None:
                    lease.stop.set()
        for run in stopped:
            if run.cancelled:
                log.info("run_cancelled", task_id=run.task_id, reason="the task was cancelled")
            else:
                log.warning(
                    "lease_lost",
                    task_id=run.task_id,
                    status=run.status,
                    leased_by=run.owner,
                    reason="the task moved on or another worker took it over",
                )
        return stopped

    def next_wait_s(self) -> float:
        """Seconds until the earliest held lease is due for renewal, or the watched runs
        for a cancel check; noted as the keeper's wake-up."""
        with self._lock:
            earliest = min((lease.expires for lease in self._held.values()), default=None)
            now = self.clock()
            due_s = self.ttl_s if earliest is None else max(0.0, earliest - self.margin_s - now)
            check_at = self._check_due_at()
            if check_at is not None:
                due_s = min(due_s, max(0.0, check_at - now))
            self._wakes_at = now + due_s
        return due_s

    def wake_once(self, wait: Callable[[float], object]) -> int:
        """One pass of the keeper's thread: ``wait`` until the next lease is due, renew
        what is due, and check the watched runs if a check is due.

        ``wait(seconds)`` returns early when a hold asks for it (the thread waits on its
        event). Returns how many rows were extended; raises what the renewal raises,
        after the check. A check that fails is logged (``cancel_check_failed``) and
        made again ``cancel_poll_s`` later.
        """
        wait(self.next_wait_s())
        self._wake.clear()
        renewed: int | Exception
        try:
            renewed = self.renew_due()
        except Exception as err:
            renewed = err
        try:
            self.check_cancelled()
        except Exception as err:
            log.warning("cancel_check_failed", error=str(err))
        if isinstance(renewed, Exception):
            raise renewed
        return renewed

    def _run(self) -> None:
        while True:
            try:
                self.wake_once(self._wake.wait)
            except Exception as err:  # keep renewing; the next pass may work
                log.warning("lease_renewal_failed", error=str(err))
                time.sleep(min(1.0, self.margin_s / 4, self.cancel_poll_s))
