"""Reading tasks by filter: the pages of ``taskrail list`` and the console, newest first,
and the ids a bulk move walks through.

Pages are keyset-paginated on the primary key (``WHERE id < :after ORDER BY id DESC
LIMIT n``), never OFFSET, and each filter has an index that leads with its column and
ends with ``id`` (migration 0006), so a page reads about ``n`` index entries whatever
the table's size. ``bench/listing.py`` prints the plans over a million tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, select

from orchestration.filters import TaskFilter
from orchestration.models import TaskStatus, tasks_table
from orchestration.store.db import Database
from orchestration.store.records import TaskRecord

__all__ = ["count_tasks", "inbox", "list_tasks", "page_ids", "where"]

_t = tasks_table.c


def where(flt: TaskFilter) -> ColumnElement[bool]:
    """The filter as one SQL condition (true for an empty filter)."""
    conditions: list[ColumnElement[bool]] = []
    if len(flt.statuses) == 1:
        conditions.append(_t.status == flt.statuses[0])
    elif flt.statuses:
        conditions.append(_t.status.in_(flt.statuses))
    if flt.task_type is not None:
        conditions.append(_t.task_type == flt.task_type)
    if flt.client_id is not None:
        conditions.append(_t.client_id == flt.client_id)
    if flt.agent is not None:
        conditions.append(_t.assigned_agent == flt.agent)
    if flt.claimed_by is not None:
        conditions.append(_t.claimed_by == flt.claimed_by)
    if flt.since is not None:
        conditions.append(_t.created_at >= flt.since)
    if flt.after is not None:
        conditions.append(_t.id < flt.after)
    return and_(True, *conditions)


def list_query(flt: TaskFilter, limit: int) -> Select[Any]:
    """The page's query: whole rows, newest first."""
    return select(tasks_table).where(where(flt)).order_by(_t.id.desc()).limit(limit)


def list_tasks(db: Database, flt: TaskFilter, limit: int) -> list[TaskRecord]:
    """Up to ``limit`` tasks matching ``flt``, newest first."""
    with db.connect() as conn:
        rows = conn.execute(list_query(flt, limit)).mappings().all()
    return [TaskRecord.from_row(row) for row in rows]


def count_tasks(db: Database, flt: TaskFilter) -> int:
    """How many tasks match ``flt``."""
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(tasks_table).where(where(flt))
            ).scalar_one()
        )


def page_ids(db: Database, flt: TaskFilter, batch: int) -> Iterator[list[int]]:
    """The ids matching ``flt``, newest first, in lists of up to ``batch``.

    Each list is read when the previous one has been used, below its last id (keyset):
    a task created meanwhile (a greater id) is not taken in, and one that stops
    matching between reads is not seen again.
    """
    after = flt.after
    while True:
        page = dataclasses.replace(flt, after=after)
        query = select(_t.id).where(where(page)).order_by(_t.id.desc()).limit(batch)
        with db.connect() as conn:
            ids = [int(i) for i in conn.execute(query).scalars()]
        if not ids:
            return
        yield ids
        if len(ids) < batch:
            return
        after = ids[-1]


def inbox_query(limit: int, *, claimed: bool) -> Select[Any]:
    """Escalated tasks, unclaimed or claimed, the oldest first: the partial index
    ``ix_tasks_escalated_unclaimed`` or ``ix_tasks_escalated_claimed`` read forwards."""
    claim = _t.claimed_by.is_not(None) if claimed else _t.claimed_by.is_(None)
    return (
        select(tasks_table)
        .where(_t.status == TaskStatus.ESCALATED, claim)
        .order_by(_t.id)
        .limit(limit)
    )


def inbox(db: Database, limit: int) -> tuple[list[TaskRecord], int]:
    """The first ``limit`` tasks of the escalations inbox (the unclaimed first, then the
    claimed, each the oldest first), and how many tasks are escalated.

    Two reads that each stop after their rows, instead of one ordered by the claim,
    which would sort every escalated task.
    """
    escalated = TaskFilter(statuses=(TaskStatus.ESCALATED,))
    with db.connect() as conn:
        rows = list(conn.execute(inbox_query(limit, claimed=False)).mappings())
        if len(rows) < limit:
            rows += conn.execute(inbox_query(limit - len(rows), claimed=True)).mappings()
        total = conn.execute(
            select(func.count()).select_from(tasks_table).where(where(escalated))
        ).scalar_one()
    return [TaskRecord.from_row(row) for row in rows], int(total)
