"""Helpers for the people's side tests (issue 21): the API on the embedded SQLite or on
the real PostgreSQL with a Redis broker, tasks put in a given state through the
transition store (as the hops would), and snapshots that prove a refused move wrote
nothing: not the row, not the history, not a hop message."""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from orchestration import api
from orchestration.constants import HOP_ASSIGN, QUEUE_HOPS
from orchestration.models import TaskStatus, events_table, tasks_table
from orchestration.moves import Move
from orchestration.settings import Settings
from orchestration.store.db import Database
from orchestration.store.transitions import TransitionStore
from tests.support import settings_from

S = TaskStatus

# The API on both back-ends: the embedded default and the real servers.
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]
# A database of the session's own redis-server (conftest ``redis_server``) that only
# these tests use as a broker, emptied before each test: no worker consumes there.
PEOPLE_BROKER_DB = 13
AGENTS = "demo_agents,tests.agents"
WORKER = "w-1"  # the worker the hops' moves are written as


@dataclass
class Backend:
    """The process-wide API client on one back-end, and ways to look at what it wrote."""

    name: str
    settings: Settings

    @property
    def trail(self) -> api.Taskrail:
        return api.client()

    @property
    def db(self) -> Any:
        return api.client().db

    # -- what is stored ------------------------------------------------------------

    def row(self, task_id: int) -> dict[str, Any]:
        """The task's row as stored (no decoding)."""
        with self.db.connect() as conn:
            row = conn.execute(select(tasks_table).where(tasks_table.c.id == task_id)).mappings()
            return dict(row.one())

    def events(self, task_id: int | None = None) -> list[dict[str, Any]]:
        """Audit rows as stored, oldest first (all tasks' when ``task_id`` is None)."""
        query = select(events_table).order_by(events_table.c.id)
        if task_id is not None:
            query = query.where(events_table.c.task_id == task_id)
        with self.db.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def count(self, table: Any = tasks_table) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    def hops(self) -> list[tuple[str, list[Any]]]:
        """Hop messages waiting in the broker, oldest first: (task name, args)."""
        if self.settings.embedded:
            folder = self.settings.broker_folder() / "queue"
            files = sorted(
                folder.glob(f"*.{QUEUE_HOPS}.msg"), key=lambda p: (p.stat().st_mtime_ns, p.name)
            )
            return [_decode(p.read_bytes()) for p in files]
        assert self.settings.broker_url is not None
        client = redis.Redis.from_url(self.settings.broker_url)
        try:
            raw = client.lrange(QUEUE_HOPS, 0, -1)
        finally:
            client.close()
        return [_decode(m) for m in reversed(raw)]

    def assign_hops(self) -> list[int]:
        """The task ids of the assign hops waiting, oldest first."""
        return [args[0] for name, args in self.hops() if name == HOP_ASSIGN]

    def snapshot(self, task_id: int) -> tuple[Any, ...]:
        """Everything a move of ``task_id`` could write."""
        return (self.row(task_id), self.events(task_id), self.count(events_table), self.hops())

    # -- putting tasks in a state ----------------------------------------------------

    def put(
        self,
        status: TaskStatus,
        *,
        claimed_by: str | None = None,
        task_type: str = "personal_tax",
        client_id: int = 42,
        payload: dict[str, Any] | None = None,
    ) -> int:
        """A new task driven to ``status`` by the transition store, as the hops and an
        earlier person would (``claimed_by``: an escalated task claimed by them)."""
        task_id = self.trail.submit(task_type, client_id, payload or {"year": 2025})
        move_to(self.db, task_id, status)
        if claimed_by is not None:
            assert status is S.ESCALATED
            store = TransitionStore(self.db, worker="api")
            assert store.apply(Move(task_id, "claim", expected=status, actor=claimed_by)).applied
        return task_id


# The hops' path from pending to each state: (event, expected, agent, reason, result).
_PATHS: dict[TaskStatus, list[tuple[str, TaskStatus]]] = {
    S.PENDING: [],
    S.ASSIGNED: [("assign", S.PENDING)],
    S.IN_PROGRESS: [("assign", S.PENDING), ("start", S.ASSIGNED)],
    S.COMPLETED: [("assign", S.PENDING), ("start", S.ASSIGNED), ("complete", S.IN_PROGRESS)],
    S.FAILED: [("assign", S.PENDING), ("start", S.ASSIGNED), ("fail", S.IN_PROGRESS)],
    S.ESCALATED: [("assign", S.PENDING), ("start", S.ASSIGNED), ("escalate", S.IN_PROGRESS)],
    S.CANCELLED: [("assign", S.PENDING), ("cancel", S.ASSIGNED)],
}


def move_to(db: Any, task_id: int, status: TaskStatus, agent: str = "personal_tax_agent") -> None:
    """Drive a pending task to ``status`` through the transition store as worker WORKER."""
    store = TransitionStore(db, worker=WORKER)
    for event, expected in _PATHS[status]:
        move = Move(
            task_id,
            event,
            expected=expected,
            agent=agent if event == "assign" else None,
            reason={"fail": "gave up", "escalate": "missing W-2", "cancel": "stop"}.get(event),
            result={"ok": True} if event == "complete" else None,
            preclaim="r:w-1/1" if event == "start" else None,
        )
        assert store.apply(move).applied, (task_id, event)


def _decode(raw: bytes | str) -> tuple[str, list[Any]]:
    envelope = json.loads(raw)
    body = json.loads(base64.b64decode(envelope["body"]))
    return envelope["headers"]["task"], body[0]


@functools.cache
def _sqlite_template() -> Path:
    """An embedded database migrated to the newest schema, copied for each test (the
    migrations take longer than most tests)."""
    folder = Path(tempfile.mkdtemp(prefix="taskrail-people-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "taskrail.db"
    db = Database(f"sqlite:///{path}")
    db.ensure_schema()
    db.dispose()
    return path


@contextlib.contextmanager
def open_backend(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """The process-wide API client on ``name`` ("sqlite" or "postgres"), fresh and empty."""
    env = {"TASKRAIL_AGENTS": AGENTS, "TASKRAIL_DATA_DIR": str(tmp_path / "data")}
    if name == "postgres":
        request.getfixturevalue("pg_db")  # emptied
        broker = f"{request.getfixturevalue('redis_server')}/{PEOPLE_BROKER_DB}"
        client = redis.Redis.from_url(broker)
        client.flushdb()  # a database of this session's own server that only we use
        client.close()
        env["TASKRAIL_DATABASE_URL"] = request.getfixturevalue("pg_url")
        env["TASKRAIL_BROKER_URL"] = broker
    else:
        (tmp_path / "data").mkdir()
        shutil.copyfile(_sqlite_template(), tmp_path / "data" / "taskrail.db")
    with settings_from(env, monkeypatch) as settings:
        yield Backend(name, settings)
