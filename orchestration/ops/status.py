"""What ``taskrail status`` shows: counts by state, throughput, and what is not moving.

Active tasks that have not moved for a while are told apart, each category excluding
the ones before it:

- **stuck** (nothing in flight): what the sweeper re-drives, :data:`recovery.stuck_condition`;
  ``preclaimed`` counts those whose expired lease is a start hop's pre-claim (their
  execute message still queued, or lost: the sweeper re-drives them once the execute
  queue is empty);
- **over time limit**: in_progress under a live lease, unchanged for longer than its
  agent's ``time_limit_s`` (a handler that runs on and on, or a lease kept alive by a
  worker that no longer runs it);
- **deferred**: waiting on an open breaker or a retry backoff (``not_before`` in the
  future, or ``deferred_since`` set): nothing to do but wait.

The sweeper's last pass comes from the row it rewrites on every pass
(:func:`recovery.record_sweep`). Read-only queries, one round trip each, so an
operator (or the metrics endpoint at every scrape) can ask often.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnClause, Integer, and_, bindparam, case, column, func, select, text

from orchestration import constants as c
from orchestration.agents import registry
from orchestration.models import (
    ACTIVE_STATUSES,
    RESTING_STATUSES,
    TaskStatus,
    UTCDateTime,
    tasks_table,
    utcnow,
)
from orchestration.store.db import Database
from orchestration.store.recovery import (
    PRECLAIM_PARAMS,
    PRECLAIMED,
    SweepRecord,
    last_sweep,
    stuck_condition,
)

# Throughput windows, in minutes, newest first.
THROUGHPUT_WINDOWS_MIN = (1, 5, 15)


def counts_by_state(db: Database) -> dict[str, int]:
    """Number of tasks in each status, every status listed (zeros included)."""
    t = tasks_table.c
    with db.connect() as conn:
        rows = conn.execute(select(t.status, func.count()).group_by(t.status)).all()
    counts = {status.value: 0 for status in TaskStatus}
    counts.update({TaskStatus(status).value: n for status, n in rows})
    return counts


@dataclass(frozen=True, slots=True)
class Throughput:
    """Tasks that came to rest in each of the last windows, by resting state."""

    windows_min: tuple[int, ...]
    finished: dict[str, tuple[int, ...]]  # state -> count per window

    @property
    def states(self) -> tuple[str, ...]:
        """The resting states counted, in lifecycle order (a row each on the screen)."""
        return tuple(s.value for s in RESTING_STATUSES)

    def per_min(self, state: str) -> dict[str, float]:
        counts = self.finished.get(state, (0,) * len(self.windows_min))
        return {f"{w}m": round(n / w, 2) for w, n in zip(self.windows_min, counts, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return {f"{s.value}_per_min": self.per_min(s.value) for s in RESTING_STATUSES}


def throughput(
    db: Database,
    windows_min: tuple[int, ...] = THROUGHPUT_WINDOWS_MIN,
    now: datetime | None = None,
) -> Throughput:
    """Tasks that came to rest in each window, by resting state (every one of
    :data:`RESTING_STATUSES`): completed by ``completed_at``, failed, escalated and
    cancelled by ``updated_at`` (their last transition).

    A resting task's ``updated_at`` is the time of its last transition and is never
    earlier than ``completed_at``, so filtering on ``updated_at`` from the widest
    window's start keeps every task any window counts.
    """
    t = tasks_table.c
    now = now or utcnow()
    cutoffs = [now - timedelta(minutes=w) for w in windows_min]
    when = {
        status: t.completed_at if status is TaskStatus.COMPLETED else t.updated_at
        for status in RESTING_STATUSES
    }
    columns = [
        func.coalesce(
            func.sum(case((and_(t.status == status, when[status] >= cutoff), 1), else_=0)), 0
        )
        for status in RESTING_STATUSES
        for cutoff in cutoffs
    ]
    query = select(*columns).where(t.status.in_(RESTING_STATUSES), t.updated_at >= min(cutoffs))
    with db.connect() as conn:
        row = conn.execute(query).one()
    n = len(windows_min)
    finished = {
        status.value: tuple(int(v) for v in row[i * n : (i + 1) * n])
        for i, status in enumerate(RESTING_STATUSES)
    }
    return Throughput(tuple(windows_min), finished)


def _age_s(then: datetime | None, now: datetime) -> float | None:
    return round((now - then).total_seconds(), 1) if then else None


@dataclass(frozen=True, slots=True)
class Category:
    """Tasks in one category: how many, and the oldest ``updated_at`` among them."""

    count: int
    oldest_updated_at: datetime | None
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        oldest = self.oldest_updated_at
        return {
            "count": self.count,
            "oldest_updated_at": oldest.isoformat() if oldest else None,
            "oldest_age_s": _age_s(oldest, self.at),
        }


@dataclass(frozen=True, slots=True)
class Stuck(Category):
    """Nothing in flight: what the sweeper re-drives; ``preclaimed`` of them wait on execute."""

    preclaimed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**Category.to_dict(self), "preclaimed": self.preclaimed}


@dataclass(frozen=True, slots=True)
class Deferred(Category):
    """Waiting on an open breaker or a retry backoff; ``deferred_since``: the longest wait."""

    deferred_since: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        since = self.deferred_since
        return {
            **Category.to_dict(self),
            "longest_deferred_since": since.isoformat() if since else None,
            "longest_deferral_s": _age_s(since, self.at),
        }


@dataclass(frozen=True, slots=True)
class Categories:
    """The active tasks that are not moving, by why (see the module's docstring)."""

    stuck: Stuck
    over_time_limit: Category
    deferred: Deferred


def agent_time_limits() -> dict[str, float]:
    """Each registered agent's ``time_limit_s`` (load the agent modules first)."""
    return {spec.name: spec.time_limit_s for spec in registry.agents()}


def _categories_sql(limits: Mapping[str, float]) -> Any:
    t = tasks_table.c
    stuck = f"({stuck_condition()})"
    whens = " ".join(f"WHEN :agent_{i} THEN :limit_{i}" for i in range(len(limits)))
    over_limit = (
        f"CASE assigned_agent {whens} ELSE :limit_default END" if whens else ":limit_default"
    )
    over = (
        "(status = 'in_progress' AND lease_expires_at IS NOT NULL "
        f"AND lease_expires_at >= :now AND updated_at < {over_limit})"
    )
    deferred = (
        f"(NOT {stuck} AND NOT {over} "
        "AND ((not_before IS NOT NULL AND not_before > :now) OR deferred_since IS NOT NULL))"
    )
    active = ", ".join(f"'{s.value}'" for s in ACTIVE_STATUSES)
    sql = (
        f"SELECT count(CASE WHEN {stuck} THEN 1 END) AS stuck, "
        f"min(CASE WHEN {stuck} THEN updated_at END) AS stuck_oldest, "
        f"count(CASE WHEN {stuck} AND {PRECLAIMED} THEN 1 END) AS preclaimed, "
        f"count(CASE WHEN {over} THEN 1 END) AS over, "
        f"min(CASE WHEN {over} THEN updated_at END) AS over_oldest, "
        f"count(CASE WHEN {deferred} THEN 1 END) AS deferred, "
        f"min(CASE WHEN {deferred} THEN updated_at END) AS deferred_oldest, "
        f"min(CASE WHEN {deferred} THEN deferred_since END) AS deferred_since "
        f"FROM tasks WHERE status IN ({active})"
    )
    when = t.updated_at.type
    binds = [bindparam("now", type_=when), bindparam("cutoff", type_=when)]
    binds.append(bindparam("limit_default", type_=when))
    for i in range(len(limits)):
        binds += [bindparam(f"agent_{i}", type_=t.assigned_agent.type)]
        binds += [bindparam(f"limit_{i}", type_=when)]
    # In the order of the SELECT: a textual query's columns are matched by position.
    names = (
        *("stuck", "stuck_oldest", "preclaimed", "over", "over_oldest", "deferred"),
        *("deferred_oldest", "deferred_since"),
    )
    columns: list[ColumnClause[Any]] = [
        column(name, UTCDateTime() if "oldest" in name or "since" in name else Integer())
        for name in names
    ]
    return text(sql).bindparams(*binds).columns(*columns)


def categories(
    db: Database,
    *,
    redrive_after_s: float,
    time_limits: Mapping[str, float] | None = None,
    now: datetime | None = None,
) -> Categories:
    """Stuck, over-time-limit and deferred tasks, in one round trip.

    ``time_limits``: each agent's ``time_limit_s`` (default: the registered agents');
    an agent not in it gets ``DEFAULT_TIME_LIMIT_S``.
    """
    now = now or utcnow()
    limits = dict(sorted((agent_time_limits() if time_limits is None else time_limits).items()))
    params: dict[str, Any] = {
        "now": now,
        "cutoff": now - timedelta(seconds=redrive_after_s),
        "limit_default": now - timedelta(seconds=c.DEFAULT_TIME_LIMIT_S),
        **PRECLAIM_PARAMS,
    }
    for i, (agent, limit_s) in enumerate(limits.items()):
        params[f"agent_{i}"] = agent
        params[f"limit_{i}"] = now - timedelta(seconds=limit_s)
    with db.connect() as conn:
        row = conn.execute(_categories_sql(limits), params).mappings().one()
    return Categories(
        stuck=Stuck(int(row["stuck"]), row["stuck_oldest"], now, int(row["preclaimed"])),
        over_time_limit=Category(int(row["over"]), row["over_oldest"], now),
        deferred=Deferred(int(row["deferred"]), row["deferred_oldest"], now, row["deferred_since"]),
    )


@dataclass(frozen=True, slots=True)
class SweeperStatus:
    """When the sweeper last ran, against how often it should."""

    last: SweepRecord | None
    interval_s: float
    at: datetime

    @property
    def age_s(self) -> float | None:
        return _age_s(self.last.last_run_at, self.at) if self.last else None

    @property
    def late(self) -> bool:
        """True when no pass ran in the last ``SWEEPER_LATE_INTERVALS`` intervals."""
        age = self.age_s
        return age is None or age > c.SWEEPER_LATE_INTERVALS * self.interval_s

    def to_dict(self) -> dict[str, Any]:
        last = self.last
        return {
            "last_run_at": last.last_run_at.isoformat() if last else None,
            "age_s": self.age_s,
            "interval_s": self.interval_s,
            "redriven": last.redriven if last else None,
            "duration_s": round(last.duration_s, 3) if last else None,
            "late": self.late,
        }


def sweeper_status(
    db: Database, *, interval_s: float, now: datetime | None = None
) -> SweeperStatus:
    """The sweeper's last recorded pass, and whether it is late."""
    return SweeperStatus(last_sweep(db), interval_s, now or utcnow())


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One screen for an operator; ``to_dict`` is ``taskrail status --json``."""

    counts: dict[str, int]
    throughput: Throughput
    categories: Categories
    sweeper: SweeperStatus
    redrive_after_s: float
    at: datetime = field(default_factory=utcnow)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "total": self.total,
            "throughput": self.throughput.to_dict(),
            "stuck": self.categories.stuck.to_dict(),
            "over_time_limit": self.categories.over_time_limit.to_dict(),
            "deferred": self.categories.deferred.to_dict(),
            "sweeper": self.sweeper.to_dict(),
            "redrive_after_s": self.redrive_after_s,
            "at": self.at.isoformat(timespec="seconds"),
        }


def status_report(
    db: Database,
    *,
    redrive_after_s: float,
    sweep_interval_s: float = c.DEFAULT_SWEEP_INTERVAL_S,
    time_limits: Mapping[str, float] | None = None,
) -> StatusReport:
    """Counts by state, throughput over the last 1, 5 and 15 minutes, the tasks that are
    not moving by category, and the sweeper's last pass."""
    now = utcnow()
    return StatusReport(
        counts=counts_by_state(db),
        throughput=throughput(db, now=now),
        categories=categories(
            db, redrive_after_s=redrive_after_s, time_limits=time_limits, now=now
        ),
        sweeper=sweeper_status(db, interval_s=sweep_interval_s, now=now),
        redrive_after_s=redrive_after_s,
        at=now,
    )
