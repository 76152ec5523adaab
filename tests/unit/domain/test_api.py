"""The producer API (``orchestration.api``) on the embedded default and on real servers."""

from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from structlog.testing import capture_logs

from orchestration import api
from orchestration.agents import registry
from orchestration.api import NewTask
from orchestration.constants import HOP_ASSIGN, QUEUE_HOPS
from orchestration.errors import (
    DatabaseUnavailable,
    InputError,
    InvalidClientId,
    InvalidPayload,
    InvalidTaskItem,
    NotRetryable,
    TaskNotFound,
    UnknownTaskType,
)
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.settings import Settings, get_settings
from orchestration.store.db import Database
from orchestration.store.transitions import apply_transition
from tests.support import race

# Task types of the agents in TASKRAIL_AGENTS=demo_agents,tests.agents (among others).
KNOWN_TYPES = ["bad_result", "bookkeeping", "echo", "payroll", "personal_tax"]


# -- helpers ------------------------------------------------------------------------


def _decode(raw: bytes | str) -> tuple[str, list[Any]]:
    """(task name, args) of one kombu message as the broker stores it (JSON envelope)."""
    envelope = json.loads(raw)
    body = json.loads(base64.b64decode(envelope["body"]))
    return envelope["headers"]["task"], body[0]


def fs_messages(settings: Settings) -> list[tuple[str, list[Any]]]:
    """Hop messages waiting in the embedded file-system broker, oldest first."""
    folder = settings.broker_folder() / "queue"
    files = sorted(folder.glob(f"*.{QUEUE_HOPS}.msg"), key=lambda p: p.stat().st_mtime_ns)
    return [_decode(p.read_bytes()) for p in files]


def redis_messages(settings: Settings) -> list[tuple[str, list[Any]]]:
    """Hop messages waiting in the Redis broker, oldest first (kombu LPUSHes, BRPOPs)."""
    assert settings.broker_url is not None
    client = redis.Redis.from_url(settings.broker_url)
    try:
        raw = client.lrange(QUEUE_HOPS, 0, -1)
        assert client.llen(QUEUE_HOPS) == len(raw)
    finally:
        client.close()
    return [_decode(m) for m in reversed(raw)]


def row_count() -> int:
    with api.client().db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(tasks_table)).scalar_one())


def event_count() -> int:
    with api.client().db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events_table)).scalar_one())


def make_failed(task_id: int) -> None:
    """Drive a pending task to failed through the transition store, as the hops would."""
    db = api.client().db
    assert apply_transition(
        db, task_id, "assign", expected=TaskStatus.PENDING, agent="personal_tax_agent"
    ).applied
    assert apply_transition(db, task_id, "start", expected=TaskStatus.ASSIGNED).applied
    assert apply_transition(
        db,
        task_id,
        "fail",
        expected=TaskStatus.IN_PROGRESS,
        reason="gave up",
        set_={"attempts": 3, "last_error": "gave up"},
    ).applied


# -- submit on the embedded default ----------------------------------------------------


def test_submit_records_a_pending_task_and_sends_its_first_hop(
    embedded: Settings, tmp_path: Path
) -> None:
    # When a task is submitted with no configuration at all
    task_id = api.submit("personal_tax", 42, {"year": 2025, "forms": ["W-2"]})

    # Then it is a pending row in the embedded SQLite file, with its payload
    assert isinstance(task_id, int)
    assert (tmp_path / ".taskrail" / "taskrail.db").is_file()
    task = api.get(task_id)
    assert task.id == task_id
    assert task.status is TaskStatus.PENDING
    assert (task.client_id, task.task_type) == (42, "personal_tax")
    assert task.payload == {"year": 2025, "forms": ["W-2"]}
    assert (task.assigned_agent, task.result, task.attempts, task.idempotency_key) == (
        None,
        None,
        0,
        None,
    )
    assert task.created_at.tzinfo is not None
    assert api.history(task_id) == []
    # and exactly one assign hop is waiting in the file-system broker
    assert fs_messages(embedded) == [(HOP_ASSIGN, [task_id, "personal_tax"])]


