"""The async producer API (issue 22.4) and its servers: a call that waits for the
database leaves the event loop running (counted in ticks of another coroutine, not
timed), and a database or broker that is down gives the sync API's outcome: the same
DatabaseUnavailable, or a task kept pending for the sweeper when its hop cannot go."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from structlog.testing import capture_logs

from orchestration import api
from orchestration.errors import ConfigurationError, DatabaseUnavailable
from orchestration.models import TaskStatus
from orchestration.settings import Settings
from orchestration.store.aio import AsyncDatabase
from orchestration.store.db import Database
from tests.support import OwnPostgres, OwnRedis, settings_from
from tests.unit.domain.aio_support import Loop, async_trail, everything, outcome
from tests.unit.domain.people_support import AGENTS, Backend

S = TaskStatus
TICKS = 50  # turns of the loop the ticker must make while a call waits


class Lock:
    """A write lock on the tasks table held by another connection, in a thread, until
    ``enough`` is set (or 30 s pass); ``released`` is set just before it is let go."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.taken = threading.Event()
        self.enough = threading.Event()
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._hold)

    def __enter__(self) -> Lock:
        self.thread.start()
        assert self.taken.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.enough.set()
        self.thread.join(30)

    def _hold(self) -> None:
        url = self.backend.db.url
        if self.backend.name == "sqlite":
            conn: Any = sqlite3.connect(url.database, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")  # no other writer until the commit
        else:
            conn = psycopg.connect(
                host=url.host, port=url.port, user=url.username, dbname=url.database
            )
            conn.execute("LOCK TABLE tasks IN EXCLUSIVE MODE")  # reads pass, writes wait
        self.taken.set()
        self.enough.wait(30)
        self.released.set()
        conn.commit()
        conn.close()


@pytest.mark.parametrize("call", ["submit", "submit_many", "cancel", "retry_many"])
def test_a_call_waiting_on_a_locked_database_leaves_the_loop_running(
    backend: Backend, call: str
) -> None:
    # Given a task, and another connection holding the write lock
    failed = backend.put(S.FAILED)
    pending = backend.put(S.PENDING)
    calls = {
        "submit": ("submit", ("payroll", 7, {"n": 1}), {}),
        "submit_many": ("submit_many", ([{"task_type": "payroll", "client_id": 7}],), {}),
        "cancel": ("cancel", (pending,), {"reason": "stop"}),
        "retry_many": ("retry_many", (), {"task_type": "personal_tax"}),
    }
    method, args, kwargs = calls[call]

    async def scene(loop: Loop, lock: Lock) -> tuple[int, bool]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1
                if ticks == TICKS:
                    lock.enough.set()  # the loop turned while the call waited: let go

        ticking = asyncio.create_task(ticker())
        await getattr(loop.trail, method)(*args, **kwargs)
        waited = lock.released.is_set()
        ticking.cancel()
        return ticks, waited

    with async_trail(backend.settings) as loop:
        loop.call("get", pending)  # connected, schema checked: the wait is the lock's
        # When the async API makes a call that must write
        with Lock(backend) as lock:
            ticks, waited = loop.run(scene(loop, lock))

    # Then the call finished only after the lock was let go, and the loop kept turning
    # while it waited (a blocked loop would reach no tick until the 30 s release)
    assert waited
    assert ticks >= TICKS
    # and the write was made
    if call == "cancel":
        assert backend.trail.get(pending).status is S.CANCELLED
    if call == "retry_many":
        assert backend.trail.get(failed).status is S.PENDING


# -- servers down ------------------------------------------------------------------------


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[OwnPostgres]:
    server = OwnPostgres().init().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    try:
        yield server
    finally:
        server.stop()


def _settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str
) -> contextlib.AbstractContextManager[Settings]:
    base = {"TASKRAIL_AGENTS": AGENTS, "TASKRAIL_DATA_DIR": str(tmp_path / "data")}
    settings: contextlib.AbstractContextManager[Settings] = settings_from(
        {**base, **env}, monkeypatch
    )
    return settings


