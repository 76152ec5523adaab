"""Which tasks a person means: the filters of ``taskrail list``, the console's task list
and the bulk moves, and the checks on what a person writes (who, a note, a reason).

::

    TaskFilter.build(status=["failed"], task_type="personal_tax", since="1h")

Every check raises an :class:`~orchestration.errors.InputError` naming the field, so a
bad filter is a one-line error and nothing is read or written.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict, Unpack

from orchestration import constants as c
from orchestration.errors import InvalidField, InvalidFilter, short_repr
from orchestration.models import TaskStatus
from orchestration.values import check_client_id

__all__ = [
    "BULK_FILTER_NAMES",
    "FILTER_NAMES",
    "BulkFilterFields",
    "FilterFields",
    "TaskFilter",
    "check_actor",
    "check_limit",
    "check_names",
    "check_text",
    "default_actor",
    "parse_since",
    "parse_statuses",
]

_MAX_ID = 2**63 - 1
# A duration back from now: ASCII digits and a unit, one or more (``1h30m``), spaces
# between them allowed (``1h 30m``).
_DURATION_PART = re.compile(r"([0-9]{1,9})([smhdw])")
_DURATIONS = re.compile(r"(?:[0-9]{1,9}[smhdw])+")
_SPACES = re.compile(r"\s+")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SINCE_FORMS = "a duration (1h, 30m, 2d, 1h30m) or an ISO time"
# What no stored name holds: NUL and surrogates (task types and agent names are
# refused with them; actors must be printable).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def parse_statuses(statuses: str | Iterable[Any] | None) -> tuple[TaskStatus, ...]:
    """Status names (or TaskStatus values) as a tuple without repeats, in lifecycle order.

    A string may list several, comma-separated. Raises InvalidFilter.
    """
    if statuses is None:
        return ()
    items: Iterable[Any] = statuses.split(",") if isinstance(statuses, str) else statuses
    try:
        listed = list(items)
    except TypeError:
        raise InvalidFilter("status", f"not a status name: {short_repr(statuses)}") from None
    chosen: set[TaskStatus] = set()
    for item in listed:
        name = item.value if isinstance(item, TaskStatus) else item
        if not isinstance(name, str):
            raise InvalidFilter("status", f"not a status name: {short_repr(item)}")
        try:
            chosen.add(TaskStatus(name.strip().lower()))
        except ValueError:
            known = ", ".join(s.value for s in TaskStatus)
            raise InvalidFilter(
                "status", f"unknown status {short_repr(name)}; the statuses are {known}"
            ) from None
    return tuple(s for s in TaskStatus if s in chosen)


def parse_since(
    since: str | datetime | timedelta | None, *, now: datetime | None = None
) -> datetime | None:
    """``since`` as a UTC time: an aware datetime (naive is UTC), a timedelta back from
    now, a duration back from now (``90s``, ``30m``, ``1h``, ``2d``, ``1w``, or combined:
    ``1h30m``, ``1h 30m``) or an ISO 8601 time (naive is UTC). Raises InvalidFilter."""
    if since is None:
        return None
    now = now or datetime.now(UTC)
    try:
        if isinstance(since, timedelta):
            if since < timedelta(0):
                raise InvalidFilter("since", "a duration back from now cannot be negative")
            return now - since
        if isinstance(since, datetime):
            return _utc(since)
        if not isinstance(since, str) or not since.strip():
            raise InvalidFilter("since", f"expected {_SINCE_FORMS}, got {short_repr(since)}")
        compact = _SPACES.sub("", since).lower()
        if _DURATIONS.fullmatch(compact):
            total = sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(compact))
            return now - timedelta(seconds=total)
        try:
            at = datetime.fromisoformat(since.strip())
        except ValueError:
            raise InvalidFilter(
                "since", f"expected {_SINCE_FORMS}, got {short_repr(since)}"
            ) from None
        return _utc(at)
    except OverflowError:
        raise InvalidFilter("since", f"{short_repr(since)} is out of range") from None


def _utc(at: datetime) -> datetime:
    """``at`` in UTC (naive: taken as UTC). Raises OverflowError at the calendar's ends."""
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