def test_submit_without_payload_stores_an_empty_object(embedded: Settings) -> None:
    task_id = api.submit("payroll", 1)

    assert api.get(task_id).payload == {}


def test_payload_is_stored_in_its_json_form(embedded: Settings) -> None:
    task_id = api.submit("payroll", 1, {"months": (1, 2, 3), "nested": {"a": None}})

    assert api.get(task_id).payload == {"months": [1, 2, 3], "nested": {"a": None}}


def test_same_idempotency_key_twice_gives_one_task_and_one_message(embedded: Settings) -> None:
    # Given a task submitted with an idempotency key
    first = api.submit("personal_tax", 42, {"year": 2025}, idempotency_key="client-42-2025")

    # When the producer submits again with the same key (a retried request)
    second = api.submit("personal_tax", 42, {"year": 2024}, idempotency_key="client-42-2025")

    # Then it gets the same id back; one row, the first payload, one hop message
    assert second == first
    assert row_count() == 1
    task = api.get(first)
    assert task.payload == {"year": 2025}
    assert task.idempotency_key == "client-42-2025"
    assert fs_messages(embedded) == [(HOP_ASSIGN, [first, "personal_tax"])]


def test_different_idempotency_keys_make_different_tasks(embedded: Settings) -> None:
    a = api.submit("personal_tax", 42, idempotency_key="a")
    b = api.submit("personal_tax", 42, idempotency_key="b")

    assert a != b
    assert row_count() == 2


def test_submit_many_returns_ids_in_input_order(embedded: Settings) -> None:
    # When a mixed batch is submitted (NewTask objects and mappings)
    items: list[NewTask | dict[str, Any]] = [
        NewTask("payroll", 3, {"n": 0}),
        {"task_type": "personal_tax", "client_id": 1, "payload": {"n": 1}},
        NewTask("bookkeeping", 2, {"n": 2}),
        {"task_type": "echo", "client_id": 5},
    ]
    ids = api.submit_many(items)

    # Then each id belongs to the item at its position, and each got one message
    assert len(ids) == len(set(ids)) == 4
    tasks = [api.get(i) for i in ids]
    assert [(t.task_type, t.client_id) for t in tasks] == [
        ("payroll", 3),
        ("personal_tax", 1),
        ("bookkeeping", 2),
        ("echo", 5),
    ]
    assert [t.payload for t in tasks] == [{"n": 0}, {"n": 1}, {"n": 2}, {}]
    assert sorted(fs_messages(embedded)) == sorted(
        (HOP_ASSIGN, [i, t.task_type]) for i, t in zip(ids, tasks, strict=True)
    )


def test_submit_many_with_a_repeated_key_in_one_batch(embedded: Settings) -> None:
    ids = api.submit_many(
        [
            NewTask("payroll", 1, idempotency_key="k1"),
            NewTask("payroll", 2),
            NewTask("payroll", 1, idempotency_key="k1"),
        ]
    )

    assert ids[0] == ids[2] != ids[1]
    assert row_count() == 2
    assert len(fs_messages(embedded)) == 2


def test_submit_many_of_nothing_writes_nothing(embedded: Settings) -> None:
    assert api.submit_many([]) == []
    assert row_count() == 0
    assert fs_messages(embedded) == []


BAD_ITEMS = [
    pytest.param(NewTask("no_such_type", 1), UnknownTaskType, id="unknown-type"),
    pytest.param(NewTask("payroll", "7"), InvalidClientId, id="client-str"),  # type: ignore[arg-type]
    pytest.param(NewTask("payroll", 1, ["not", "object"]), InvalidPayload, id="payload-list"),  # type: ignore[arg-type]
    pytest.param(NewTask("payroll", 1, {"x": math.nan}), InvalidPayload, id="payload-nan"),
    pytest.param({"task_type": "payroll"}, InvalidTaskItem, id="mapping-without-client"),
    pytest.param({"task_type": "payroll", "client": 1}, InvalidTaskItem, id="unknown-field"),
]


