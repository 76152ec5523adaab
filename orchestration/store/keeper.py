"""The lease keeper: renews the execution leases of the handlers running in a process."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from sqlalchemy import update

from orchestration.logging import get_logger
from orchestration.models import tasks_table
from orchestration.store.db import Database

log = get_logger("taskrail.leases")

# A held lease is renewed when this share of its TTL is left.
RENEW_MARGIN_FRACTION = 1 / 3


class LeaseKeeper:
    """Renews the leases of the handlers running in this process.

    One background thread per process renews a held lease when a third of its TTL is
    left, all leases due together in a single statement; a handler that ends before
    that costs no renewal at all. When the process dies the renewals stop, the leases
    expire and the sweeper re-drives.

    ``clock`` gives the time in epoch seconds. With ``background=False`` no thread is
    started: the caller drives the wake-ups with :meth:`wake_once` (tests, with a fake
    clock).
    """

    def __init__(
        self,
        db: Database,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.margin_s = ttl_s * RENEW_MARGIN_FRACTION
        self.clock = clock
        self.background = background
        self._held: dict[str, tuple[int, float]] = {}  # token -> (task_id, expires epoch s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # epoch s the keeper's thread wakes up next (by itself)

    @contextlib.contextmanager
    def hold(self, task_id: int, token: str, expires_at: float | None = None) -> Iterator[None]:
        """Keep the lease ``token`` on ``task_id`` alive while the block runs.

        ``expires_at`` (epoch seconds) is when the lease lapses now; by default a full
        TTL from now (a lease just claimed). A nested hold of the same token keeps the
        outer one's record.
        """
        expires = self.clock() + self.ttl_s if expires_at is None else expires_at
        with self._lock:
            nested = token in self._held
            if not nested:
                self._held[token] = (task_id, expires)
            if self.background and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(
                    target=self._run, name="taskrail-lease-keeper", daemon=True
                )
                self._thread.start()
            # Wake the keeper only if this lease is due before it wakes up anyway: a
            # lease taken after the others is due after them.
            sooner = expires - self.margin_s < self._wakes_at
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
                for token, (_, expires) in self._held.items()
                if everything or expires - now <= self.margin_s
            ]
        if not tokens:
            return 0
        t = tasks_table
        until = now + self.ttl_s
        with self.db.connect(autocommit=True) if self.db.is_postgres else self.db.begin() as conn:
            result = conn.execute(
                update(t)
                .where(t.c.lease_owner.in_(tokens))
                .values(lease_expires_at=datetime.fromtimestamp(until, UTC))
            )
        with self._lock:
            for token in tokens:
                if token in self._held:
                    self._held[token] = (self._held[token][0], until)
        return result.rowcount

    def renew_all(self) -> int:
        """Renew every held lease now; returns how many rows were extended."""
        return self.renew_due(everything=True)

    def next_wait_s(self) -> float:
        """Seconds until the earliest held lease is due, noted as the keeper's wake-up."""
        with self._lock:
            earliest = min((expires for _, expires in self._held.values()), default=None)
            now = self.clock()
            due_s = self.ttl_s if earliest is None else max(0.0, earliest - self.margin_s - now)
            self._wakes_at = now + due_s
        return due_s

    def wake_once(self, wait: Callable[[float], object]) -> int:
        """One pass of the keeper's thread: ``wait`` until the next lease is due, renew.

        ``wait(seconds)`` returns early when a hold asks for it (the thread waits on its
        event). Returns how many rows were extended; raises what the renewal raises.
        """
        wait(self.next_wait_s())
        self._wake.clear()
        return self.renew_due()

    def _run(self) -> None:
        while True:
            try:
                self.wake_once(self._wake.wait)
            except Exception as err:  # keep renewing; the next pass may work
                log.warning("lease_renewal_failed", error=str(err))
                time.sleep(min(1.0, self.margin_s / 4))
