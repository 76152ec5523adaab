"""Many tasks at once: list them by filter, and retry or cancel every task a filter
matches, in batches (:meth:`BulkMoves.bulk`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Unpack

from orchestration import constants as c
from orchestration.api.base import TaskrailBase
from orchestration.api.people import _ALLOWED, _allowed_from, _cancel_reason
from orchestration.errors import InvalidFilter, short_repr
from orchestration.filters import (
    BULK_FILTER_NAMES,
    BulkFilterFields,
    FilterFields,
    TaskFilter,
    check_actor,
    check_limit,
    check_names,
    check_text,
)
from orchestration.moves import Move
from orchestration.store import listing
from orchestration.store.records import TaskRecord

_BULK_EVENTS = ("retry", "cancel")

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk retry or cancel did (or, in a dry run, would do)."""

    event: str
    matched: int  # tasks the filter matched
    moved: int  # tasks moved (0 in a dry run)
    skipped: int  # matched, but moved on before their batch was written
    first_ids: tuple[int, ...]  # the first (newest) ids moved, or matched in a dry run
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "dry_run": self.dry_run,
            "matched": self.matched,
            "moved": self.moved,
            "skipped": self.skipped,
            "first_ids": list(self.first_ids),
        }


class BulkMoves(TaskrailBase):
    """:class:`~orchestration.api.Taskrail`'s reads and moves of many tasks by filter."""

    def list_tasks(
        self, *, limit: int = c.DEFAULT_LIST_LIMIT, **filters: Unpack[FilterFields]
    ) -> list[TaskRecord]:
        """Tasks matching every given filter, newest first, at most ``limit``.

        The filters (:class:`~orchestration.filters.FilterFields`): ``status`` (one name
        or several), ``task_type``, ``client_id``, ``agent``, ``claimed_by``, ``since`` (a
        duration back: ``1h``, ``30m``, ``2d``; an ISO time or a datetime; by creation
        time) and ``after``, the last id of the previous page (keyset pagination). Raises
        InvalidFilter, InvalidClientId; TypeError for a name that is no filter.
        """
        flt = TaskFilter.build(**filters)
        return listing.list_tasks(self.db, flt, check_limit(limit))

    def inbox(self, *, limit: int = c.DEFAULT_LIST_LIMIT) -> tuple[list[TaskRecord], int]:
        """The escalations inbox: escalated tasks, the unclaimed first, then the oldest
        first, at most ``limit``; and how many tasks are escalated. Raises InvalidFilter.
        """
        return listing.inbox(self.db, check_limit(limit))

    def retry_many(
        self,
        *,
        status: str | Iterable[Any] | None = "failed",
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Progress | None = None,
        **filters: Unpack[BulkFilterFields],
    ) -> BulkResult:
        """Retry every failed task matching the filters (``task_type``, ``client_id``,
        ``agent``, ``since``; see :meth:`bulk`)."""
        check_names(filters, BULK_FILTER_NAMES)
        flt = TaskFilter.build(status=status, **filters)
        return self.bulk("retry", flt, dry_run=dry_run, by=by, note=note, progress=progress)

    def cancel_many(
        self,
        *,
        status: str | Iterable[Any] | None,
        reason: str | None = None,
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Progress | None = None,
        **filters: Unpack[BulkFilterFields],
    ) -> BulkResult:
        """Cancel every pending, assigned or in-progress task matching the filters
        (``task_type``, ``client_id``, ``agent``, ``since``; see :meth:`bulk`)."""
        check_names(filters, BULK_FILTER_NAMES)
        flt = TaskFilter.build(status=status, **filters)
        return self.bulk(
            "cancel", flt, reason=reason, dry_run=dry_run, by=by, note=note, progress=progress
        )

    def bulk(
        self,
        event: str,
        flt: TaskFilter,
        *,
        reason: str | None = None,
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Progress | None = None,
        batch: int = c.BULK_BATCH,
    ) -> BulkResult:
        """``event`` (``retry`` or ``cancel``) on every task matching ``flt``.

        The filter must name statuses, each one the event may leave (else
        InvalidFilter, nothing done). A dry run counts and shows the first ids and
        changes nothing. A real run walks the matching tasks newest first in batches of
        ``batch``; each batch is one statement on PostgreSQL that moves (and audits, one
        event per task, from the status it was in) the tasks still in a status the
        filter names; a task that moved on meanwhile is skipped and counted. Retried
        tasks are sent to the workers batch by batch. ``progress(done, total)`` is called
        after each batch. ``reason`` is each audit event's detail (a cancel's default:
        "cancelled"). Raises InvalidFilter, InvalidField.
        """
        if event not in _BULK_EVENTS:
            raise InvalidFilter(
                "event", f"bulk moves are {', '.join(_BULK_EVENTS)}, not {short_repr(event)}"
            )
        actor = check_actor(by)
        note = check_text(note, "note")
        if event == "cancel":
            reason = _cancel_reason(reason)
        else:
            reason = check_text(reason, "reason", max_chars=c.MAX_REASON_CHARS, blank=False)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidFilter("batch", f"expected a positive integer, got {short_repr(batch)}")
        if not isinstance(flt, TaskFilter):
            raise InvalidFilter("filter", f"expected a TaskFilter, got {type(flt).__name__}")
        if not flt.statuses:
            raise InvalidFilter("status", f"name the statuses to {event} (--status)")
        for status in flt.statuses:
            if not _allowed_from(event, status):
                raise InvalidFilter("status", f"{_ALLOWED[event]}, not {status.value} ones")
        total = listing.count_tasks(self.db, flt)
        if dry_run:
            first = next(listing.page_ids(self.db, flt, c.BULK_SHOWN_IDS), [])
            return BulkResult(event, total, 0, 0, tuple(first), dry_run=True)
        store = self._store()
        move = Move(0, event, actor=actor, note=note, reason=reason, returning=("task_type",))
        matched = moved = 0
        first_ids: list[int] = []
        for ids in listing.page_ids(self.db, flt, batch):
            matched += len(ids)
            done = store.apply_many(move, ids, flt.statuses)
            moved += len(done)
            if len(first_ids) < c.BULK_SHOWN_IDS:
                newest = sorted((r.task_id for r in done), reverse=True)
                first_ids += newest[: c.BULK_SHOWN_IDS - len(first_ids)]
            if event == "retry":
                self._enqueue_first_hops([(r.task_id, r.row["task_type"]) for r in done])
            if progress is not None:
                progress(matched, max(total, matched))
        return BulkResult(event, matched, moved, matched - moved, tuple(first_ids))