@pytest.mark.parametrize("position", [0, 2], ids=["first", "last"])
@pytest.mark.parametrize(("bad", "error"), BAD_ITEMS)
def test_submit_many_validates_every_item_before_writing(
    embedded: Settings, bad: Any, error: type[Exception], position: int
) -> None:
    # Given a batch with one bad item among good ones
    items: list[Any] = [NewTask("payroll", 1), NewTask("personal_tax", 2)]
    items.insert(position, bad)

    # When it is submitted
    with pytest.raises(error):
        api.submit_many(items)

    # Then nothing at all was written or sent
    assert row_count() == 0
    assert fs_messages(embedded) == []


# -- bad input ----------------------------------------------------------------------------


class _NotJson:
    pass


BAD_SUBMITS = [
    pytest.param(("tax_return", 1, None), UnknownTaskType, id="unknown-type"),
    pytest.param(("", 1, None), UnknownTaskType, id="empty-type"),
    pytest.param(("payroll", 1, ["a", "b"]), InvalidPayload, id="payload-list"),
    pytest.param(("payroll", 1, "year=2025"), InvalidPayload, id="payload-str"),
    pytest.param(("payroll", 1, 2025), InvalidPayload, id="payload-int"),
    pytest.param(("payroll", 1, {"when": _NotJson()}), InvalidPayload, id="payload-object"),
    pytest.param(("payroll", 1, {"ids": {1, 2}}), InvalidPayload, id="payload-set"),
    pytest.param(("payroll", 1, {("a", "b"): 1}), InvalidPayload, id="payload-tuple-key"),
    pytest.param(("payroll", 1, {"amount": math.nan}), InvalidPayload, id="payload-nan"),
    pytest.param(("payroll", 1, {"amount": math.inf}), InvalidPayload, id="payload-inf"),
    pytest.param(("payroll", 1, {"big": "x" * (256 * 1024)}), InvalidPayload, id="payload-too-big"),
    pytest.param(("payroll", "42", None), InvalidClientId, id="client-str"),
    pytest.param(("payroll", 4.2, None), InvalidClientId, id="client-float"),
    pytest.param(("payroll", None, None), InvalidClientId, id="client-none"),
    pytest.param(("payroll", True, None), InvalidClientId, id="client-true"),
    pytest.param(("payroll", False, None), InvalidClientId, id="client-false"),
]


