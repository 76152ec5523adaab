"""Metrics from several processes served behind basic auth, hop durations in the logs,
and the status report's throughput: on SQLite, in processes of the test's own."""

from __future__ import annotations

import io
import json
import os
import re
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

from orchestration.logging import configure_logging, get_logger
from orchestration.models import tasks_table, utcnow
from orchestration.ops.exposition import build_registry, make_metrics_server
from orchestration.ops.status import status_report
from orchestration.store.db import Database
from tests.deploy_support import http_get
from tests.support import REPO

AUTH = ("prom", "s3cret")


def _record(folder: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh process that records into ``folder``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(folder), PYTHONPATH=str(REPO))
    script = "from orchestration.ops import metrics\n" + textwrap.dedent(code)
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
        metrics.attempt("payroll_agent", "cancelled")
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
            {"status": "cancelled", "updated_at": now},
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
    assert _value(s, "taskrail_attempts_total", agent="payroll_agent", outcome="cancelled") == 1
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
    assert _value(s, "taskrail_tasks", state="cancelled") == 1
    # every state has its gauge, zeros included
    states = {"pending", "assigned", "in_progress", "completed", "failed", "escalated"}
    assert {dict(k[1])["state"] for k in s if k[0] == "taskrail_tasks"} == states | {"cancelled"}
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
    # and two tasks cancelled 10 s and 8 min ago (a cancel sets no completed_at)
    rows += [{"status": "cancelled", "updated_at": now - timedelta(seconds=10)}]
    rows += [{"status": "cancelled", "updated_at": now - timedelta(minutes=8)}]
    _seed(sqlite_db, rows)
    # When the status report is built
    report = status_report(sqlite_db, redrive_after_s=15).to_dict()
    # Then each window counts what rested inside it, per minute
    assert report["throughput"]["completed_per_min"] == {"1m": 3.0, "5m": 1.0, "15m": 0.4}
    assert report["throughput"]["failed_per_min"] == {"1m": 0.0, "5m": 0.2, "15m": 0.07}
    assert report["throughput"]["escalated_per_min"] == {"1m": 0.0, "5m": 0.0, "15m": 0.0}
    assert report["throughput"]["cancelled_per_min"] == {"1m": 1.0, "5m": 0.2, "15m": 0.13}
    # and every state is counted, the total is of them all
    assert report["counts"] == {
        "pending": 1,
        "assigned": 0,
        "in_progress": 0,
        "completed": 7,
        "failed": 1,
        "escalated": 0,
        "cancelled": 2,
    }
    assert report["total"] == 11
    assert report["stuck"]["count"] == 0


# -- what status calls stuck, and the sweeper's last pass (issue 18.13) -----------------------

# The agents of the category tests and their time limits (passed in: no registry needed).
LIMITS = {"brief_agent": 10.0, "patient_agent": 3600.0}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def any_db(request: pytest.FixtureRequest) -> Database:
    """The test's database on SQLite, then on PostgreSQL (the session's, emptied)."""
    fixture = "sqlite_db" if request.param == "sqlite" else "pg_db"
    db: Database = request.getfixturevalue(fixture)
    return db


@pytest.fixture
def limited_agents() -> Iterator[None]:
    """brief_agent and patient_agent registered with the time limits of LIMITS."""
    from orchestration.agents import AgentSpec, registry

    def handler(task: Any) -> None:
        return None

    for name, limit_s in LIMITS.items():
        registry.register(AgentSpec(name, handler, (f"{name}_type",), time_limit_s=limit_s))
    yield
    for name in LIMITS:
        registry.unregister(name)


