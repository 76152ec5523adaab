"""Operations on real servers and processes: Flower, the metrics endpoint, `taskrail status`,
the Procfile under honcho, and RabbitMQ as the broker.

Flower and `taskrail metrics` run from the Procfile's own lines (as honcho runs them), and
the compose file's health checks run against the live processes.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from orchestration import api
from orchestration.messaging.dispatch import celery_config
from orchestration.settings import Settings, get_settings
from tests.deploy_support import (
    compose,
    http_get,
    procfile,
    read,
    spare_port,
    start_shell,
    stop,
    wait_http,
)
from tests.integration.test_lifecycle import _check_every_task, _demo_items
from tests.support import (
    KEY_PREFIX,
    REPO,
    WorkerFleet,
    purge,
    run_cli,
    wait_until_resting,
)

pytestmark = pytest.mark.integration

HOPS = {"taskrail.assign", "taskrail.start", "taskrail.execute"}
FLOWER_AUTH = "ops:flower-pw"
METRICS_AUTH = "prom:metrics-pw"
WEB_AUTH = "ana:web-pw"
AMQP_URL = os.environ.get("TASKRAIL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
HOST = socket.gethostname()


def _with_venv(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's bin first on PATH: Procfile lines say `celery`."""
    bindir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}"}


def _healthcheck(service: str, port: int, default_port: int) -> subprocess.CompletedProcess[str]:
    """Run a compose service's health check here, against ``port`` instead of its own."""
    kind, *argv = compose()["services"][service]["healthcheck"]["test"]
    assert kind == "CMD"
    argv = [sys.executable if a == "python" else a for a in argv]
    argv = [a.replace(f":{default_port}/", f":{port}/") for a in argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _shell_healthcheck(service: str, env: dict[str, str]) -> subprocess.Popen[str]:
    kind, command = compose()["services"][service]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    # honcho names its first worker by its PORT (worker-5000@host), compose by its container
    command = command.replace("--destination worker@", "--destination worker-5000@")
    return subprocess.Popen(
        ["sh", "-c", command.replace("$$", "$")],
        cwd=REPO,
        env=_with_venv({**env, "HOSTNAME": HOST}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _scrape(port: int, auth: str | None = METRICS_AUTH) -> dict[tuple[str, frozenset[Any]], float]:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics", auth=auth)
    assert status == 200, body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _by(
    samples: dict[tuple[str, frozenset[Any]], float], name: str, *labels: str
) -> defaultdict[tuple[str, ...], float]:
    """Sum of ``name``'s samples grouped by ``labels``."""
    totals: defaultdict[tuple[str, ...], float] = defaultdict(float)
    for (sample, labelset), value in samples.items():
        if sample == name:
            found = dict(labelset)
            totals[tuple(found.get(label, "") for label in labels)] += value
    return totals


def _query(pg_url: str, sql: str) -> list[Any]:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        engine.dispose()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts; stopped (their whole group) afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop(proc)


def _check_flower(base: str, ids: list[int], types: dict[int, str]) -> None:
    """Flower lists an assign, a start and an execute hop per task, and both workers."""
    deadline = time.monotonic() + 20
    while True:
        status, body = http_get(f"{base}/api/tasks?limit=5000", auth=FLOWER_AUTH)
        assert status == 200, body
        tasks = list(json.loads(body).values())
        seen = {(t["name"], ast.literal_eval(t["args"])[0]) for t in tasks if t["args"]}
        missing = {(hop, i) for hop in HOPS for i in ids} - seen
        finished = all(t["state"] == "SUCCESS" for t in tasks)
        if (not missing and finished) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, sorted(missing)[:10]
    assert {t["name"] for t in tasks} <= HOPS
    assert {t["state"] for t in tasks} == {"SUCCESS"}
    # readable arguments: the assign hop names the task and its type
    for t in tasks:
        if t["name"] == "taskrail.assign":
            task_id, task_type = ast.literal_eval(t["args"])
            assert types[task_id] == task_type
    assert {t["worker"] for t in tasks} == {f"w1@{HOST}", f"w2@{HOST}"}
    status, body = http_get(f"{base}/api/workers?refresh=1", auth=FLOWER_AUTH)
    assert status == 200, body
    assert {f"w1@{HOST}", f"w2@{HOST}"} <= set(json.loads(body))
    # nothing without credentials, or with wrong ones
    for path in ("/api/tasks", "/api/workers", "/tasks", "/"):
        assert http_get(f"{base}{path}")[0] == 401, path
    assert http_get(f"{base}/api/tasks", auth="ops:guess")[0] == 401


def _check_metrics(port: int, pg_url: str, items: list[Any]) -> dict[tuple[str, str], int]:
    """The workers' counters match the audit trail; the task gauges match the table."""
    db_events = {
        (event, agent or ""): n
        for event, agent, n in _query(
            pg_url, "SELECT event, agent, count(*) FROM task_events GROUP BY event, agent"
        )
    }
    deadline = time.monotonic() + 10
    while True:
        samples = _scrape(port)
        counted = dict(_by(samples, "taskrail_transitions_total", "event", "agent"))
        if counted == db_events or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert counted == db_events
    scenarios = Counter(item.payload["scenario"] for item in items)
    completes = sum(n for (event, _), n in counted.items() if event == "complete")
    assert completes == scenarios["ok"] + scenarios["flaky"]
    # every hop was timed; execute once more for each flaky task's retry
    hops = _by(samples, "taskrail_hop_duration_seconds_count", "hop")
    assert hops[("assign",)] >= len(items) and hops[("start",)] >= len(items)
    assert hops[("execute",)] >= len(items) + scenarios["flaky"]
    assert _by(samples, "taskrail_hop_duration_seconds_sum", "hop")[("execute",)] > 0
    states = _by(samples, "taskrail_tasks", "state")
    db_states = dict(_query(pg_url, "SELECT status, count(*) FROM tasks GROUP BY status"))
    assert {s: n for (s,), n in states.items() if n} == db_states
    assert _by(samples, "taskrail_database_up")[()] == 1
    assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 401
    return db_events


def _check_status(env: dict[str, str], pg_url: str, total: int) -> None:
    db_states = dict(_query(pg_url, "SELECT status, count(*) FROM tasks GROUP BY status"))
    done = run_cli(["status", "--json"], env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert {"counts", "total", "stuck", "throughput"} <= set(doc)
    assert {s: n for s, n in doc["counts"].items() if n} == db_states
    assert doc["total"] == total
    assert doc["stuck"]["count"] == 0
    completed = db_states["completed"]
    assert doc["throughput"]["completed_per_min"]["1m"] == completed
    assert doc["throughput"]["completed_per_min"]["5m"] == pytest.approx(completed / 5, abs=0.01)
    screen = run_cli(["status"], env=env)
    assert screen.returncode == 0, screen.stderr
    assert "finished per minute" in screen.stdout and "stuck: none" in screen.stdout


def _check_logs(logs: str, ids: list[int], transitions_written: int) -> None:
    """Each transition's JSON line carries the hop's context and its duration."""
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    transitions = [line for line in lines if line.get("event") == "task_transition"]
    assert len(transitions) == transitions_written
    for line in transitions:
        assert line["hop"] in ("assign", "start", "execute"), line
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0, line
        assert line["task_id"] in ids and line["worker"] and line["agent"], line
        assert line["hop"] != "execute" or line["attempt"] >= 1, line


def test_a_real_run_seen_through_flower_metrics_status_and_logs(
    server_settings: Settings,
    server_env: dict[str, str],
    pg_url: str,
    fleet: WorkerFleet,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    # Given two prefork workers sharing a metrics directory, and Flower and `taskrail
    # metrics` started from the Procfile's lines, each with basic auth
    flower_port, metrics_port = spare_port(), spare_port()
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    env = _with_venv(
        {
            **server_env,
            **shared,
            "FLOWER_BASIC_AUTH": FLOWER_AUTH,
            "FLOWER_PORT": str(flower_port),
            "TASKRAIL_METRICS_AUTH": METRICS_AUTH,
            "TASKRAIL_METRICS_PORT": str(metrics_port),
        }
    )
    flower_log, metrics_log = tmp_path / "flower.log", tmp_path / "metrics.log"
    flower = start_shell(procfile()["flower"], env, flower_log)
    metrics = start_shell(procfile()["metrics"], env, metrics_log)
    procs += [flower, metrics]
    fleet.start(concurrency=2, extra_env=shared)
    fleet.start(concurrency=2, extra_env=shared)
    flower_base = f"http://127.0.0.1:{flower_port}"
    wait_http(f"{flower_base}/healthcheck", flower, flower_log)
    wait_http(f"http://127.0.0.1:{metrics_port}/healthz", metrics, metrics_log)
    # and compose's health checks for both pass against them
    assert _healthcheck("flower", flower_port, 5555).returncode == 0
    assert _healthcheck("metrics", metrics_port, 9808).returncode == 0
    # When 60 demo tasks (ok, flaky, escalating, invalid) run to a final state
    items = _demo_items(60)
    ids = api.submit_many(items)
    _check_every_task(pg_url, ids, items)
    # Then Flower shows every hop of every task with its arguments, and both workers
    _check_flower(flower_base, ids, {i: it.task_type for i, it in zip(ids, items, strict=True)})
    # and the metrics endpoint adds up every worker process's counters
    events = _check_metrics(metrics_port, pg_url, items)
    # and `taskrail status` shows the counts, the throughput and no stuck task
    _check_status(server_env, pg_url, total=len(items))
    # and each transition was logged as JSON with its hop's context and duration
    _check_logs(fleet.logs(), ids, sum(events.values()))
    assert "Traceback" not in read(flower_log) + read(metrics_log)


def _honcho_children(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", read(log))]


def test_procfile_runs_under_honcho(
    server_settings: Settings,
    server_env: dict[str, str],
    broker_url: str,
    pg_url: str,
    tmp_path: Path,
) -> None:
    # Given 20 tasks whose messages were lost (a Redis restart) before anything runs
    lost = api.submit_many(_demo_items(20))
    purge(broker_url, KEY_PREFIX)
    # When `honcho start` runs the Procfile: worker, executor, beat (sweeping every second), flower
    # and metrics, with their credentials
    flower_port, metrics_port = spare_port(), spare_port()
    env = _with_venv(
        {
            **server_env,
            "PORT": "5000",  # honcho's base port: the worker is worker-5000@<host>
            "TASKRAIL_SWEEP_INTERVAL_S": "1",
            "TASKRAIL_REDRIVE_AFTER_S": "2",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
            "FLOWER_BASIC_AUTH": FLOWER_AUTH,
            "FLOWER_PORT": str(flower_port),
            "TASKRAIL_METRICS_AUTH": METRICS_AUTH,
            "TASKRAIL_METRICS_PORT": str(metrics_port),
            "TASKRAIL_WEB_AUTH": WEB_AUTH,  # the console: the sixth line, on PORT 5500
        }
    )
    log = tmp_path / "honcho.log"
    with open(log, "ab") as out:
        honcho = subprocess.Popen(
            [str(Path(sys.executable).with_name("honcho")), "start"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/healthz", honcho, log)
        wait_http(f"http://127.0.0.1:{flower_port}/healthcheck", honcho, log)
        fresh = api.submit_many(_demo_items(20))
        # Then the lost tasks are re-driven by beat's sweeper and every task rests
        statuses = wait_until_resting(pg_url, lost + fresh, timeout=60)
        assert len(statuses) == 40
        assert "task_redriven" in read(log)
        # and compose's health checks pass against the worker and beat
        checks = [_shell_healthcheck(name, env) for name in ("worker", "executor", "beat")]
        for check in checks:
            output, _ = check.communicate(timeout=60)
            assert check.returncode == 0, output
        # and the metrics endpoint counts them (the workers and it share the directory)
        samples = _scrape(metrics_port)
        states = _by(samples, "taskrail_tasks", "state")
        assert sum(states.values()) == 40
        assert sum(_by(samples, "taskrail_hop_duration_seconds_count", "hop").values()) >= 120
        # and Flower sees the worker, with credentials only
        status, body = http_get(
            f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", auth=FLOWER_AUTH
        )
        assert status == 200 and f"worker-5000@{HOST}" in json.loads(body)
        assert http_get(f"http://127.0.0.1:{flower_port}/api/workers")[0] == 401
        assert http_get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 401
        # and the console answers on honcho's PORT for it, with credentials only
        assert http_get("http://127.0.0.1:5500/api/tasks?limit=1", auth=WEB_AUTH)[0] == 200
        assert http_get("http://127.0.0.1:5500/api/tasks?limit=1")[0] == 401
    finally:
        # honcho stops every process it started (SIGTERM, SIGKILL after 5 s)
        children = _honcho_children(log)
        if honcho.poll() is None:
            honcho.send_signal(signal.SIGINT)
        try:
            honcho.wait(30)
        finally:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            stop(honcho)
    assert len(_honcho_children(log)) == 6, read(log)[-3000:]
    assert read(log).count(" stopped (rc=") == 6, read(log)[-3000:]


def _purge_rabbitmq(url: str, settings: Settings) -> int:
    """Declare taskrail's queues on RabbitMQ as the workers do and empty them."""
    purged = 0
    with Connection(url, connect_timeout=5) as conn:
        try:
            conn.ensure_connection(max_retries=1)
        except Exception as err:
            pytest.fail(f"RabbitMQ at {url.split('@')[-1]} is unreachable ({err})", pytrace=False)
        channel = conn.channel()
        for queue in celery_config(settings)["task_queues"]:
            bound = queue(channel)
            bound.declare()
            purged += bound.purge() or 0
    return purged


def _queue_depths(url: str, settings: Settings) -> dict[str, int]:
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        depths = {}
        for queue in celery_config(settings)["task_queues"]:
            _, messages, _ = channel.queue_declare(queue=queue.name, passive=True)
            depths[queue.name] = messages
    return depths


def test_lifecycle_on_rabbitmq(
    server_settings: Settings,
    pg_url: str,
    fleet: WorkerFleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given RabbitMQ as the broker, taskrail's two queues empty, and two workers on it
    monkeypatch.setenv("TASKRAIL_BROKER_URL", AMQP_URL)
    get_settings.cache_clear()
    api.reset_client()
    settings = get_settings()
    _purge_rabbitmq(AMQP_URL, settings)
    amqp = {"TASKRAIL_BROKER_URL": AMQP_URL}
    workers = [fleet.start(concurrency=2, extra_env=amqp) for _ in range(2)]
    # When 100 demo tasks are submitted
    items = _demo_items(100)
    ids = api.submit_many(items)
    # Then each reaches its expected final state through a valid path, one event per transition
    _check_every_task(pg_url, ids, items)
    # and both workers took part, over AMQP
    seen = {w for (w,) in _query(pg_url, "SELECT DISTINCT worker FROM task_events")}
    assert len(seen) >= 2, seen
    for worker in workers:
        assert "amqp://guest:**@127.0.0.1:5672//" in worker.log()
    # and no message is left behind
    deadline = time.monotonic() + 10
    while (depths := _queue_depths(AMQP_URL, settings)) != {
        "taskrail.hops": 0,
        "taskrail.execute": 0,
        "taskrail.control": 0,
    }:
        assert time.monotonic() < deadline, depths
        time.sleep(0.3)
