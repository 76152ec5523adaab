"""Metrics from several processes served behind basic auth, hop durations in the logs,
and the status report's throughput: on SQLite, in processes of the test's own."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from orchestration.db import Database
from orchestration.exposition import build_registry, make_metrics_server
from orchestration.logging import configure_logging, get_logger
from orchestration.models import tasks_table, utcnow
from orchestration.status import status_report
from tests.deploy_support import http_get
from tests.support import REPO

AUTH = ("prom", "s3cret")


def _record(folder: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh process that records into ``folder``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(folder), PYTHONPATH=str(REPO))
    script = "from orchestration import metrics\n" + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _value(samples: dict[Any, float], metric: str, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'taskrail.db'}")
    db.upgrade()
    yield db
    db.dispose()


def _seed(db: Database, rows: list[dict[str, Any]]) -> None:
    now = utcnow()
    with db.begin() as conn:
        conn.execute(
            insert(tasks_table),
            [
                {
                    "client_id": 1,
                    "task_type": "payroll",
                    "payload": {},
                    "attempts": 0,
                    "created_at": now - timedelta(hours=1),
                    "completed_at": None,
                    **row,
                }
                for row in rows
            ],
        )


def test_samples_of_several_processes_are_served_together_behind_basic_auth(
    tmp_path: Path, sqlite_db: Database
) -> None:
    # Given two processes that recorded into one multiprocess directory
    folder = tmp_path / "metrics"
    _record(
        folder,
        """
        for _ in range(3):
            metrics.transition("complete", "payroll_agent")
        metrics.attempt("payroll_agent", "succeeded")
        metrics.attempt("payroll_agent", "succeeded")
        metrics.deferral("payroll_agent")
        metrics.hop_duration("execute", 0.003)
        metrics.breaker_changed("agent:payroll_agent", "open")
        """,
    )
    _record(
        folder,
        """
        metrics.transition("complete", "payroll_agent")
        metrics.transition("complete", "payroll_agent")
        metrics.transition("retry", None)
        metrics.attempt("payroll_agent", "transient_error")
        metrics.hop_duration("execute", 0.2)
        metrics.breaker_changed("agent:payroll_agent", "closed")
        metrics.breaker_state("agent:payroll_agent", "closed")
        """,
    )
    # and a database with tasks, one of them stuck for an hour
    now = utcnow()
    _seed(
        sqlite_db,
        [
            {"status": "pending", "updated_at": now - timedelta(hours=1)},
            {"status": "in_progress", "updated_at": now},
            {"status": "completed", "updated_at": now, "completed_at": now},
            {"status": "completed", "updated_at": now, "completed_at": now},
        ],
    )
    # When the metrics endpoint serves them with credentials
    server = make_metrics_server(
        sqlite_db,
        host="127.0.0.1",
        port=0,
        credentials=AUTH,
        redrive_after_s=15,
        folder=str(folder),
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        anonymous = http_get(f"{base}/metrics")
        wrong = http_get(f"{base}/metrics", auth="prom:guess")
        health = http_get(f"{base}/healthz")
        elsewhere = http_get(f"{base}/admin", auth="prom:s3cret")
        status, body = http_get(f"{base}/metrics", auth="prom:s3cret")
    finally:
        server.shutdown()
        server.server_close()
    # Then nothing is shown without the right credentials
    assert anonymous[0] == 401 and "taskrail" not in anonymous[1]
    assert wrong[0] == 401
    assert health == (200, "ok\n")
    assert elsewhere[0] == 404
    # and with them, the processes' samples add up
    assert status == 200
    s = _samples(body)
    assert _value(s, "taskrail_transitions_total", event="complete", agent="payroll_agent") == 5
    assert _value(s, "taskrail_transitions_total", event="retry", agent="") == 1
    assert _value(s, "taskrail_attempts_total", agent="payroll_agent", outcome="succeeded") == 2
    assert (
        _value(s, "taskrail_attempts_total", agent="payroll_agent", outcome="transient_error") == 1
    )
    assert _value(s, "taskrail_deferrals_total", agent="payroll_agent") == 1
    assert _value(s, "taskrail_hop_duration_seconds_count", hop="execute") == 2
    assert _value(s, "taskrail_hop_duration_seconds_bucket", hop="execute", le="0.005") == 1
    assert _value(s, "taskrail_hop_duration_seconds_sum", hop="execute") == pytest.approx(0.203)
    # the breaker gauge shows the state set last, by whichever process
    assert _value(s, "taskrail_breaker_state", name="agent:payroll_agent") == 0
    assert (
        _value(s, "taskrail_breaker_changes_total", name="agent:payroll_agent", state="open") == 1
    )
    # and the task gauges come from the database
    assert _value(s, "taskrail_database_up") == 1
    assert _value(s, "taskrail_tasks", state="pending") == 1
    assert _value(s, "taskrail_tasks", state="in_progress") == 1
    assert _value(s, "taskrail_tasks", state="completed") == 2
    assert _value(s, "taskrail_tasks", state="failed") == 0
    assert _value(s, "taskrail_tasks_stuck") == 1
    # and files are named by host and pid, so containers sharing the folder never collide
    names = sorted(p.name for p in folder.iterdir())
    assert names and all(n.count("_") in (1, 2) and "-" in n for n in names), names


def test_an_unreachable_database_reads_as_database_up_0(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    # Given a database nobody listens for
    db = Database("postgresql://taskrail@127.0.0.1:1/taskrail")
    # When Prometheus scrapes
    registry = build_registry(db, redrive_after_s=15, folder=str(tmp_path / "m"))
    s = _samples(generate_latest(registry).decode())
    db.dispose()
    # Then the scrape works and says so, with no task gauges
    assert _value(s, "taskrail_database_up") == 0
    assert not any(name == "taskrail_tasks" for name, _ in s)


def test_recording_never_raises_and_warns_once(tmp_path: Path) -> None:
    # Given a multiprocess "directory" that is a plain file
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    # When a process records into it several times
    done = _record(
        blocker,
        """
        from orchestration.logging import configure_logging
        configure_logging("json", "INFO")
        for _ in range(3):
            metrics.transition("complete", "a")
            metrics.hop_duration("start", 0.01)
        print("still running")
        """,
    )
    # Then the process went on, and said so once
    assert done.stdout.strip() == "still running"
    assert done.stderr.count('"metrics_unavailable"') == 1, done.stderr


def test_log_lines_of_a_hop_carry_its_duration() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)
    log = get_logger("test")
    try:
        # Given a hop that started 50 ms ago (workers.hops.hop_scope binds hop_clock)
        structlog.contextvars.bind_contextvars(hop="execute", hop_clock=time.perf_counter() - 0.05)
        # When it logs
        log.info("task_transition", task_id=7)
        structlog.contextvars.clear_contextvars()
        log.info("outside_a_hop")
    finally:
        structlog.contextvars.clear_contextvars()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    # Then its lines carry duration_ms, not the clock
    assert first["hop"] == "execute"
    assert 50 <= first["duration_ms"] < 5000
    assert "hop_clock" not in first
    assert "duration_ms" not in second


def test_status_throughput_counts_each_window(sqlite_db: Database) -> None:
    # Given tasks that came to rest 30 s, 3 min, 10 min and 20 min ago
    now = utcnow()
    ago = [timedelta(seconds=30)] * 3 + [timedelta(minutes=3)] * 2 + [timedelta(minutes=10)]
    rows: list[dict[str, Any]] = [
        {"status": "completed", "completed_at": now - d, "updated_at": now - d} for d in ago
    ]
    rows.append(
        {
            "status": "completed",
            "completed_at": now - timedelta(minutes=20),
            "updated_at": now - timedelta(minutes=20),
        }
    )
    rows.append({"status": "failed", "updated_at": now - timedelta(minutes=2)})
    rows.append({"status": "pending", "updated_at": now})
    _seed(sqlite_db, rows)
    # When the status report is built
    report = status_report(sqlite_db, redrive_after_s=15).to_dict()
    # Then each window counts what rested inside it, per minute
    assert report["throughput"]["completed_per_min"] == {"1m": 3.0, "5m": 1.0, "15m": 0.4}
    assert report["throughput"]["failed_per_min"] == {"1m": 0.0, "5m": 0.2, "15m": 0.07}
    assert report["throughput"]["escalated_per_min"] == {"1m": 0.0, "5m": 0.0, "15m": 0.0}
    assert report["counts"]["completed"] == 7
    assert report["total"] == 9
    assert report["stuck"]["count"] == 0