def _seed_not_moving(db: Database) -> dict[str, int]:
    """One task of each kind that has not moved for a minute or more; returns their ids."""
    now = utcnow()
    ago = lambda s: now - timedelta(seconds=s)  # noqa: E731
    live, expired = ago(-30), ago(5)
    kinds: dict[str, dict[str, Any]] = {
        # nothing in flight: the sweeper's business
        "lost_pending": {"status": "pending", "updated_at": ago(60)},
        "dead_handler": {
            "status": "in_progress",
            "updated_at": ago(90),
            "assigned_agent": "brief_agent",
            "attempts": 1,
            "lease_owner": "r:w1@host/abc",
            "lease_expires_at": expired,
        },
        "queued_preclaim": {
            "status": "in_progress",
            "updated_at": ago(40),
            "assigned_agent": "patient_agent",
            "attempts": 1,
            "lease_owner": "q:w1@host/def",
            "lease_expires_at": expired,
        },
        # running past the agent's time limit under a live lease (default 300 s if unknown)
        "overrun_fast": {
            "status": "in_progress",
            "updated_at": ago(60),
            "assigned_agent": "brief_agent",
            "attempts": 1,
            "lease_owner": "r:w2@host/1",
            "lease_expires_at": live,
        },
        "overrun_unknown": {
            "status": "in_progress",
            "updated_at": ago(400),
            "assigned_agent": "gone_agent",
            "attempts": 1,
            "lease_owner": "r:w2@host/2",
            "lease_expires_at": live,
        },
        # waiting on an open breaker, or a retry backoff: not stuck
        "breaker_open": {
            "status": "in_progress",
            "updated_at": ago(60),
            "assigned_agent": "brief_agent",
            "not_before": ago(-20),
            "deferred_since": ago(120),
        },
        "backoff": {
            "status": "in_progress",
            "updated_at": ago(30),
            "assigned_agent": "brief_agent",
            "attempts": 1,
            "not_before": ago(-5),
        },
        # none of these: a slow handler within its limit, a task just re-driven, a fresh one
        "slow_within_limit": {
            "status": "in_progress",
            "updated_at": ago(600),
            "assigned_agent": "patient_agent",
            "attempts": 1,
            "lease_owner": "r:w3@host/3",
            "lease_expires_at": live,
        },
        "just_redriven": {"status": "assigned", "updated_at": ago(60), "redriven_at": ago(2)},
        "fresh": {"status": "pending", "updated_at": now},
        "done": {"status": "completed", "updated_at": ago(60), "completed_at": ago(60)},
    }
    ids = {}
    for name, row in kinds.items():
        with db.begin() as conn:
            ids[name] = conn.execute(
                insert(tasks_table).returning(tasks_table.c.id),
                {
                    "client_id": 1,
                    "task_type": "payroll",
                    "payload": {},
                    "attempts": 0,
                    "created_at": now - timedelta(hours=1),
                    **row,
                },
            ).scalar_one()
    return ids


def test_status_tells_stuck_from_deferred_and_over_time_limit(any_db: Database) -> None:
    # Given tasks that have not moved for a while, for different reasons
    _seed_not_moving(any_db)
    # When the status report is built
    doc = status_report(any_db, redrive_after_s=15, time_limits=LIMITS).to_dict()
    # Then only the tasks with nothing in flight are stuck, one of them a queued pre-claim
    assert doc["stuck"]["count"] == 3
    assert doc["stuck"]["preclaimed"] == 1
    assert 89 <= doc["stuck"]["oldest_age_s"] < 120
    # and the live leases past their agent's limit are shown as such
    assert doc["over_time_limit"]["count"] == 2
    assert 399 <= doc["over_time_limit"]["oldest_age_s"] < 430
    # and the deferred ones are not stuck
    assert doc["deferred"]["count"] == 2
    assert 119 <= doc["deferred"]["longest_deferral_s"] < 150
    # and the sweeper never ran
    assert doc["sweeper"] == {
        "last_run_at": None,
        "age_s": None,
        "interval_s": 5.0,
        "redriven": None,
        "duration_s": None,
        "late": True,
    }


def test_the_sweeper_records_every_pass_and_status_flags_a_late_one(any_db: Database) -> None:
    from orchestration.store.recovery import last_sweep, record_sweep

    # Given a sweeper that ran 4 s ago, every 5 s
    record_sweep(any_db, redriven=7, duration_s=0.25, at=utcnow() - timedelta(seconds=4))
    record_sweep(any_db, redriven=3, duration_s=0.125, at=utcnow() - timedelta(seconds=2))
    # Then its last pass is one row, rewritten
    last = last_sweep(any_db)
    assert last is not None and (last.redriven, last.duration_s) == (3, 0.125)
    fine = status_report(any_db, redrive_after_s=15, sweep_interval_s=5).to_dict()["sweeper"]
    assert fine["late"] is False and 2 <= fine["age_s"] < 10
    assert (fine["redriven"], fine["duration_s"], fine["interval_s"]) == (3, 0.125, 5)
    # When it has not run for more than 3 intervals
    record_sweep(any_db, redriven=0, duration_s=0.01, at=utcnow() - timedelta(seconds=16))
    late = status_report(any_db, redrive_after_s=15, sweep_interval_s=5).to_dict()["sweeper"]
    # Then status flags it
    assert late["late"] is True and late["age_s"] >= 16


