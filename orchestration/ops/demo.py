"""``taskrail demo``: submit demo tasks, drive them to a final state, show the outcome.

It starts ``celery -A workers worker`` processes of its own (one with a thread pool on
the embedded default, ``spawn`` with servers), or uses the ones already running
(``spawn=0``). It never imports ``workers``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from orchestration.api import NewTask, Taskrail
from orchestration.errors import DemoFailed
from orchestration.models import RESTING_STATUSES, tasks_table
from orchestration.redact import redact_text
from orchestration.settings import Settings

DEMO_TYPES = ("personal_tax", "payroll", "bookkeeping")
# With no task moving for this long and an error in a worker's log, the demo gives up.
DEFAULT_STALL_S = 15.0
# A worker log line that says something went wrong (stdlib or structlog JSON).
_ERROR_MARKS = ("ERROR ", "CRITICAL ", '"level": "error"', '"level": "critical"', "Traceback")
MAX_LINE_CHARS = 400


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


def _resting_counts(trail: Taskrail, ids: list[int]) -> tuple[dict[str, int], tuple[Any, ...]]:
    """The tasks' counts by status, and a mark that changes whenever any of them moves."""
    t = tasks_table.c
    lo, hi = min(ids), max(ids)
    with trail.db.connect() as conn:
        rows = conn.execute(
            select(t.status, func.count(), func.sum(t.attempts), func.max(t.updated_at))
            .where(t.id.between(lo, hi))
            .group_by(t.status)
        ).all()
    counts = {str(status): n for status, n, _attempts, _at in rows}
    return counts, tuple(sorted((str(r[0]), r[1], r[2], str(r[3])) for r in rows))


@dataclass
class _Fleet:
    """The worker processes the demo started (none with ``spawn=0``)."""

    procs: list[subprocess.Popen[bytes]]
    logs: Path | None

    def dead(self) -> list[int]:
        return [p.returncode for p in self.procs if p.poll() is not None]

    def first_error(self) -> str | None:
        """The first line of any worker log that reports an error, redacted and cut."""
        if self.logs is None:
            return None
        for log in sorted(self.logs.glob("*.log")):
            with contextlib.suppress(OSError), open(log, errors="replace") as fh:
                for line in fh:
                    if any(mark in line for mark in _ERROR_MARKS):
                        return redact_text(" ".join(line.split()))[:MAX_LINE_CHARS]
        return None


def _check_servers(trail: Taskrail) -> None:
    """Fail at once, in one line, when the breaker Redis cannot be reached."""
    settings = trail.settings
    if settings.redis_url:
        import redis

        from orchestration.redact import redact_url

        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0
        )
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            raise DemoFailed(
                f"breaker Redis unreachable at {redact_url(settings.redis_url)}: "
                f"{redact_text(str(exc))}",
                None,
                None,
            ) from None
        finally:
            client.close()


def worker_command(index: int, embedded: bool) -> list[str]:
    """The ``celery -A workers worker`` command line of the demo's worker ``index``.

    On the embedded default one process runs the hops on threads (one SQLite writer
    process); on servers each process runs two.
    """
    command = [
        str(Path(sys.executable).with_name("celery")),
        "-A",
        "workers",
        "worker",
        "-n",
        f"demo{index}@%h",
        "-l",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
    ]
    if embedded:
        return [*command, "-P", "threads", "-c", "4", "--without-heartbeat"]
    return [*command, "-c", "2"]


@contextlib.contextmanager
def _workers(trail: Taskrail, spawn: int) -> Iterator[_Fleet]:
    """Start ``spawn`` worker processes (one on the embedded default) for the block.

    The demo starts workers as any operator would: it never imports ``workers``.
    """
    embedded = trail.settings.embedded
    if spawn <= 0:
        yield _Fleet([], None)
        return
    procs = []
    logs = Path(tempfile.mkdtemp(prefix="taskrail-demo-"))
    keep_logs = False
    for i in range(1 if embedded else spawn):
        log = open(logs / f"worker{i}.log", "wb")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    worker_command(i, embedded),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ},
                ),
                log,
            )
        )
    try:
        yield _Fleet([proc for proc, _log in procs], logs)
    except DemoFailed:
        keep_logs = True  # the error names them
        raise
    finally:
        for proc, _log in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            log.close()
        if not keep_logs:
            shutil.rmtree(logs, ignore_errors=True)


