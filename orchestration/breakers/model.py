"""The breakers' value types and their refusal, :class:`BreakerOpen`: what callers catch
and what operators see. Their errors are in :mod:`orchestration.errors`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pybreaker

STATE_CLOSED = pybreaker.STATE_CLOSED
STATE_OPEN = pybreaker.STATE_OPEN
STATE_HALF_OPEN = pybreaker.STATE_HALF_OPEN


def ms_to_datetime(value_ms: int | None) -> datetime | None:
    """A UTC datetime from milliseconds since the epoch (``None`` stays ``None``)."""
    return None if value_ms is None else datetime.fromtimestamp(value_ms / 1000, tz=UTC)


class BreakerOpen(pybreaker.CircuitBreakerError):
    """The breaker refuses the call; nothing was called.

    ``remaining_s`` is how long until a trial call may be let through (defer the hop by
    about that much); ``state`` is ``open`` or ``half-open`` (another caller holds the
    trial lease).
    """

    def __init__(
        self, name: str, remaining_s: float, opened_at: datetime | None, state: str = STATE_OPEN
    ) -> None:
        self.name = name
        self.remaining_s = max(0.0, remaining_s)
        self.opened_at = opened_at
        self.state = state
        super().__init__(
            f"breaker {name} is {state}; next trial in {self.remaining_s:.1f}s"
            + (f" (open since {opened_at.isoformat()})" if opened_at else "")
        )

    def fields(self) -> dict[str, Any]:
        """The refusal's facts as key-value pairs for a log line."""
        return {
            "breaker": self.name,
            "state": self.state,
            "remaining_s": round(self.remaining_s, 3),
            "opened_at": self.opened_at.isoformat() if self.opened_at else None,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read of a breaker's shared state, with the storage clock at the read."""

    state: str
    fail_count: int
    epoch: int  # bumped on every close: failures of calls admitted before it are stale
    opened_at_ms: int | None
    next_trial_ms: int | None
    now_ms: int  # storage clock (Redis TIME) when read
    read_mono: float  # local monotonic clock when read

    def remaining_s(self, mono_now: float) -> float:
        """Seconds until the next trial, as of ``mono_now``; 0 when due or not open."""
        if self.next_trial_ms is None:
            return 0.0
        elapsed_ms = (mono_now - self.read_mono) * 1000
        return max(0.0, (self.next_trial_ms - self.now_ms - elapsed_ms) / 1000)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a storage operation returns: the state after it, and what it changed."""

    snapshot: Snapshot
    changed_from: str | None = None  # the old state when this operation made a transition
    verdict: str = ""  # per operation: counted / closed / open / trial / busy / applied / unknown
    wait_ms: int = 0  # for open / busy verdicts: how long until a trial may be tried


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call, handed back to ``on_success``/``on_failure``. Opaque."""

    name: str
    trial: bool
    epoch: int
    token: str | None = None


@dataclass(frozen=True, slots=True)
class BreakerStateChange:
    """One transition, as passed to ``BreakerBoard(on_state_change=...)``."""

    name: str
    old: str
    new: str
    fail_count: int
    at: datetime


@dataclass(frozen=True, slots=True)
class BreakerInfo:
    """A breaker as an operator sees it (``taskrail breakers``)."""

    name: str
    state: str
    fail_count: int
    fail_max: int | None
    reset_timeout_s: float | None
    opened_at: datetime | None
    next_trial_at: datetime | None
    trial_in_progress: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings."""
        return {
            "name": self.name,
            "state": self.state,
            "fail_count": self.fail_count,
            "fail_max": self.fail_max,
            "reset_timeout_s": self.reset_timeout_s,
            "opened_at": self.opened_at.isoformat() if self.opened_at else None,
            "next_trial_at": self.next_trial_at.isoformat() if self.next_trial_at else None,
            "trial_in_progress": self.trial_in_progress,
        }