@pytest.mark.parametrize(("args", "error"), BAD_SUBMITS)
def test_bad_submit_raises_its_own_error_and_writes_nothing(
    embedded: Settings, args: tuple[Any, ...], error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        api.submit(*args)

    assert isinstance(info.value, InputError)
    assert row_count() == 0
    assert fs_messages(embedded) == []


def test_unknown_task_type_lists_the_known_types(embedded: Settings) -> None:
    with pytest.raises(UnknownTaskType) as info:
        api.submit("tax_return", 1)

    message = str(info.value)
    assert "tax_return" in message
    assert set(KNOWN_TYPES) <= set(info.value.known)
    assert info.value.known == registry.task_types()
    for known in info.value.known:
        assert known in message
    assert info.value.fields()["task_type"] == "tax_return"


def test_missing_client_id_is_a_type_error(embedded: Settings) -> None:
    with pytest.raises(TypeError):
        api.submit("payroll")  # type: ignore[call-arg]

    assert row_count() == 0


def test_bad_idempotency_key_writes_nothing(embedded: Settings) -> None:
    with pytest.raises(InvalidPayload):
        api.submit("payroll", 1, idempotency_key="")
    with pytest.raises(InvalidPayload):
        api.submit("payroll", 1, idempotency_key="k" * 256)

    assert row_count() == 0


@pytest.mark.parametrize("call", [api.get, api.history, api.retry], ids=["get", "history", "retry"])
@pytest.mark.parametrize("task_id", [12345, "1", True], ids=["absent", "str", "bool"])
def test_unknown_task_id_is_task_not_found(embedded: Settings, call: Any, task_id: Any) -> None:
    api.submit("payroll", 1)  # task 1 exists: a str or bool id must not reach it

    with pytest.raises(TaskNotFound) as info:
        call(task_id)

    assert info.value.task_id == task_id
    assert row_count() == 1
    assert event_count() == 0


# -- retry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [[], ["assign"], ["assign", "start"], ["assign", "escalate"]],
    ids=["pending", "assigned", "in_progress", "escalated"],
)
def test_retry_of_a_task_that_is_not_failed_is_refused(
    embedded: Settings, steps: list[str]
) -> None:
    # Given a task that is not failed
    task_id = api.submit("personal_tax", 42)
    for event in steps:
        apply_transition(api.client().db, task_id, event, agent="personal_tax_agent")
    before = api.get(task_id)
    events_before = api.history(task_id)

    # When an operator retries it
    with pytest.raises(NotRetryable) as info:
        api.retry(task_id)

    # Then it is refused, naming the status, and nothing changed or was sent
    assert info.value.status == before.status
    assert str(before.status) in str(info.value)
    assert api.get(task_id) == before
    assert api.history(task_id) == events_before
    assert len(fs_messages(embedded)) == 1  # only the submit's


def test_retry_of_a_failed_task_sends_it_back_to_pending(embedded: Settings) -> None:
    # Given a task that failed after its attempts
    task_id = api.submit("personal_tax", 42, {"year": 2025})
    make_failed(task_id)
    assert api.get(task_id).status is TaskStatus.FAILED

    # When an operator retries it
    api.retry(task_id)

    # Then it is pending again without agent or attempts, the retry is audited,
    # and a new assign hop is on its way
    task = api.get(task_id)
    assert task.status is TaskStatus.PENDING
    assert task.assigned_agent is None
    assert task.attempts == 0
    assert task.completed_at is None
    last = api.history(task_id)[-1]
    assert (last.event, last.from_status, last.to_status) == (
        "retry",
        TaskStatus.FAILED,
        TaskStatus.PENDING,
    )
    assert last.worker == "api"
    assert [e.event for e in api.history(task_id)] == ["assign", "start", "fail", "retry"]
    assert fs_messages(embedded) == [(HOP_ASSIGN, [task_id, "personal_tax"])] * 2

    # and a second retry is refused: it is no longer failed
    with pytest.raises(NotRetryable):
        api.retry(task_id)


def test_taskrail_instance_with_explicit_settings(embedded: Settings, tmp_path: Path) -> None:
    """A producer may build its own client; it does not touch the process-wide one."""
    settings = Settings(data_dir=tmp_path / "elsewhere", agents=["demo_agents"])
    trail = api.Taskrail(settings)
    try:
        task_id = trail.submit("bookkeeping", 9)
        assert trail.get(task_id).status is TaskStatus.PENDING
        assert trail.counts()["pending"] == 1
        assert (tmp_path / "elsewhere" / "taskrail.db").is_file()
    finally:
        trail.close()
    assert row_count() == 0  # the default client's database is another file


# -- infrastructure errors -------------------------------------------------------------------


UNREACHABLE_DB = "postgresql://bob:s3cret@127.0.0.1:5999/x"


