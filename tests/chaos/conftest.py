"""Fixtures of the chaos suite: servers of each test's own, to kill and restart at will.

Every chaos test gets a fresh PostgreSQL cluster (``initdb`` in a temporary directory,
on a spare port), a ``redis-server`` for the broker and breaker state, and a second
``redis-server`` where the test agents count their calls (never broken, so the counts
survive the broker's death). The machine's shared PostgreSQL and Redis are never
touched. A server that cannot be started fails the test: the chaos suite is part of
``make test`` and CI, and must go red, not skip, when it cannot run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestration.settings import Settings
from orchestration.store.db import Database
from tests.support import (
    KEY_PREFIX,
    REPO,
    OwnPostgres,
    OwnRedis,
    WorkerFleet,
    record_report,
    settings_from,
)


def _cannot_start(what: str, err: BaseException) -> None:
    pytest.fail(f"the chaos suite could not start {what}: {err}", pytrace=False)


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    """A PostgreSQL cluster of this test's own, migrated to head."""
    pg = OwnPostgres()
    try:
        pg.init().start()
        db = Database(pg.url)
        db.upgrade()
        db.dispose()
    except Exception as err:
        pg.destroy()
        _cannot_start("its own PostgreSQL cluster", err)
    yield pg
    pg.destroy()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """The broker (database 0) and breaker state (database 1): this test's own server."""
    server = OwnRedis()
    try:
        server.start()
    except Exception as err:
        server.stop()
        _cannot_start("its own redis-server", err)
    yield server
    server.stop()


@pytest.fixture
def counter_server() -> Iterator[OwnRedis]:
    """Where the test agents count calls and runs; survives the broker's restarts."""
    server = OwnRedis()
    try:
        server.start()
    except Exception as err:
        server.stop()
        _cannot_start("its own redis-server for counters", err)
    yield server
    server.stop()


@pytest.fixture
def counter(counter_server: OwnRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(counter_server.url)
    yield client
    client.close()


@pytest.fixture
def chaos_env(
    own_pg: OwnPostgres, own_redis: OwnRedis, counter_server: OwnRedis, tmp_path: Path
) -> dict[str, str]:
    """Environment of worker, beat and producer: this test's servers, default tuning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(
        TASKRAIL_DATABASE_URL=own_pg.url,
        TASKRAIL_BROKER_URL=own_redis.url,
        TASKRAIL_REDIS_URL=own_redis.url.rsplit("/", 1)[0] + "/1",
        TASKRAIL_TEST_COUNTER_URL=counter_server.url,
        TASKRAIL_TEST_KEY_PREFIX=KEY_PREFIX,
        TASKRAIL_AGENTS="demo_agents,tests.agents",
        TASKRAIL_LOG_FORMAT="json",
        TASKRAIL_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(REPO),
    )
    return env


@pytest.fixture
def chaos_settings(
    chaos_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """This process's settings and API client, pointing at the test's own servers."""
    with settings_from(chaos_env, monkeypatch) as settings:
        yield settings


@pytest.fixture
def chaos_fleet(chaos_env: dict[str, str], tmp_path: Path) -> Iterator[WorkerFleet]:
    """Worker and beat processes on the test's servers; SIGKILLed after the test."""
    fleet = WorkerFleet(env=chaos_env, tmp=tmp_path)
    yield fleet
    for process in fleet.workers:
        process.kill()


@pytest.fixture
def chaos_report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record a scenario's numbers for the summary at the end of the run."""

    def record(**numbers: Any) -> None:
        record_report({"test": request.node.name, **numbers})

    return record
