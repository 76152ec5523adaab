"""``taskrail demo``: submit demo tasks, drive them to a final state, show the outcome.

With no servers configured it runs an in-process worker on the embedded default;
with ``TASKRAIL_BROKER_URL`` set it starts real ``celery -A workers worker``
processes (or uses the ones already running with ``--no-spawn``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from orchestration.api import NewTask, Taskrail
from orchestration.models import RESTING_STATUSES, tasks_table

DEMO_TYPES = ("personal_tax", "payroll", "bookkeeping")


@dataclass
class DemoResult:
    submitted: int
    counts: dict[str, int]
    expected: dict[str, int]
    elapsed_s: float

    @property
    def tasks_per_s(self) -> float:
        return self.submitted / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "counts": self.counts,
            "expected": self.expected,
            "elapsed_s": round(self.elapsed_s, 3),
            "tasks_per_s": round(self.tasks_per_s, 1),
        }


def demo_tasks(n: int) -> list[NewTask]:
    from demo_agents import scenario_for

    return [
        NewTask(
            DEMO_TYPES[i % len(DEMO_TYPES)], 1000 + i, {"scenario": scenario_for(i), "year": 2025}
        )
        for i in range(n)
    ]


def _resting_counts(trail: Taskrail, ids: list[int]) -> dict[str, int]:
    t = tasks_table.c
    lo, hi = min(ids), max(ids)
    with trail.db.connect() as conn:
        rows = conn.execute(
            select(t.status, func.count()).where(t.id.between(lo, hi)).group_by(t.status)
        ).all()
    return {str(status): n for status, n in rows}


@contextlib.contextmanager
def _workers(trail: Taskrail, spawn: int) -> Iterator[None]:
    settings = trail.settings
    if settings.embedded:
        embedded = importlib.import_module("workers.embedded")
        celery_app = importlib.import_module("workers").app
        with embedded.embedded_worker(celery_app, concurrency=4):
            yield
        return
    if spawn <= 0:
        yield
        return
    procs = []
    logs = Path(tempfile.mkdtemp(prefix="taskrail-demo-"))
    celery = str(Path(sys.executable).with_name("celery"))
    for i in range(spawn):
        log = open(logs / f"worker{i}.log", "wb")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [
                        celery,
                        "-A",
                        "workers",
                        "worker",
                        "-n",
                        f"demo{i}@%h",
                        "-c",
                        "2",
                        "-l",
                        "WARNING",
                        "--without-gossip",
                        "--without-mingle",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ},
                ),
                log,
            )
        )
    try:
        yield
    finally:
        for proc, _log in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def run_demo(
    n: int,
    *,
    console: Console,
    spawn: int = 2,
    timeout_s: float = 600.0,
    show_progress: bool = True,
) -> DemoResult:
    """Submit ``n`` demo tasks and wait until every one rests (completed, failed, escalated)."""
    from demo_agents import expected_status

    trail = Taskrail()
    items = demo_tasks(n)
    expected: dict[str, int] = {}
    for item in items:
        status = expected_status(str(item.payload["scenario"]))  # type: ignore[index]
        expected[status] = expected.get(status, 0) + 1
    with _workers(trail, spawn):
        started = time.perf_counter()
        ids = trail.submit_many(items)
        progress = Progress(
            TextColumn("[bold]demo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not show_progress,
        )
        with progress:
            bar = progress.add_task("tasks", total=n, detail="")
            while True:
                counts = _resting_counts(trail, ids)
                done = sum(counts.get(s.value, 0) for s in RESTING_STATUSES)
                detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                progress.update(bar, completed=done, detail=detail)
                if done >= n:
                    break
                if time.perf_counter() - started > timeout_s:
                    raise TimeoutError(f"demo tasks not finished after {timeout_s:.0f}s: {counts}")
                time.sleep(0.1)
        elapsed = time.perf_counter() - started
    trail.close()
    return DemoResult(n, counts, expected, elapsed)


def render(result: DemoResult, console: Console) -> None:
    table = Table(title=f"{result.submitted} demo tasks")
    table.add_column("final state")
    table.add_column("tasks", justify="right")
    table.add_column("expected", justify="right")
    for state in ("completed", "failed", "escalated"):
        table.add_row(state, str(result.counts.get(state, 0)), str(result.expected.get(state, 0)))
    console.print(table)
    console.print(
        f"{result.submitted} tasks in {result.elapsed_s:.2f}s: "
        f"{result.tasks_per_s:.1f} tasks/s, {3 * result.tasks_per_s:.1f} hops/s"
    )
