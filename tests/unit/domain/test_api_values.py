"""What the producer API accepts, stores and hands back, on the real PostgreSQL.

Issues 18.2, 18.4, 19.1, 19.2 and 19.5: every failure of the API is a taskrail error
with nothing written; what is accepted reads back equal (NUL, surrogates, floats) and
passes the worker's own check of a loaded row; concurrent batches never deadlock.
The broker is a ``redis-server`` of this module's own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from structlog.testing import capture_logs

from orchestration import api
from orchestration.agents import TaskView
from orchestration.api import NewTask
from orchestration.errors import (
    InputError,
    InvalidClientId,
    InvalidPayload,
    TaskNotFound,
    TaskrailError,
)
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.settings import Settings
from orchestration.store.db import Database
from orchestration.store.transitions import apply_transition
from tests.support import OwnRedis, json_types, race, settings_from

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_broker() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    yield server
    server.stop()


@pytest.fixture
def pg_api(
    pg_db: Database,
    pg_url: str,
    own_broker: OwnRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Settings]:
    """The process-wide API client on the session's PostgreSQL and this module's Redis."""
    env = {
        "TASKRAIL_DATABASE_URL": pg_url,
        "TASKRAIL_BROKER_URL": own_broker.url,
        "TASKRAIL_AGENTS": "demo_agents,tests.agents",
        "TASKRAIL_DATA_DIR": str(tmp_path / "data"),
    }
    with settings_from(env, monkeypatch) as s:
        yield s


def row_count() -> int:
    with api.client().db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(tasks_table)).scalar_one())


def event_count() -> int:
    with api.client().db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events_table)).scalar_one())


def stored_row(task_id: int) -> dict[str, Any]:
    """The row as a worker loads it (no decoding by the API)."""
    with api.client().db.connect() as conn:
        row = conn.execute(select(tasks_table).where(tasks_table.c.id == task_id)).mappings().one()
    return dict(row)


def assert_refused(error: type[Exception], *args: Any, **kwargs: Any) -> InputError:
    """submit(*args) raises ``error`` (an InputError) and writes nothing."""
    before = row_count()
    with pytest.raises(error) as info:
        api.submit(*args, **kwargs)
    assert isinstance(info.value, InputError)
    assert row_count() == before
    return info.value


def worker_accepts(task_id: int) -> TaskView:
    """The loaded row passes the worker's check and gives it a view of the task."""
    from orchestration.values import check_task_row

    row = stored_row(task_id)
    check_task_row(row["client_id"], row["task_type"], row["payload"])
    return TaskView.build(task_id, row["client_id"], row["task_type"], row["payload"], 1)