def run_demo(
    n: int,
    *,
    settings: Settings,
    console: Console,
    spawn: int = 2,
    timeout_s: float = 600.0,
    show_progress: bool = True,
    stall_s: float = DEFAULT_STALL_S,
) -> DemoResult:
    """Submit ``n`` demo tasks and wait until every one rests (completed, failed,
    escalated, or cancelled by an operator meanwhile).

    Raises DemoFailed, naming the first error line of the workers' logs and where the
    logs are kept: when the breaker Redis cannot be reached, a worker the demo started
    exits, no task moves for ``stall_s`` while a worker log shows an error, or the
    tasks are not done after ``timeout_s``. Raises BrokerUnavailable when the broker
    cannot be reached. The workers it started are stopped and, unless it failed, their
    log folder removed.
    """
    from demo_agents import expected_status

    trail = Taskrail(settings)
    items = demo_tasks(n)
    expected: dict[str, int] = {}
    for item in items:
        status = expected_status(str(item.payload["scenario"]))  # type: ignore[index]
        expected[status] = expected.get(status, 0) + 1
    try:
        _check_servers(trail)
        with _workers(trail, spawn) as fleet:
            ids = trail.submit_many(items)
            counts, elapsed = _wait(trail, ids, fleet, console, show_progress, timeout_s, stall_s)
    finally:
        trail.close()
    return DemoResult(n, counts, expected, elapsed)


def _wait(
    trail: Taskrail,
    ids: Sequence[int],
    fleet: _Fleet,
    console: Console,
    show_progress: bool,
    timeout_s: float,
    stall_s: float,
) -> tuple[dict[str, int], float]:
    """Poll until every task rests (any of RESTING_STATUSES: a task an operator cancels
    meanwhile is done too); the progress bar shows the counts. Returns the counts and the
    seconds from the first poll that saw a task move (the workers' start-up left out) to
    the one that saw them all at rest. Raises DemoFailed."""
    n = len(ids)
    started = last_move = time.perf_counter()
    mark: tuple[Any, ...] = ()
    first_move: float | None = None
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
            counts, now_mark = _resting_counts(trail, list(ids))
            done = sum(counts.get(s.value, 0) for s in RESTING_STATUSES)
            detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            progress.update(bar, completed=done, detail=detail)
            now = time.perf_counter()
            if done >= n:  # moved before the first poll that saw a move: count from submit
                return counts, now - (first_move or started)
            if first_move is None and counts.get("pending", 0) < n:
                first_move = now
            if now_mark != mark:
                mark, last_move = now_mark, now
            dead = fleet.dead()
            if dead:
                raise DemoFailed(
                    f"{len(dead)} demo worker(s) exited (exit code {dead[0]}); {detail}",
                    fleet.first_error(),
                    fleet.logs,
                )
            if now - last_move > stall_s:
                first_error = fleet.first_error()
                if first_error:
                    raise DemoFailed(
                        f"no demo task moved for {stall_s:g}s ({detail})",
                        first_error,
                        fleet.logs,
                    )
            if now - started > timeout_s:
                raise DemoFailed(
                    f"demo tasks not finished after {timeout_s:g}s ({detail})",
                    fleet.first_error(),
                    fleet.logs,
                )
            time.sleep(0.1)


def render(result: DemoResult, console: Console) -> None:
    table = Table(title=f"{result.submitted} demo tasks")
    table.add_column("final state")
    table.add_column("tasks", justify="right")
    table.add_column("expected", justify="right")
    for status in RESTING_STATUSES:  # every state a demo task may end in, cancelled too
        state = status.value
        table.add_row(state, str(result.counts.get(state, 0)), str(result.expected.get(state, 0)))
    console.print(table)
    console.print(
        f"{result.submitted} tasks in {result.elapsed_s:.2f}s: "
        f"{result.tasks_per_s:.1f} tasks/s, {3 * result.tasks_per_s:.1f} hops/s"
    )
