"""Fixtures: real PostgreSQL and Redis on 127.0.0.1, real worker processes.

A server that cannot be reached fails the test (never skips it): CI must go red
when the distributed path cannot be tested.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from orchestration.db import Database
from orchestration.settings import Settings
from tests.support import (
    BREAKER_NAMESPACE,
    KEY_PREFIX,
    PG_ADMIN_URL,
    REDIS_HOST_URL,
    REPO,
    WorkerFleet,
    purge,
    settings_from,
)

BROKER_DB = 9
BREAKER_DB = 10


def _fail_unreachable(what: str, err: Exception) -> None:
    pytest.fail(f"{what} is unreachable ({err}); integration tests need it running", pytrace=False)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    name = f"taskrail_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:
        _fail_unreachable("PostgreSQL at 127.0.0.1:5432", err)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    db = Database(url)
    db.upgrade()
    db.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    """The session database, emptied before the test."""
    db = Database(pg_url)
    with db.begin() as conn:
        conn.execute(text("TRUNCATE tasks, task_events, sweeper_runs RESTART IDENTITY CASCADE"))
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def redis_server() -> str:
    client = redis.Redis.from_url(REDIS_HOST_URL)
    try:
        client.ping()
    except Exception as err:
        _fail_unreachable("Redis at 127.0.0.1:6379", err)
    return REDIS_HOST_URL


@pytest.fixture
def broker_url(redis_server: str) -> str:
    """A Redis database for the broker, flushed before the test."""
    purge(f"{redis_server}/{BROKER_DB}", KEY_PREFIX)
    return f"{redis_server}/{BROKER_DB}"


@pytest.fixture
def breaker_redis_url(redis_server: str) -> str:
    purge(f"{redis_server}/{BREAKER_DB}", KEY_PREFIX)
    purge(f"{redis_server}/{BREAKER_DB}", BREAKER_NAMESPACE)
    return f"{redis_server}/{BREAKER_DB}"


@pytest.fixture
def server_env(
    pg_db: Database, pg_url: str, broker_url: str, breaker_redis_url: str, tmp_path: Path
) -> dict[str, str]:
    """Environment for processes that use the real servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(
        TASKRAIL_DATABASE_URL=pg_url,
        TASKRAIL_BROKER_URL=broker_url,
        TASKRAIL_REDIS_URL=breaker_redis_url,
        TASKRAIL_BROKER_KEY_PREFIX=KEY_PREFIX,
        TASKRAIL_BREAKER_NAMESPACE=BREAKER_NAMESPACE,
        TASKRAIL_TEST_KEY_PREFIX=KEY_PREFIX,
        TASKRAIL_AGENTS="demo_agents,tests.agents",
        TASKRAIL_LOG_FORMAT="json",
        TASKRAIL_RETRY_BACKOFF_BASE_S="0.1",
        TASKRAIL_RETRY_BACKOFF_MAX_S="0.5",
        TASKRAIL_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(REPO),
    )
    return env


@pytest.fixture
def server_settings(
    server_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings (and the process-wide API client) pointing at the real servers."""
    with settings_from(server_env, monkeypatch) as settings:
        yield settings


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The embedded default (SQLite file, file-system broker) in a clean directory."""
    monkeypatch.chdir(tmp_path)
    with settings_from({"TASKRAIL_AGENTS": "demo_agents,tests.agents"}, monkeypatch) as settings:
        yield settings


@pytest.fixture
def fleet(server_env: dict[str, str], tmp_path: Path) -> Iterator[WorkerFleet]:
    """Real ``celery -A workers worker`` processes; stopped after the test."""
    workers = WorkerFleet(env=server_env, tmp=tmp_path)
    yield workers
    workers.stop_all()
