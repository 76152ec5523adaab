"""What ``taskrail status`` shows: counts by state, throughput, stuck tasks.

Read-only queries, each one round trip that the ``(status, updated_at)`` index serves,
so an operator (or the metrics endpoint at every scrape) can ask often.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select

from orchestration.db import Database
from orchestration.models import RESTING_STATUSES, TaskStatus, tasks_table, utcnow
from orchestration.recovery import StuckSummary, stuck_summary

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
    """Tasks that came to rest in each of the last windows, by final state."""

    windows_min: tuple[int, ...]
    finished: dict[str, tuple[int, ...]]  # state -> count per window

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
    """Completed (by ``completed_at``), failed and escalated tasks in each window.

    A resting task's ``updated_at`` is the time of its last transition and is never
    earlier than ``completed_at``, so the index on (status, updated_at) narrows the scan
    to the widest window.
    """
    t = tasks_table.c
    now = now or utcnow()
    cutoffs = [now - timedelta(minutes=w) for w in windows_min]
    when = {
        TaskStatus.COMPLETED: t.completed_at,
        TaskStatus.FAILED: t.updated_at,
        TaskStatus.ESCALATED: t.updated_at,
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


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One screen for an operator; ``to_dict`` is ``taskrail status --json``."""

    counts: dict[str, int]
    throughput: Throughput
    stuck: StuckSummary
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
            "stuck": self.stuck.to_dict(),
            "at": self.at.isoformat(timespec="seconds"),
        }


def status_report(db: Database, *, redrive_after_s: float) -> StatusReport:
    """Counts by state, throughput over the last 1, 5 and 15 minutes, stuck tasks."""
    now = utcnow()
    return StatusReport(
        counts=counts_by_state(db),
        throughput=throughput(db, now=now),
        stuck=stuck_summary(db, redrive_after_s=redrive_after_s),
        redrive_after_s=redrive_after_s,
        at=now,
    )