def test_status_screen_and_json_show_each_category(
    embedded: Any, limited_agents: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from orchestration import api
    from orchestration.ops.cli import app

    # Given the embedded database with tasks of each kind and a sweeper 60 s late (every 4 s)
    from orchestration.settings import get_settings
    from orchestration.store.recovery import record_sweep

    monkeypatch.setenv("TASKRAIL_SWEEP_INTERVAL_S", "4")
    get_settings.cache_clear()
    api.reset_client()
    db = api.client().db
    _seed_not_moving(db)
    record_sweep(db, redriven=2, duration_s=0.5, at=utcnow() - timedelta(seconds=60))
    runner = CliRunner()
    # When an operator runs `taskrail status` and `taskrail status --json`
    screen = runner.invoke(app, ["status"], env={"COLUMNS": "300"})
    doc = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    # Then the screen tells each category apart, and the sweeper's lateness
    assert screen.exit_code == 0, screen.output
    text = " ".join(screen.stdout.split())
    assert "stuck: 3 tasks with nothing in flight" in text
    assert "1 of them pre-claimed" in text
    assert "over time limit: 2 tasks" in text  # gone_agent: the default 300 s limit
    assert "deferred: 2 tasks waiting on an open breaker or a retry backoff" in text
    # (60 s, or a tenth more on a busy machine: the age is read after the record)
    ran = r"sweeper: last ran 60(\.\d)? s ago \(every 4 s\), re-drove 2 in 0\.5 s; late"
    assert re.search(ran, text), text
    # and every resting state has its row: in the counts, and among the finished per minute
    for state in ("completed", "failed", "escalated", "cancelled"):
        assert text.count(f" {state} ") == 2, (state, screen.stdout)
    # and --json carries the same
    assert doc["stuck"]["count"] == 3 and doc["deferred"]["count"] == 2
    assert doc["over_time_limit"]["count"] == 2
    assert doc["sweeper"]["late"] is True and doc["sweeper"]["redriven"] == 2


def test_metrics_show_each_category_and_the_sweeper(
    any_db: Database, limited_agents: None, tmp_path: Path
) -> None:
    from prometheus_client import generate_latest

    from orchestration.store.recovery import record_sweep

    # Given tasks of each kind and a sweeper that ran 20 s ago, every 5 s
    _seed_not_moving(any_db)
    ran_at = utcnow() - timedelta(seconds=20)
    record_sweep(any_db, redriven=4, duration_s=0.5, at=ran_at)
    # When Prometheus scrapes
    registry = build_registry(
        any_db, redrive_after_s=15, folder=str(tmp_path / "m"), sweep_interval_s=5
    )
    s = _samples(generate_latest(registry).decode())
    # Then each category has its gauge, with the registered agents' time limits
    assert _value(s, "taskrail_tasks_stuck") == 3
    assert _value(s, "taskrail_tasks_stuck_preclaimed") == 1
    assert _value(s, "taskrail_tasks_over_time_limit") == 2
    assert _value(s, "taskrail_tasks_deferred") == 2
    # and the sweeper's last pass, flagged late
    assert _value(s, "taskrail_sweeper_late") == 1
    assert _value(s, "taskrail_sweeper_last_run_redriven") == 4
    assert _value(s, "taskrail_sweeper_last_run_duration_seconds") == 0.5
    assert _value(s, "taskrail_sweeper_last_run_timestamp_seconds") == pytest.approx(
        ran_at.timestamp(), abs=0.01
    )
    assert 20 <= (_value(s, "taskrail_sweeper_last_run_age_seconds") or 0) < 40


def test_a_sweep_during_a_database_outage_logs_a_retry_not_a_traceback(tmp_path: Path) -> None:
    # Given a sweeper whose database is down
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(
        TASKRAIL_DATABASE_URL="postgresql://taskrail:s3cret@127.0.0.1:1/taskrail",
        TASKRAIL_DATA_DIR=str(tmp_path / "data"),
        TASKRAIL_AGENTS="demo_agents",
        TASKRAIL_LOG_FORMAT="json",
        PYTHONPATH=str(REPO),
    )
    script = (
        "from orchestration.logging import configure_logging\n"
        "configure_logging('json', 'INFO')\n"
        "from workers.sweeper import sweep\n"
        "print('redriven', sweep())\n"
    )
    # When a pass runs
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    # Then it logs one warning that the next pass retries, and no traceback
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("redriven 0")
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    retries = [line for line in lines if line.get("event") == "sweep_retry_later"]
    assert len(retries) == 1 and retries[0]["level"] == "warning", done.stderr
    assert retries[0]["error_type"] == "DatabaseUnavailable"
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


def test_the_demos_table_has_a_row_for_every_resting_state() -> None:
    from rich.console import Console

    from orchestration.ops.demo import DemoResult, render

    # Given a demo run in which an operator cancelled two of the six tasks
    result = DemoResult(
        6, {"completed": 3, "escalated": 1, "cancelled": 2}, {"completed": 4, "escalated": 2}, 2.0
    )
    console = Console(record=True, width=120)
    # When its outcome is shown
    render(result, console)
    cells = [
        [cell.strip() for cell in line.split("│") if cell.strip()]
        for line in console.export_text().splitlines()
    ]
    rows = {row[0]: row[1:] for row in cells if len(row) == 3}
    # Then every resting state has its row, and the rows add up to what was submitted
    assert rows["completed"] == ["3", "4"] and rows["escalated"] == ["1", "2"]
    assert rows["failed"] == ["0", "0"] and rows["cancelled"] == ["2", "0"]
    assert sum(int(rows[s][0]) for s in ("completed", "failed", "escalated", "cancelled")) == 6