def thaw(value: Any) -> Any:
    """A TaskView's frozen payload as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` containers deep: {"a": {"a": ... {} ...}}."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# -- A and D: stored faithfully ------------------------------------------------------------


TEXTS = {
    "nul": "page 1\x00page 2",
    "lone_high": "a\ud800b",
    "lone_low": "\udc80",
    "split_pair": "\ud83d\ude00",  # two code points in Python; one emoji to a JSON reader
    "escape_char": "\ue000 and \ue0000000",
    "plain": "plain €",
}


def test_nul_and_surrogates_in_a_payload_read_back_equal(pg_api: Settings) -> None:
    # Given a payload with text PostgreSQL cannot hold as it is, in values and in keys
    payload = {**TEXTS, "nested": [dict(TEXTS)], "key\x00with nul": 1, "\udfff": 2}

    # When it is submitted
    task_id = api.submit("payroll", 1, payload)

    # Then the API hands it back equal, and the worker sees it equal too
    assert api.get(task_id).payload == payload
    view = worker_accepts(task_id)
    assert thaw(view.payload) == payload
    assert view.payload["nul"] == TEXTS["nul"]
    assert view.payload["key\x00with nul"] == 1
    assert view.payload["nested"][0]["split_pair"] == TEXTS["split_pair"]


def test_floats_stay_floats(pg_api: Settings) -> None:
    payload = {
        "big": 1e20,
        "edge": 1e16,
        "below": 9999999999999998.0,
        "huge": -1.5e300,
        "max": 1.7976931348623157e308,
        "one": 1.0,
        "tiny": 5e-324,
        "small": 1e-7,
        "int": 10**18,
        "list": [2.0, 3e22, 4],
    }

    task_id = api.submit("payroll", 1, payload)

    back = api.get(task_id).payload
    assert back == payload
    assert {k: type(v) for k, v in back.items()} == {k: type(v) for k, v in payload.items()}
    assert [type(v) for v in back["list"]] == [float, float, int]
    worker_accepts(task_id)


def test_results_and_reasons_with_nul_and_surrogates_read_back_equal(pg_api: Settings) -> None:
    # Given two tasks in progress
    db = api.client().db
    done, failed = api.submit("payroll", 1), api.submit("payroll", 2)
    for task_id in (done, failed):
        apply_transition(db, task_id, "assign", expected=TaskStatus.PENDING, agent="payroll_agent")
        apply_transition(db, task_id, "start", expected=TaskStatus.ASSIGNED)
    result = {"text": TEXTS["nul"], "parts": [TEXTS["lone_low"], 1e20], TEXTS["escape_char"]: None}
    reason = "could not parse\x00 the PDF \ud800 \ue000"

    # When one completes with that result and the other fails with that reason
    apply_transition(db, done, "complete", expected=TaskStatus.IN_PROGRESS, set_={"result": result})
    apply_transition(
        db,
        failed,
        "fail",
        expected=TaskStatus.IN_PROGRESS,
        reason=reason,
        set_={"last_error": reason},
    )

    # Then the API reads both back as they were given
    assert api.get(done).result == result
    assert api.get(done).status is TaskStatus.COMPLETED
    assert api.get(failed).last_error == reason
    assert api.history(failed)[-1].detail == reason


# -- B and C: refused with a taskrail error, nothing written -------------------------------


@pytest.mark.parametrize("client_id", [-1, -(2**63), 2**63, 2**64, 10**40])
def test_client_ids_outside_0_to_2_63_are_refused(pg_api: Settings, client_id: int) -> None:
    err = assert_refused(InvalidClientId, "payroll", client_id)
    assert "client id" in str(err)


@pytest.mark.parametrize("client_id", [0, 2**63 - 1])
def test_client_ids_at_the_bounds_are_kept(pg_api: Settings, client_id: int) -> None:
    task_id = api.submit("payroll", client_id)
    assert api.get(task_id).client_id == client_id
    worker_accepts(task_id)


@pytest.mark.parametrize("call", [api.get, api.history, api.retry], ids=["get", "history", "retry"])
@pytest.mark.parametrize("task_id", [2**63, 2**64 + 1, -1, -(2**63) - 1, 0])
def test_task_ids_outside_the_column_are_not_found(
    pg_api: Settings, call: Any, task_id: int
) -> None:
    with pytest.raises(TaskNotFound) as info:
        call(task_id)
    assert "SELECT" not in str(info.value)
    assert event_count() == 0


@pytest.mark.parametrize("key", ["k\x00", "k\ud800", "\udc80", "x" * 256, "", 5, b"key"], ids=repr)
def test_bad_idempotency_keys_are_refused(pg_api: Settings, key: Any) -> None:
    err = assert_refused(InvalidPayload, "payroll", 1, {"a": 1}, idempotency_key=key)
    assert "idempotency key" in str(err)
    assert "k\x00" not in str(err)


@pytest.mark.parametrize("depth", [255, 300, 100_000])
def test_payloads_nested_too_deep_are_refused(pg_api: Settings, depth: int) -> None:
    err = assert_refused(InvalidPayload, "payroll", 1, nested(depth))
    assert "nested" in str(err)
    assert len(str(err)) < 400


def test_a_payload_at_the_depth_limit_is_kept_and_runs(pg_api: Settings) -> None:
    payload = nested(254)
    task_id = api.submit("payroll", 1, payload)
    assert api.get(task_id).payload == payload
    worker_accepts(task_id)


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({1: "int", "1": "str"}, "$"),
        ({None: 1}, "$"),
        ({True: 1}, "$"),
        ({"a": [{"b": {2.5: 1}}]}, "$.a[0].b"),
        ({"amounts": [1, 2, 2**64]}, "$.amounts[2]"),
        ({"amounts": [1, -(2**63) - 1]}, "$.amounts[1]"),
        ({"x": {"y": math.nan}}, "$.x.y"),
        ({"when": {1, 2}}, "$.when"),
    ],
    ids=["int-and-str-key", "none-key", "true-key", "float-key", "int-2-64", "int-below", "nan",
         "set"],
)  # fmt: skip
def test_what_json_cannot_keep_is_refused_with_its_path(
    pg_api: Settings, payload: dict[Any, Any], where: str
) -> None:
    err = assert_refused(InvalidPayload, "payroll", 1, payload)
    assert f" {where}" in str(err), str(err)


def test_a_too_large_payload_is_refused(pg_api: Settings) -> None:
    err = assert_refused(InvalidPayload, "payroll", 1, {"nul": "\x00" * 60_000})
    assert "bytes" in str(err)


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ({"task_type": "payroll", "client_id": 1, "bogus": 1}, ["item 2", "bogus"]),
        ({"task_type": "payroll"}, ["item 2", "client_id"]),
        ({"task_type": "payroll", "client_id": -5}, ["item 2", "client id"]),
        ({"task_type": "payroll", "client_id": 1, "payload": {3: 1}}, ["item 2", "payload"]),
        (NewTask("payroll", 1, idempotency_key="\x00"), ["item 2", "idempotency key"]),
        ({"task_type": ["payroll"], "client_id": 1}, ["item 2", "task type"]),
        ("payroll", ["item 2"]),
        (None, ["item 2"]),
    ],
    ids=["unknown-field", "missing-field", "negative-client", "int-key", "nul-key",
         "list-type", "str-item", "none-item"],
)  # fmt: skip
def test_submit_many_names_the_bad_item_and_writes_nothing(
    pg_api: Settings, item: Any, words: list[str]
) -> None:
    items = [NewTask("payroll", 1), {"task_type": "payroll", "client_id": 2}, item]
    with pytest.raises(InputError) as info:
        api.submit_many(items)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert row_count() == 0


def test_submit_many_of_something_not_iterable_is_an_input_error(pg_api: Settings) -> None:
    with pytest.raises(InputError):
        api.submit_many(5)  # type: ignore[arg-type]
    assert row_count() == 0


# -- C: the property ------------------------------------------------------------------------

# Any code point, with the ones PostgreSQL refuses (and the escape character) often.
chars = st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ue000", "0"]
)
texts = st.text(chars, max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | texts
)
json_like = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(texts | st.integers() | st.none() | st.booleans(), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
payloads = st.dictionaries(texts, json_like, max_size=5) | json_like
client_ids = st.integers(min_value=0, max_value=2**63 - 1) | st.integers() | st.none() | texts
keys = st.none() | st.text(chars, max_size=300) | st.integers()


def _outcome(call: Any) -> tuple[Any, BaseException | None]:
    try:
        return call(), None
    except TaskrailError as err:
        return None, err


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=payloads, client_id=client_ids, key=keys)
def test_any_submission_is_refused_cleanly_or_reads_back_equal(
    pg_api: Settings, payload: Any, client_id: Any, key: Any
) -> None:
    before = row_count()
    task_id, err = _outcome(lambda: api.submit("payroll", client_id, payload, idempotency_key=key))
    event(type(err).__name__ if err else "accepted")
    if err is not None:
        assert isinstance(err, InputError), repr(err)
        assert row_count() == before
        return
    row = api.get(task_id)
    if row_count() == before:  # an idempotency key seen in an earlier example
        assert row.idempotency_key == key
        return
    assert row.payload == (payload if payload is not None else {})
    assert row.client_id == client_id
    assert thaw(worker_accepts(task_id).payload) == row.payload


storable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=25,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.dictionaries(texts, storable, max_size=6),
    client_id=st.integers(min_value=0, max_value=2**63 - 1),
    key=st.none() | st.text(chars.filter(lambda ch: ch not in "\x00\ud800\udfff"), min_size=1),
)
def test_any_storable_payload_reads_back_equal_with_itsjson_types(
    pg_api: Settings, payload: dict[str, Any], client_id: int, key: str | None
) -> None:
    try:
        task_id = api.submit("payroll", client_id, payload, idempotency_key=key)
    except InputError as err:  # only a key with a surrogate of the wide alphabet
        assert "idempotency key" in str(err), str(err)
        return
    row = api.get(task_id)
    if key is not None and row.idempotency_key == key and row.client_id != client_id:
        return  # the key's task from an earlier example
    assert row.payload == payload
    assert json_types(row.payload) == json_types(payload)
    assert thaw(worker_accepts(task_id).payload) == payload


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    task_id=st.integers() | st.text(max_size=4) | st.none() | st.floats(),
    call=st.sampled_from(["get", "history", "retry"]),
)
def test_any_task_id_is_found_or_not_found(pg_api: Settings, task_id: Any, call: str) -> None:
    _value, err = _outcome(lambda: getattr(api, call)(task_id))
    if err is not None:
        assert isinstance(err, InputError), repr(err)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(
        st.fixed_dictionaries(
            {"task_type": st.sampled_from(["payroll", "echo"]), "client_id": client_ids},
            optional={"payload": payloads, "idempotency_key": keys, "extra": st.none()},
        ),
        max_size=5,
    )
)
def test_any_batch_is_refused_whole_or_reads_back_equal(
    pg_api: Settings, items: list[dict[str, Any]]
) -> None:
    before = row_count()
    ids, err = _outcome(lambda: api.submit_many(items))
    if err is not None:
        assert isinstance(err, InputError), repr(err)
        assert row_count() == before
        return
    assert len(ids) == len(items)
    for task_id, item in zip(ids, items, strict=True):
        row = api.get(task_id)
        if (
            item.get("idempotency_key") is not None
            and row.idempotency_key == item.get("idempotency_key")
            and row.payload != (item.get("payload") or {})
        ):
            continue  # the key's first task (in this batch or an earlier example)
        assert row.payload == (item.get("payload") if item.get("payload") is not None else {})
        worker_accepts(task_id)


# -- E: concurrent batches ------------------------------------------------------------------

# Long enough batches that two of them overlap in time on the server.
KEYS_PER_BATCH = 300


def test_batches_with_overlapping_keys_in_opposite_orders_do_not_deadlock(
    pg_api: Settings,
) -> None:
    # Given two producers with connections of their own, and rounds of batches whose
    # keys overlap, one producer sending them in the reverse order of the other
    producers = [api.Taskrail(pg_api), api.Taskrail(pg_api)]
    rounds = 20
    barrier = threading.Barrier(2, timeout=60)
    got: list[list[list[int]]] = [[], []]
    errors: list[BaseException] = []

    def batch(n: int, r: int) -> list[NewTask]:
        keys = [f"r{r}-k{i}" for i in range(KEYS_PER_BATCH)]
        if n == 1:
            keys.reverse()
        return [NewTask("payroll", 1, {"key": k}, idempotency_key=k) for k in keys]

    def run(n: int) -> None:
        try:
            for r in range(rounds):
                items = batch(n, r)
                barrier.wait()
                got[n].append(producers[n].submit_many(items))
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    # When both send each round at the same moment
    race(run, producers, 120)

    # Then no batch failed, and both got the same id for each key, in their own order
    assert not errors, errors
    for r in range(rounds):
        mine = dict(zip([t.idempotency_key for t in batch(0, r)], got[0][r], strict=True))
        theirs = dict(zip([t.idempotency_key for t in batch(1, r)], got[1][r], strict=True))
        assert mine == theirs
        assert all(api.get(i).payload == {"key": k} for k, i in list(mine.items())[:3])
    assert row_count() == rounds * KEYS_PER_BATCH


def test_a_batch_that_loses_a_deadlock_is_tried_again(pg_api: Settings, pg_url: str) -> None:
    # Given another transaction that holds key "dl-b" and will wait for "dl-a" (and is
    # never the one PostgreSQL picks to break the deadlock: its check comes 10 s late)
    other = psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=False)
    other.execute("SET deadlock_timeout = '10s'")
    insert = (
        "INSERT INTO tasks (client_id, task_type, status, payload, attempts, idempotency_key,"
        " created_at, updated_at) VALUES (9, 'payroll', 'pending', '{}', 0, %s, now(), now())"
    )
    other.execute(insert, ("dl-b",))
    result: list[Any] = []

    def submit() -> None:
        try:
            keys = ["dl-a", "dl-b"]
            result.append(api.submit_many([NewTask("payroll", 1, idempotency_key=k) for k in keys]))
        except BaseException as err:
            result.append(err)

    # When a batch with both keys takes "dl-a" and waits for "dl-b"
    producer = threading.Thread(target=submit)
    with capture_logs() as logs:
        producer.start()
        _wait_for_a_lock_wait(pg_url)
        other.execute(insert, ("dl-a",))  # waits for the batch: a deadlock, the batch loses
        other.rollback()
        other.close()
        producer.join(30)

    # Then the batch was tried again and went through, and nobody heard of an outage
    assert len(result) == 1 and isinstance(result[0], list), result
    assert [api.get(i).idempotency_key for i in result[0]] == ["dl-a", "dl-b"]
    assert row_count() == 2
    assert [e["attempt"] for e in logs if e["event"] == "submit_conflict_retry"] == [1]


def _wait_for_a_lock_wait(pg_url: str, timeout_s: float = 10) -> None:
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as probe:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            waiting = probe.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.02)
    raise AssertionError("the batch never waited for the other transaction's key")
