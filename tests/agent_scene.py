"""A test's real servers, its Celery workers and the counters the test agents keep
(tests/agents.py), for integration tests that watch handlers run: the ``scene`` fixture
of ``tests/integration/test_cancel_running.py`` and ``test_async_agents.py``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import text

from orchestration import constants as c
from orchestration.store.db import Database
from tests.agents import key
from tests.support import WorkerFleet, drain

HOPS = "taskrail.hops,taskrail.control"
WAIT_S = 30.0  # generous: what it bounds takes a second or two


@dataclass
class AgentScene:
    """One test's real servers, its workers, and the counters the test agents keep."""

    pg_db: Database
    pg_url: str
    counter: redis.Redis
    fleet: WorkerFleet

    def deploy(self, pool: str, extra_env: dict[str, str] | None = None) -> None:
        """The Procfile's shape: a solo hop worker, and an executor on ``pool`` (``async``:
        the async executor, ``--async-calls`` on a threads pool)."""
        self.fleet.start(pool="solo", concurrency=1, queues=HOPS)
        if pool == "async":
            self.fleet.start(
                pool="threads",
                concurrency=2,
                queues=c.QUEUE_EXECUTE,
                extra_args=["--async-calls", "200"],
                extra_env=extra_env,
            )
            return
        concurrency = {"threads": 4, "prefork": 2, "solo": 1}[pool]
        self.fleet.start(
            pool=pool, concurrency=concurrency, queues=c.QUEUE_EXECUTE, extra_env=extra_env
        )

    def count(self, name: str, task_id: int) -> int:
        return int(self.counter.get(key(f"{name}:{task_id}")) or 0)

    def noted(self, name: str, task_id: int) -> bool:
        return self.counter.get(key(f"{name}:{task_id}")) is not None

    def drain(self, ids: list[int]) -> None:
        drain(self.pg_url, ids, timeout=WAIT_S, logs=self.fleet.logs)

    def wait_for(self, condition: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + WAIT_S
        while True:
            found = condition()
            if found:
                return found
            assert time.monotonic() < deadline, f"{what} (after {WAIT_S:g} s)\n{self.logs()}"
            time.sleep(0.05)

    def logs(self) -> str:
        return self.fleet.logs()[-4000:]

    def row(self, task_id: int) -> dict[str, Any]:
        with self.pg_db.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT status, result, attempts, last_error, lease_owner, lease_expires_at "
                    "FROM tasks WHERE id = :id"
                ),
                {"id": task_id},
            ).mappings()
            return dict(row.one())

    def no_lease(self, task_id: int) -> bool:
        row = self.row(task_id)
        return (row["lease_owner"], row["lease_expires_at"]) == (None, None)

    def events_by(self, task_id: int) -> list[tuple[str, str | None]]:
        """The task's audit events, oldest first: (event, actor)."""
        with self.pg_db.connect() as conn:
            rows = conn.execute(
                text("SELECT event, actor FROM task_events WHERE task_id = :id ORDER BY id"),
                {"id": task_id},
            ).all()
        return [(event, actor) for event, actor in rows]

    def events(self, task_id: int) -> list[str]:
        return [event for event, _ in self.events_by(task_id)]

    def log_lines(self, event: str, task_id: int) -> list[dict[str, Any]]:
        """The fleet's JSON log lines of ``event`` about ``task_id``."""
        found = []
        for line in self.fleet.logs().splitlines():
            if not line.startswith("{") or f'"{event}"' not in line:
                continue
            entry = json.loads(line)
            if entry.get("event") == event and entry.get("task_id") == task_id:
                found.append(entry)
        return found
