"""``api.list_tasks`` (issue 21): filters, newest first, keyset pages, on SQLite and
PostgreSQL, against a brute-force model; and every bad filter a one-line error."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert

from orchestration.constants import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from orchestration.errors import InvalidClientId, InvalidFilter, TaskrailError
from orchestration.filters import TaskFilter, parse_since, parse_statuses
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.store.records import TaskRecord
from tests.unit.domain.people_support import Backend

S = TaskStatus
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
EST = timezone(timedelta(hours=-5))
TYPES = ("personal_tax", "payroll", "bookkeeping")
AGENTS = (None, "personal_tax_agent", "payroll_agent")
PEOPLE = (None, "ana", "bob")


@dataclass(frozen=True)
class Row:
    """A task as the model knows it."""

    status: TaskStatus
    task_type: str
    client_id: int
    agent: str | None
    claimed_by: str | None
    created_at: datetime


def store(backend: Backend, rows: list[Row]) -> list[int]:
    """Empty the tables, then insert ``rows`` (in order: ids ascend); returns their ids."""
    ids = []
    with backend.db.begin() as conn:
        conn.execute(delete(events_table))
        conn.execute(delete(tasks_table))
        for row in rows:
            values = {
                "client_id": row.client_id,
                "task_type": row.task_type,
                "status": row.status,
                "assigned_agent": row.agent,
                "claimed_by": row.claimed_by,
                "payload": {"n": len(ids)},
                "attempts": 0,
                "created_at": row.created_at,
                "updated_at": row.created_at,
            }
            ids.append(
                conn.execute(
                    insert(tasks_table).values(**values).returning(tasks_table.c.id)
                ).scalar_one()
            )
    return ids


def matches(row: Row, query: dict[str, Any], since: datetime | None) -> bool:
    """The brute-force filter."""
    statuses = parse_statuses(query.get("status"))
    return (
        (not statuses or row.status in statuses)
        and query.get("task_type") in (None, row.task_type)
        and query.get("client_id") in (None, row.client_id)
        and (query.get("agent") is None or query["agent"] == row.agent)
        and (query.get("claimed_by") is None or query["claimed_by"] == row.claimed_by)
        and (since is None or row.created_at >= since)
    )


def walk(backend: Backend, query: dict[str, Any], limit: int) -> list[list[TaskRecord]]:
    """Every page of ``query``, each after the last id of the one before, to the empty one."""
    pages: list[list[TaskRecord]] = []
    after = None
    while True:
        page = backend.trail.list_tasks(**query, limit=limit, after=after)
        pages.append(page)
        if not page:
            return pages
        after = page[-1].id
        assert len(pages) < 100, "the pages never end"


rows_strategy = st.lists(
    st.builds(
        Row,
        status=st.sampled_from(list(TaskStatus)),
        task_type=st.sampled_from(TYPES),
        client_id=st.sampled_from([1, 2, 3]),
        agent=st.sampled_from(AGENTS),
        claimed_by=st.sampled_from(PEOPLE),
        created_at=st.integers(0, 600).map(lambda m: NOW - timedelta(minutes=m)),
    ),
    max_size=25,
)
status_filters = (
    st.none()
    | st.sampled_from(list(TaskStatus))
    | st.lists(st.sampled_from(list(TaskStatus)), min_size=1, max_size=3)
    | st.lists(st.sampled_from([s.value for s in TaskStatus]), min_size=1, max_size=3).map(",".join)
)
# A since as an aware datetime, a naive one (UTC), or ISO text with or without a zone.
since_filters = st.none() | st.integers(0, 620).flatmap(
    lambda m: st.sampled_from(
        [
            NOW - timedelta(minutes=m),
            (NOW - timedelta(minutes=m)).replace(tzinfo=None),
            (NOW - timedelta(minutes=m)).astimezone(timezone(timedelta(hours=-5))).isoformat(),
            (NOW - timedelta(minutes=m)).replace(tzinfo=None).isoformat(),
        ]
    )
)
queries = st.fixed_dictionaries(
    {},
    optional={
        "status": status_filters,
        "task_type": st.sampled_from(TYPES),
        "client_id": st.sampled_from([1, 2, 3, 4]),
        "agent": st.sampled_from(AGENTS[1:]),
        "claimed_by": st.sampled_from(PEOPLE[1:]),
        "since": since_filters,
    },
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=rows_strategy, query=queries, limit=st.integers(1, 8))
def test_walking_the_pages_gives_exactly_the_filtered_tasks_newest_first(
    backend: Backend, rows: list[Row], query: dict[str, Any], limit: int
) -> None:
    # Given random tasks
    ids = store(backend, rows)

    # When every page of a random filter is walked, each after the last id of the one before
    pages = walk(backend, query, limit)

    # Then together they are exactly the brute-force filtered tasks, newest (greatest id)
    # first, without repeats or gaps: every page full but the last ones, none too long
    since = parse_since(query.get("since"))
    want = sorted((i for i, row in zip(ids, rows, strict=True) if matches(row, query, since)))
    got = [task.id for page in pages for task in page]
    assert got == want[::-1]
    assert [len(p) for p in pages[:-2]] == [limit] * len(pages[:-2])
    assert 0 < len(pages[-2]) <= limit if len(pages) > 1 else True
    assert pages[-1] == []
    # and each listed task is the whole record, as get gives it
    for task in (t for page in pages for t in page):
        assert task == backend.trail.get(task.id)


def test_the_default_page_is_the_newest_fifty(backend: Backend) -> None:
    ids = store(backend, [Row(S.PENDING, "payroll", 1, None, None, NOW)] * 60)

    page = backend.trail.list_tasks()

    assert DEFAULT_LIST_LIMIT == 50
    assert [t.id for t in page] == ids[::-1][:50]
    assert [t.id for t in backend.trail.list_tasks(limit=MAX_LIST_LIMIT)] == ids[::-1]


def test_the_escalated_claimed_by_ana_since_an_hour(backend: Backend) -> None:
    # Given tasks of every kind, some escalated and claimed, old and new
    now = datetime.now(UTC)
    rows = [
        Row(S.ESCALATED, "personal_tax", 1, "personal_tax_agent", "ana", now),
        Row(S.ESCALATED, "personal_tax", 1, "personal_tax_agent", "bob", now),
        Row(S.ESCALATED, "payroll", 2, "payroll_agent", "ana", now - timedelta(hours=2)),
        Row(S.FAILED, "payroll", 2, "payroll_agent", "ana", now),
        Row(S.ESCALATED, "payroll", 3, "payroll_agent", "ana", now - timedelta(minutes=5)),
    ]
    ids = store(backend, rows)

    # When the inbox of ana's escalations of the last hour is listed
    listed = backend.trail.list_tasks(status="escalated", claimed_by="ana", since="1h")

    # Then they are the two recent ones, newest first
    assert [t.id for t in listed] == [ids[4], ids[0]]
    assert (
        backend.trail.list_tasks(status="escalated", claimed_by="ana", since="3h", limit=1)[0].id
        == ids[4]
    )


BAD_FILTERS: list[tuple[dict[str, Any], type[TaskrailError], str]] = [
    ({"status": "done"}, InvalidFilter, "status"),
    ({"status": ""}, InvalidFilter, "status"),
    ({"status": [1]}, InvalidFilter, "status"),
    ({"status": 5}, InvalidFilter, "status"),
    ({"status": b"failed"}, InvalidFilter, "status"),
    ({"status": ["failed", None]}, InvalidFilter, "status"),
    ({"task_type": ""}, InvalidFilter, "task type"),
    ({"task_type": "x" * 65}, InvalidFilter, "task type"),
    ({"task_type": 5}, InvalidFilter, "task type"),
    ({"task_type": "pay\x00roll"}, InvalidFilter, "task type"),
    ({"task_type": "pay\ud800"}, InvalidFilter, "task type"),
    ({"client_id": -1}, InvalidClientId, "client id"),
    ({"client_id": 2**63}, InvalidClientId, "client id"),
    ({"client_id": "1"}, InvalidClientId, "client id"),
    ({"client_id": True}, InvalidClientId, "client id"),
    ({"agent": ""}, InvalidFilter, "agent"),
    ({"agent": "a\x00"}, InvalidFilter, "agent"),
    ({"agent": ["a"]}, InvalidFilter, "agent"),
    ({"claimed_by": ""}, InvalidFilter, "claimed by"),
    ({"claimed_by": "\udc80"}, InvalidFilter, "claimed by"),
    ({"claimed_by": "x" * 256}, InvalidFilter, "claimed by"),
    ({"since": "yesterday"}, InvalidFilter, "since"),
    ({"since": 5}, InvalidFilter, "since"),
    ({"since": timedelta(days=-1)}, InvalidFilter, "since"),
    ({"since": timedelta.max}, InvalidFilter, "since"),
    ({"limit": 0}, InvalidFilter, "limit"),
    ({"limit": MAX_LIST_LIMIT + 1}, InvalidFilter, "limit"),
    ({"limit": True}, InvalidFilter, "limit"),
    ({"limit": "5"}, InvalidFilter, "limit"),
    ({"limit": None}, InvalidFilter, "limit"),
    ({"limit": 2.0}, InvalidFilter, "limit"),
    ({"after": 0}, InvalidFilter, "after"),
    ({"after": -1}, InvalidFilter, "after"),
    ({"after": 2**63}, InvalidFilter, "after"),
    ({"after": "5"}, InvalidFilter, "after"),
    ({"after": True}, InvalidFilter, "after"),
]


@pytest.mark.parametrize(("query", "error", "name"), BAD_FILTERS, ids=lambda v: repr(v)[:24])
def test_a_bad_filter_is_a_one_line_error(
    backend: Backend, query: dict[str, Any], error: type[TaskrailError], name: str
) -> None:
    with pytest.raises(error) as info:
        backend.trail.list_tasks(**query)

    message = str(info.value)
    assert name in message
    assert "\n" not in message
    assert len(message) < 200


def test_list_tasks_takes_no_unknown_filter(backend: Backend) -> None:
    with pytest.raises(TypeError, match="'colour'; the filters are after, agent, claimed_by"):
        backend.trail.list_tasks(colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="colour"):
        TaskFilter.build(colour="red")  # type: ignore[call-arg]


# -- since ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "want"),
    [
        ("1h", NOW - timedelta(hours=1)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2d", NOW - timedelta(days=2)),
        ("90s", NOW - timedelta(seconds=90)),
        ("1w", NOW - timedelta(weeks=1)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("1h 30m", NOW - timedelta(minutes=90)),
        (" 2D ", NOW - timedelta(days=2)),
        ("0s", NOW),
        ("2026-12-01T10:00:00+02:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01T10:00:00Z", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01T10:00:00", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01 10:00", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2026, 12, 1, 10, tzinfo=EST), datetime(2026, 12, 1, 15, tzinfo=UTC)),
        (datetime(2026, 12, 1, 10), datetime(2026, 12, 1, 10, tzinfo=UTC)),
        (timedelta(hours=2), NOW - timedelta(hours=2)),
        (timedelta(0), NOW),
        (None, None),
    ],
    ids=repr,
)  # fmt: skip
def test_since_forms(since: Any, want: datetime | None) -> None:
    got = parse_since(since, now=NOW)

    assert got == want
    assert got is None or got.tzinfo is not None


@pytest.mark.parametrize(
    "since",
    [
        "", "  ", "1", "h", "1h-", "-1h", "1.5h", "1y", "yesterday", "1h30", "\u0661h",
        "9999999999h", "999999999w", "2026-13-01", "2026-12-01T25:00", "now", "1h\x00",
        "\ud800", 5, 1.5, True, b"1h", timedelta(days=-1), timedelta.max,
        datetime.min.replace(tzinfo=timezone(timedelta(hours=5))),
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
    ],
    ids=repr,
)  # fmt: skip
def test_a_bad_since_is_invalid_filter(since: Any) -> None:
    with pytest.raises(InvalidFilter) as info:
        parse_since(since, now=NOW)

    assert str(info.value).startswith("invalid since: ")
    assert "\n" not in str(info.value)


def test_a_filter_names_what_it_holds() -> None:
    flt = TaskFilter.build(
        status="failed,escalated", task_type="payroll", client_id=7, since="2026-12-01", after=9
    )

    assert flt.to_dict() == {
        "status": ["failed", "escalated"],
        "task_type": "payroll",
        "client_id": 7,
        "after": 9,
        "since": "2026-12-01T00:00:00+00:00",
    }
    assert parse_statuses(["ESCALATED", S.FAILED, " failed "]) == (S.FAILED, S.ESCALATED)