def check_limit(limit: Any, *, maximum: int = c.MAX_LIST_LIMIT) -> int:
    """A page size: an integer from 1 to ``maximum``. Raises InvalidFilter."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= maximum:
        raise InvalidFilter(
            "limit", f"expected an integer from 1 to {maximum}, got {short_repr(limit)}"
        )
    return int(limit)


def _check_after(after: Any) -> int | None:
    if after is None:
        return None
    if isinstance(after, bool) or not isinstance(after, int) or not 0 < after <= _MAX_ID:
        raise InvalidFilter("after", f"expected a task id, got {short_repr(after)}")
    return int(after)


def _check_name(value: Any, name: str, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        raise InvalidFilter(
            name, f"expected a string of 1 to {max_chars} characters, got {short_repr(value)}"
        )
    if _UNSTORABLE.search(value):
        raise InvalidFilter(
            name, f"no task has NUL or surrogate characters in it: {short_repr(value)}"
        )
    return str(value)


def check_text(
    value: Any,
    name: str,
    *,
    max_chars: int = c.MAX_NOTE_CHARS,
    required: bool = False,
    blank: bool = True,
) -> str | None:
    """A note or a reason: None (unless ``required``) or a string of at most ``max_chars``
    characters (any characters: they are stored escaped, and read back as given).
    ``required`` or not ``blank``: a given text must not be empty or only white space.
    Raises InvalidField."""
    if value is None:
        if required:
            raise InvalidField(name, "required")
        return None
    if not isinstance(value, str):
        raise InvalidField(name, f"expected text, got {type(value).__name__}")
    if (required or not blank) and not value.strip():
        raise InvalidField(name, "must not be empty")
    if len(value) > max_chars:
        raise InvalidField(name, f"longer than {max_chars} characters ({len(value)})")
    return str(value)


def default_actor() -> str:
    """The OS user running this process (``--by``'s default)."""
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        return "unknown"


def check_actor(by: Any) -> str:
    """Who makes a move, as given: a non-empty name of printable characters, at most
    MAX_ACTOR_CHARS long, without spaces around it; None is the OS user. Raises
    InvalidField."""
    if by is None:
        return default_actor()
    if not isinstance(by, str):
        raise InvalidField("by", f"expected a name, got {type(by).__name__}")
    if not by.strip():
        raise InvalidField("by", "must not be empty")
    if len(by) > c.MAX_ACTOR_CHARS:
        raise InvalidField("by", f"longer than {c.MAX_ACTOR_CHARS} characters ({len(by)})")
    if not by.isprintable():
        raise InvalidField("by", f"must be printable characters only: {short_repr(by)}")
    if by != by.strip():
        raise InvalidField("by", f"must not start or end with a space: {short_repr(by)}")
    return str(by)


class BulkFilterFields(TypedDict, total=False):
    """The filters of a bulk move besides its statuses, as given (checked by
    :meth:`TaskFilter.build`)."""

    task_type: str | None
    client_id: int | None
    agent: str | None
    since: str | datetime | timedelta | None


class FilterFields(BulkFilterFields, total=False):
    """Every filter, as given: the keywords of :meth:`TaskFilter.build` and of
    ``Taskrail.list_tasks``."""

    status: str | Iterable[Any] | None
    claimed_by: str | None
    after: int | None


FILTER_NAMES = FilterFields.__optional_keys__
BULK_FILTER_NAMES = BulkFilterFields.__optional_keys__


def check_names(given: Mapping[str, Any], known: frozenset[str] = FILTER_NAMES) -> None:
    """Raises TypeError, as a call with an unknown keyword does, when ``given`` names a
    filter not ``known`` (:data:`FILTER_NAMES`, or :data:`BULK_FILTER_NAMES`)."""
    for name in given:
        if name not in known:
            listed = ", ".join(sorted(known))
            raise TypeError(f"unknown filter {name!r}; the filters are {listed}")


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks: every given field must match (statuses: any of them).

    ``after`` is the keyset cursor: only tasks with a smaller id (the next page of a
    newest-first list). Build one with :meth:`build`, which checks every field.
    """

    statuses: tuple[TaskStatus, ...] = ()
    task_type: str | None = None
    client_id: int | None = None
    agent: str | None = None
    claimed_by: str | None = None
    since: datetime | None = None
    after: int | None = None

    @classmethod
    def build(cls, **fields: Unpack[FilterFields]) -> TaskFilter:
        """The filter ``fields`` name, each checked. Raises InvalidFilter,
        InvalidClientId; TypeError for a name that is no filter."""
        check_names(fields)
        client_id = fields.get("client_id")
        return cls(
            statuses=parse_statuses(fields.get("status")),
            task_type=_check_name(fields.get("task_type"), "task type", c.MAX_TASK_TYPE_CHARS),
            client_id=None if client_id is None else check_client_id(client_id),
            agent=_check_name(fields.get("agent"), "agent", 128),
            claimed_by=_check_name(fields.get("claimed_by"), "claimed by", 255),
            since=parse_since(fields.get("since")),
            after=_check_after(fields.get("after")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The filter as query values (for the console's links and logs)."""
        doc: dict[str, Any] = {}
        if self.statuses:
            doc["status"] = [s.value for s in self.statuses]
        for name in ("task_type", "client_id", "agent", "claimed_by", "after"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        if self.since is not None:
            doc["since"] = self.since.isoformat()
        return doc