@pytest.mark.parametrize(
    "call",
    [
        lambda: api.submit("payroll", 1),
        lambda: api.submit_many([NewTask("payroll", 1)]),
        lambda: api.get(1),
        lambda: api.history(1),
        lambda: api.retry(1),
    ],
    ids=["submit", "submit_many", "get", "history", "retry"],
)
def test_unreachable_database_names_host_and_hides_password(
    embedded: Settings, monkeypatch: pytest.MonkeyPatch, call: Any
) -> None:
    # Given a database URL with a password where nothing listens
    monkeypatch.setenv("TASKRAIL_DATABASE_URL", UNREACHABLE_DB)
    get_settings.cache_clear()
    api.reset_client()

    # When the API is used
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        call()

    # Then it fails fast with DatabaseUnavailable naming host:port, never the password
    assert time.monotonic() - started < 10
    err = info.value
    assert "127.0.0.1:5999" in str(err)
    assert err.where == "127.0.0.1:5999/x"
    everything = "".join(traceback.format_exception(err)) + repr(err) + repr(err.fields())
    assert "s3cret" not in everything
    assert "bob:" not in str(err)


# -- real PostgreSQL and Redis ------------------------------------------------------------------

# A database of the session's own redis-server (conftest `redis_server`) for this
# module's broker, flushed before each test: no worker consumes there, so the messages
# these tests count stay put.
API_BROKER_DB = 14


