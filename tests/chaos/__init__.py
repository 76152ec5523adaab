"""The chaos suite: real crashes of workers, Redis and PostgreSQL while tasks flow.

Each test owns the servers it breaks (tests/chaos/conftest.py) and checks every task
with :func:`tests.support.verify_every_task`. The helpers below build the workloads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from demo_agents import expected_status, scenario_for
from orchestration import api
from orchestration.api import NewTask
from tests.support import WorkerFleet, WorkerProcess

DEMO_TYPES = ("personal_tax", "payroll", "bookkeeping")


@dataclass
class Workload:
    """Tasks to submit and the final status each must reach.

    Most are chaos-agent tasks (they count calls and runs in the counter Redis); every
    ``demo_every``-th is a demo task (ok, flaky, missing document, invalid), so the
    failed and escalated paths are crashed through too.
    """

    items: list[NewTask]
    expected: list[str]
    counted: list[bool]
    ids: list[int] = field(default_factory=list)

    @classmethod
    def mixed(
        cls,
        n: int,
        sleeps_s: Sequence[float] = (0.0, 0.02),
        demo_every: int = 10,
        task_type: str = "chaos",
        slow_every: int = 0,
        slow_s: float = 0.0,
    ) -> Workload:
        """``n`` tasks; chaos-agent handlers sleep ``sleeps_s`` in turn, and every
        ``slow_every``-th (never a demo task) sleeps ``slow_s``."""
        items, expected, counted = [], [], []
        for i in range(n):
            if demo_every and i % demo_every == demo_every - 1:
                j = i // demo_every
                scenario = scenario_for(j)
                items.append(NewTask(DEMO_TYPES[j % 3], 10_000 + i, {"scenario": scenario}))
                expected.append(expected_status(scenario))
                counted.append(False)
            else:
                sleep_s = sleeps_s[i % len(sleeps_s)] if sleeps_s else 0.0
                if slow_every and i % slow_every == 0:
                    sleep_s = slow_s
                payload = {"sleep_s": sleep_s} if sleep_s else {}
                items.append(NewTask(task_type, 10_000 + i, payload))
                expected.append("completed")
                counted.append(True)
        return cls(items, expected, counted)

    def submit(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Submit items ``start:stop``; returns their ids (also kept in ``ids``)."""
        new = api.submit_many(self.items[start:stop])
        self.ids.extend(new)
        return new

    def feed(self, db_url: str, batch: int = 20, max_waiting: int = 40) -> None:
        """Submit every item in batches, keeping at most ``max_waiting`` tasks not yet
        started (pending or assigned): a steady flow without a deep queue."""
        from sqlalchemy import create_engine, text

        engine = create_engine(db_url)
        try:
            start = len(self.ids)
            while start < len(self.items):
                with engine.connect() as conn:
                    waiting = conn.execute(
                        text("SELECT count(*) FROM tasks WHERE status IN ('pending', 'assigned')")
                    ).scalar_one()
                if waiting < max_waiting:
                    self.submit(start, start + batch)
                    start += batch
                else:
                    time.sleep(0.05)
        finally:
            engine.dispose()

    def chunks(self, parts: int) -> Iterable[tuple[int, int]]:
        size = -(-len(self.items) // parts)
        for start in range(0, len(self.items), size):
            yield start, min(start + size, len(self.items))

    @property
    def expected_by_id(self) -> dict[int, str]:
        return dict(zip(self.ids, self.expected, strict=True))

    @property
    def counted_ids(self) -> list[int]:
        return [i for i, c in zip(self.ids, self.counted, strict=True) if c]


class Feeder(threading.Thread):
    """Runs :meth:`Workload.feed` beside the test; :meth:`finish` re-raises its error."""

    def __init__(self, work: Workload, db_url: str, **kwargs: Any) -> None:
        super().__init__(name="feeder", daemon=True)
        self.work, self.db_url, self.kwargs = work, db_url, kwargs
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work.feed(self.db_url, **self.kwargs)
        except BaseException as err:
            self.error = err

    def finish(self, timeout: float = 120.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the feeder did not finish"
        if self.error is not None:
            raise self.error


def start_workers(
    fleet: WorkerFleet, n: int = 2, extra_env: dict[str, str] | None = None
) -> list[WorkerProcess]:
    """``n`` ``celery -A workers worker -P prefork -c 2`` processes, started side by side."""
    workers = [fleet.start(concurrency=2, extra_env=extra_env, wait=False) for _ in range(n)]
    for worker in workers:
        worker.wait_ready(60)
    return workers


def count_lines(fleet: WorkerFleet, needle: str) -> int:
    """How many log lines of the fleet (workers and beat, dead or alive) contain ``needle``."""
    return sum(line.count(needle) for line in fleet.logs().splitlines())


def elapsed_since(moment: float, until: float | None = None) -> float:
    return round((until if until is not None else time.monotonic()) - moment, 1)


def report_numbers(verdict: Any) -> dict[str, Any]:
    return {
        "tasks": verdict.tasks,
        "final": verdict.by_status,
        "lost": verdict.lost,
        "duplicate_transitions": verdict.duplicate_transitions,
        "handler_calls": verdict.handler_calls,
        "rerun_tasks": verdict.rerun_tasks,
    }


def wait_for_progress(db_url: str, resting: int, timeout: float = 120.0) -> None:
    """Wait until at least ``resting`` tasks rest (completed, failed, escalated)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                done = conn.execute(
                    text(
                        "SELECT count(*) FROM tasks "
                        "WHERE status IN ('completed', 'failed', 'escalated')"
                    )
                ).scalar_one()
            if done >= resting:
                return
            assert time.monotonic() < deadline, f"only {done} tasks rest after {timeout}s"
            time.sleep(0.2)
    finally:
        engine.dispose()