@pytest.mark.integration
def test_a_database_that_goes_down_is_database_unavailable_as_in_the_sync_api(
    own_postgres: OwnPostgres,
    own_redis: OwnRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given both APIs on a PostgreSQL of the test's own, working
    Database(own_postgres.url).upgrade()
    env = {"TASKRAIL_DATABASE_URL": own_postgres.url, "TASKRAIL_BROKER_URL": own_redis.url}
    with _settings(monkeypatch, tmp_path, **env) as settings, async_trail(settings) as loop:
        task_id = loop.call("submit", "payroll", 1)
        assert loop.call("get", task_id).status is S.PENDING

        # When the server stops
        own_postgres.stop()

        # Then every call raises DatabaseUnavailable, as the sync call does
        for method, args in [("get", (task_id,)), ("submit", ("payroll", 2)), ("counts", ())]:
            failed = outcome(loop.call, method, *args)
            failed_sync = outcome(getattr(api.client(), method), *args)
            assert failed[0] == failed_sync[0] == "error"
            assert failed[1][0] is failed_sync[1][0] is DatabaseUnavailable
            assert failed[1][1] == failed_sync[1][1]
            assert f"127.0.0.1:{own_postgres.port}/postgres" in failed[1][1]
            assert "\n" not in failed[1][1]

        # When it is back, the handle works again (dead pooled connections replaced)
        own_postgres.start()
        assert loop.call("get", task_id).status is S.PENDING
        assert loop.call("counts")["pending"] == 1


@pytest.mark.integration
def test_a_broker_that_is_down_leaves_the_task_pending_as_in_the_sync_api(
    backend: Backend,
    own_redis: OwnRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given both APIs on the backend's database and a broker that is down
    own_redis.stop()
    env = {
        "TASKRAIL_DATABASE_URL": backend.settings.effective_database_url,
        "TASKRAIL_BROKER_URL": own_redis.url,
        "TASKRAIL_PUBLISH_MAX_WAIT_S": "0.2",
    }
    with _settings(monkeypatch, tmp_path, **env) as settings, async_trail(settings) as loop:
        # When a task is submitted through each
        with capture_logs() as logs:
            task_id = loop.call("submit", "payroll", 1)
            sync_id = api.client().submit("payroll", 1)
        # Then each is recorded and pending, and each deferral is logged
        assert loop.call("get", task_id).status is S.PENDING
        assert api.client().get(sync_id).status is S.PENDING
        deferred = [e for e in logs if e["event"] == "enqueue_deferred"]
        assert [e["first_task_id"] for e in deferred] == [task_id, sync_id]
        assert all(e["error"] and "\n" not in e["error"] for e in deferred)

        # When the broker is back, the next hop goes out
        own_redis.start()
        again = loop.call("submit", "payroll", 2)
        client = redis.Redis.from_url(own_redis.url)
        try:
            assert client.llen("taskrail.hops") == 1
        finally:
            client.close()
        assert again != task_id


def test_a_database_without_an_async_driver_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        AsyncDatabase("mysql://u@127.0.0.1/x")
    assert "the async API supports postgresql, sqlite, not mysql" in str(info.value)


@pytest.mark.parametrize("call", ["submit", "cancel", "cancel_many"])
def test_a_caller_cancelled_while_its_call_waits_is_answered_and_the_call_ends_whole(
    backend: Backend, call: str
) -> None:
    # Given a pending task, and another connection holding the write lock
    pending = backend.put(S.PENDING)
    calls = {
        "submit": ("submit", ("payroll", 7), {}),
        "cancel": ("cancel", (pending,), {"reason": "stop"}),
        "cancel_many": ("cancel_many", (), {"status": "pending", "reason": "stop"}),
    }
    method, args, kwargs = calls[call]

    async def cancelled(loop: Loop, lock: Lock) -> tuple[bool, bool]:
        waiting = asyncio.create_task(getattr(loop.trail, method)(*args, **kwargs))
        for _ in range(TICKS):  # let it reach the lock
            await asyncio.sleep(0.001)
        waiting.cancel()
        try:
            await waiting
            answered = False
        except asyncio.CancelledError:
            answered = True
        return answered, lock.released.is_set()

    with async_trail(backend.settings) as loop:
        loop.call("get", pending)
        tasks_before, events_before, _ = everything(backend)
        # When the caller is cancelled while the call waits for the lock
        with Lock(backend) as lock:
            answered, released = loop.run(cancelled(loop, lock))
        # Then it was answered with CancelledError while the lock was still held
        assert (answered, released) == (True, False)
        # and once the lock is gone the call ended as it would have: whole
        loop.run(loop.trail.aclose())  # waits for it
        tasks, events, _ = everything(backend)
        if call == "submit":
            assert len(tasks) == len(tasks_before) + 1 and events == events_before
        else:
            assert [(e["event"], e["detail"]) for e in events[len(events_before) :]] == [
                ("cancel", "stop")
            ]
            assert backend.trail.get(pending).status is S.CANCELLED
        # and the handle goes on working
        assert loop.call("submit", "payroll", 8) > pending
