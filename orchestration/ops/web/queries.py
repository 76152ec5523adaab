"""What the console reads from a request: the task list's filters, ids and form fields.

The task list takes the filters of ``taskrail list`` as query parameters (the same for
``/tasks`` and ``/api/tasks``): ``status`` (repeated, or comma-separated), ``type``,
``client``, ``agent``, ``claimed_by``, ``since``, ``limit`` and ``after``. An empty
value is no filter (what an empty form field sends). Anything else, a parameter given
twice, or a value the filter refuses is an :class:`~orchestration.errors.InputError`
with a one-line message: the page shows it, nothing is read or written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from orchestration import constants as c
from orchestration.errors import InvalidField, InvalidFilter, InvalidNumber, shown_input
from orchestration.filters import TaskFilter, parse_since
from orchestration.ops.cli_edge import parse_number

FILTER_PARAMS = ("status", "type", "client", "agent", "claimed_by", "since", "limit", "after")
_SINGLE = FILTER_PARAMS[1:]


def _single(params: Any, name: str) -> str | None:
    values = [v for v in params.getlist(name) if v != ""]
    if len(values) > 1:
        raise InvalidFilter(name, "give it once")
    return values[0] if values else None


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The task list's filters as typed, and as the API's keyword arguments."""

    statuses: tuple[str, ...] = ()
    task_type: str | None = None
    client: str | None = None
    agent: str | None = None
    claimed_by: str | None = None
    since: str | None = None
    limit: int = c.DEFAULT_LIST_LIMIT
    after: int | None = None
    since_at: datetime | None = None  # ``since`` fixed once: every page names one instant

    @classmethod
    def parse(cls, params: Any) -> ListQuery:
        """``params`` (a request's query parameters) as a ListQuery.

        Raises InvalidFilter (an unknown parameter, one given twice, a bad value),
        InvalidNumber, InvalidClientId.
        """
        for name in params:
            if name not in FILTER_PARAMS:
                raise InvalidFilter(
                    "parameter", f"unknown {shown_input(name)}; use {', '.join(FILTER_PARAMS)}"
                )
        statuses = tuple(
            part.strip()
            for value in params.getlist("status")
            for part in value.split(",")
            if part.strip()
        )
        single = {name: _single(params, name) for name in _SINGLE}
        limit_text, after_text = single["limit"], single["after"]
        query = cls(
            statuses=statuses,
            task_type=single["type"],
            client=single["client"],
            agent=single["agent"],
            claimed_by=single["claimed_by"],
            since=single["since"],
            limit=c.DEFAULT_LIST_LIMIT if limit_text is None else _limit(limit_text),
            after=None if after_text is None else _after(after_text),
            since_at=parse_since(single["since"]),
        )
        query.check()
        return query

    def api(self) -> dict[str, Any]:
        """Keyword arguments of ``Taskrail.list_tasks`` (without limit and after)."""
        return {
            "status": list(self.statuses) or None,
            "task_type": self.task_type,
            "client_id": None if self.client is None else parse_number(self.client, "client id"),
            "agent": self.agent,
            "claimed_by": self.claimed_by,
            "since": self.since_at,
        }

    def check(self) -> None:
        """Every filter checked as the API checks it. Raises InvalidFilter, InvalidNumber..."""
        TaskFilter.build(**self.api(), after=self.after)

    def link(self, *, after: int | None = None, since_as_given: bool = False) -> str:
        """This query as a query string (a page's links); ``after`` for the next page."""
        pairs: list[tuple[str, str]] = [("status", s) for s in self.statuses]
        since = self.since if since_as_given or self.since_at is None else self.since_at.isoformat()
        for name, value in (
            ("type", self.task_type),
            ("client", self.client),
            ("agent", self.agent),
            ("claimed_by", self.claimed_by),
            ("since", since),
            ("limit", None if self.limit == c.DEFAULT_LIST_LIMIT else str(self.limit)),
            ("after", None if after is None else str(after)),
        ):
            if value is not None:
                pairs.append((name, value))
        return urlencode(pairs)

    @property
    def filtered(self) -> bool:
        return any(
            v is not None
            for v in (self.task_type, self.client, self.agent, self.claimed_by, self.since)
        ) or bool(self.statuses)


def _limit(text: str) -> int:
    try:
        value = parse_number(text, "limit")
    except InvalidNumber:
        value = 0
    if not 0 < value <= c.MAX_LIST_LIMIT:
        raise InvalidFilter(
            "limit", f"expected an integer from 1 to {c.MAX_LIST_LIMIT}, got {shown_input(text)}"
        )
    return value


def _after(text: str) -> int:
    try:
        value = parse_number(text, "after")
    except InvalidNumber:
        value = 0
    if value < 1:
        raise InvalidFilter("after", f"expected a task id, got {shown_input(text)}")
    return value


def task_id_from(text: str) -> int:
    """A task id from a path. Raises InvalidNumber (the page says so, with a 400)."""
    return parse_number(text, "task id")


# -- form fields ---------------------------------------------------------------------------


def form_text(form: Mapping[str, Any], name: str) -> str | None:
    """A text field of a form: None when absent or empty. Raises InvalidField for a file
    (a multipart form may carry one where text belongs)."""
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField(name, "expected text")
    return value if value.strip() else None


def form_json(form: Mapping[str, Any], name: str, *, required: bool) -> Any:
    """A JSON field of a form (a result, a payload to merge): the parsed value.

    Raises InvalidField when it is not JSON (or missing and ``required``).
    """
    text = form_text(form, name)
    if text is None:
        if required:
            raise InvalidField(name, "required (a JSON object)")
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidField(name, f"not valid JSON: {exc}") from None
