"""Fixtures: real PostgreSQL on 127.0.0.1, a redis-server of the session's own, real workers.

The session starts its own ``redis-server`` on a spare port (broker, breaker state and
the test agents' counters, each in a database of its own) and stops it at the end: the
suite never flushes or fills a Redis it did not start. PostgreSQL is the machine's, in
a database the session creates and drops. A server that cannot be reached or started
fails the test (never skips it): CI must go red when the distributed path cannot be
tested.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import create_engine, text

from orchestration.settings import Settings
from orchestration.store.db import Database
from tests.support import (
    BREAKER_NAMESPACE,
    KEY_PREFIX,
    PG_ADMIN_URL,
    REPO,
    REPORTS_ENV,
    OwnRedis,
    WorkerFleet,
    purge,
    settings_from,
)

# Databases of the session's redis-server.
BROKER_DB = 9
BREAKER_DB = 10
COUNTER_DB = 11


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
def redis_server() -> Iterator[str]:
    """This session's own redis-server on a spare port: its URL without a database."""
    server = OwnRedis()
    try:
        server.start()
    except Exception as err:
        server.stop()
        pytest.fail(f"could not start a redis-server of the session's own: {err}", pytrace=False)
    yield f"redis://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def broker_url(redis_server: str) -> str:
    """A Redis database for the broker, this session's keys deleted before the test."""
    purge(f"{redis_server}/{BROKER_DB}", KEY_PREFIX)
    return f"{redis_server}/{BROKER_DB}"


@pytest.fixture
def breaker_redis_url(redis_server: str) -> str:
    purge(f"{redis_server}/{BREAKER_DB}", KEY_PREFIX)
    purge(f"{redis_server}/{BREAKER_DB}", BREAKER_NAMESPACE)
    return f"{redis_server}/{BREAKER_DB}"


@pytest.fixture
def counter_url(redis_server: str) -> str:
    """Where the test agents (tests/agents.py) count calls: TASKRAIL_TEST_COUNTER_URL."""
    purge(f"{redis_server}/{COUNTER_DB}", KEY_PREFIX)
    return f"{redis_server}/{COUNTER_DB}"


@pytest.fixture
def server_env(
    pg_db: Database,
    pg_url: str,
    broker_url: str,
    breaker_redis_url: str,
    counter_url: str,
    tmp_path: Path,
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
        TASKRAIL_TEST_COUNTER_URL=counter_url,
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


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Each test leaves structlog and the root logger as it found them: a CLI command run
    in-process (CliRunner) configures logging onto a stream the runner closes after it."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and REPORTS_ENV not in os.environ:
        os.environ[REPORTS_ENV] = tempfile.mkdtemp(prefix="taskrail-reports-")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not os.environ.get(REPORTS_ENV):
        return
    folder = Path(os.environ[REPORTS_ENV])
    reports = [
        json.loads(line)
        for path in sorted(folder.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    shutil.rmtree(folder, ignore_errors=True)
    if not reports:
        return
    terminalreporter.section("chaos suite")
    for report in reports:
        fields = ", ".join(f"{k}={v}" for k, v in report.items() if k != "test")
        terminalreporter.write_line(f"{report['test']}: {fields}")