@pytest.fixture
def servers(
    pg_db: Database,
    pg_url: str,
    redis_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Settings]:
    """Like conftest's ``server_settings``: real PostgreSQL and a real Redis broker."""
    broker = f"{redis_server}/{API_BROKER_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    client.close()
    for key in list(os.environ):
        if key.startswith("TASKRAIL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TASKRAIL_DATABASE_URL", pg_url)
    monkeypatch.setenv("TASKRAIL_BROKER_URL", broker)
    monkeypatch.setenv("TASKRAIL_AGENTS", "demo_agents,tests.agents")
    monkeypatch.setenv("TASKRAIL_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    api.reset_client()
    yield get_settings()
    api.reset_client()
    get_settings.cache_clear()


@pytest.mark.integration
def test_submit_on_postgres_sends_one_message_to_redis(servers: Settings) -> None:
    # When a task is submitted against the real servers
    task_id = api.submit("personal_tax", 42, {"year": 2025, "amounts": [1.5, 2]})

    # Then the row is pending in PostgreSQL, and the broker holds one assign hop
    assert api.client().db.is_postgres
    task = api.get(task_id)
    assert task.status is TaskStatus.PENDING
    assert task.payload == {"year": 2025, "amounts": [1.5, 2]}
    assert redis_messages(servers) == [(HOP_ASSIGN, [task_id, "personal_tax"])]


@pytest.mark.integration
def test_idempotency_key_on_postgres_gives_one_row_and_one_message(
    servers: Settings,
) -> None:
    first = api.submit("payroll", 7, {"month": 11}, idempotency_key="payroll-7-11")
    second = api.submit("payroll", 7, {"month": 12}, idempotency_key="payroll-7-11")

    assert first == second
    assert row_count() == 1
    assert api.get(first).payload == {"month": 11}
    assert redis_messages(servers) == [(HOP_ASSIGN, [first, "payroll"])]


@pytest.mark.integration
def test_submit_many_on_postgres_resolves_keys_in_one_batch(servers: Settings) -> None:
    # Given a task already submitted with key "old"
    old = api.submit("payroll", 1, {"n": 0}, idempotency_key="old")
    # When one batch mixes that key, a key repeated in the batch, new keys and none
    ids = api.submit_many(
        [
            NewTask("payroll", 2, {"n": 1}, idempotency_key="old"),
            NewTask("payroll", 3, {"n": 2}, idempotency_key="twice"),
            NewTask("bookkeeping", 4, {"n": 3}),
            NewTask("payroll", 5, {"n": 4}, idempotency_key="twice"),
            NewTask("personal_tax", 6, {"n": 5, "nested": {"a": [1, 2.5, None]}}),
        ]
    )
    # Then keyed repeats get the first task's id, and only new tasks are written and sent
    assert ids[0] == old
    assert ids[1] == ids[3]
    assert len({old, ids[1], ids[2], ids[4]}) == 4
    assert row_count() == 4
    assert api.get(ids[4]).payload == {"n": 5, "nested": {"a": [1, 2.5, None]}}
    assert api.get(old).payload == {"n": 0}
    assert sorted(redis_messages(servers)) == sorted(
        [(HOP_ASSIGN, [old, "payroll"]), (HOP_ASSIGN, [ids[1], "payroll"]),
         (HOP_ASSIGN, [ids[2], "bookkeeping"]), (HOP_ASSIGN, [ids[4], "personal_tax"])]
    )  # fmt: skip


@pytest.mark.integration
def test_concurrent_submits_with_one_key_make_one_task(servers: Settings) -> None:
    # Given two producers with their own connections
    producers = [api.Taskrail(servers), api.Taskrail(servers)]
    keys = [f"key-{i}" for i in range(20)]
    barrier = threading.Barrier(2, timeout=30)
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            for key in keys:
                barrier.wait()
                got[n].append(producers[n].submit("payroll", 1, {"key": key}, idempotency_key=key))
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    # When both submit each key at the same moment
    race(run, producers, 60)

    # Then both got the same id for each key, one row and one message per key
    assert not errors, errors
    assert got[0] == got[1]
    assert len(set(got[0])) == len(keys)
    assert row_count() == len(keys)
    assert sorted(args[0] for _, args in redis_messages(servers)) == sorted(got[0])


@pytest.mark.integration
def test_submit_many_on_postgres(servers: Settings) -> None:
    ids = api.submit_many([NewTask("payroll", n, {"n": n}) for n in range(10)])

    assert [api.get(i).client_id for i in ids] == list(range(10))
    assert redis_messages(servers) == [(HOP_ASSIGN, [i, "payroll"]) for i in ids]

    with pytest.raises(InvalidClientId):
        api.submit_many([NewTask("payroll", 1), NewTask("payroll", "x")])  # type: ignore[arg-type]
    assert row_count() == 10
    assert len(redis_messages(servers)) == 10


@pytest.mark.integration
def test_retry_on_postgres_sends_a_new_assign_hop(servers: Settings) -> None:
    # Given a failed task on the real servers
    task_id = api.submit("personal_tax", 42)
    make_failed(task_id)

    # When it is retried
    api.retry(task_id)

    # Then it is pending, audited, and a second assign hop is in Redis
    task = api.get(task_id)
    assert (task.status, task.assigned_agent, task.attempts) == (TaskStatus.PENDING, None, 0)
    last = api.history(task_id)[-1]
    assert (last.event, last.from_status, last.to_status) == (
        "retry",
        TaskStatus.FAILED,
        TaskStatus.PENDING,
    )
    assert redis_messages(servers) == [(HOP_ASSIGN, [task_id, "personal_tax"])] * 2


@pytest.mark.integration
def test_broker_down_at_submit_still_records_the_task(
    servers: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given real PostgreSQL but a broker URL (with a password) where nothing listens
    monkeypatch.setenv("TASKRAIL_BROKER_URL", "redis://:s3cret@127.0.0.1:6399/0")
    get_settings.cache_clear()
    api.reset_client()

    # When a task is submitted
    started = time.monotonic()
    with capture_logs() as logs:
        task_id = api.submit("personal_tax", 42, {"year": 2025})
    elapsed = time.monotonic() - started

    # Then submit still returns the id of a pending task (the sweeper sends it later),
    # after a bounded number of publish retries, and says so in the log without the password
    assert api.get(task_id).status is TaskStatus.PENDING
    assert api.history(task_id) == []
    assert row_count() == 1
    assert elapsed < 10, f"submit took {elapsed:.1f}s with the broker down"
    deferred = [e for e in logs if e["event"] == "enqueue_deferred"]
    assert len(deferred) == 1
    assert deferred[0]["first_task_id"] == task_id
    assert deferred[0]["count"] == 1
    assert "127.0.0.1:6399" in deferred[0]["error"]
    assert "s3cret" not in repr(logs)
    print(f"submit with the broker down took {elapsed:.2f}s")
