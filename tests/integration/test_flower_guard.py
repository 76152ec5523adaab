"""``celery -A workers flower`` behind authentication (workers/flower_guard.py), for real.

A real Flower process on a spare port, a broker of the test's own (OwnRedis), and a real
worker whose events Flower counts: without credentials Flower refuses to start; with them
every page, the API and ``/metrics`` answer 401 without credentials and 200 with them; it
listens on 127.0.0.1 by default; its own metrics stay out of PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from orchestration.api import Taskrail
from orchestration.settings import Settings
from tests.deploy_support import http_get, procfile, start_shell, stop, wait_http
from tests.support import REPO, OwnRedis, WorkerFleet, celery_bin, free_port

pytestmark = pytest.mark.integration

AUTH = "ops:fl0wer-Secret"
PROTECTED = ("/", "/workers", "/tasks", "/broker", "/metrics", "/api/tasks", "/api/workers")


@pytest.fixture(scope="module")
def broker() -> Iterator[OwnRedis]:
    redis = OwnRedis().start()
    try:
        yield redis
    finally:
        redis.stop()


def _env(tmp: Path, broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKRAIL_", "FLOWER_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        PATH=f"{Path(celery_bin()).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        TASKRAIL_DATABASE_URL=f"sqlite:///{tmp / 'taskrail.db'}",
        TASKRAIL_BROKER_URL=broker_url,
        TASKRAIL_AGENTS="demo_agents",
        TASKRAIL_DATA_DIR=str(tmp / "data"),
        **extra,
    )
    return env


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses something listens on at ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            octets = [str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)]
            found.add(".".join(octets))
    return found


def test_flower_refuses_to_start_without_authentication(tmp_path: Path, broker: OwnRedis) -> None:
    # Given no FLOWER_BASIC_AUTH, run as the docs start it (the Procfile's line) and bare
    env = _env(tmp_path, broker.url, FLOWER_PORT=str(free_port()))
    for command in (procfile()["flower"], f"{celery_bin()} -A workers flower"):
        # When Flower starts
        done = subprocess.run(
            command, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        # Then it refuses, in one line, and says how to proceed
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "set FLOWER_BASIC_AUTH=user:password" in lines[0]
        assert "TASKRAIL_FLOWER_NO_AUTH=1" in lines[0]
    # and credentials without a password are refused too
    bad = subprocess.run(
        [celery_bin(), "-A", "workers", "flower"],
        cwd=REPO,
        env={**env, "FLOWER_BASIC_AUTH": "admin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: FLOWER_BASIC_AUTH must be user:password " + (
        "(comma-separated for several)"
    )


def test_flower_with_auth_asks_for_it_everywhere_and_keeps_its_metrics(
    tmp_path: Path, broker: OwnRedis
) -> None:
    # Given a worker sending events, and Flower with basic auth, sharing a metrics directory
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = free_port()
    env = _env(
        tmp_path,
        broker.url,
        FLOWER_BASIC_AUTH=AUTH,
        FLOWER_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    settings = Settings(
        database_url=env["TASKRAIL_DATABASE_URL"],
        broker_url=broker.url,
        data_dir=tmp_path / "data",
        agents=["demo_agents"],
    )
    trail = Taskrail(settings)
    trail.db.upgrade()
    fleet = WorkerFleet(env, tmp_path)
    log = tmp_path / "flower.log"
    flower = start_shell(f"exec {celery_bin()} -A workers flower", env, log)
    try:
        fleet.start(pool="threads", concurrency=2)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthcheck", flower, log)
        # When a task runs, so that Flower has events to count
        task_id = trail.submit("payroll", 7, {"scenario": "ok"})
        deadline = time.monotonic() + 60
        while trail.get(task_id).status.value != "completed":
            assert time.monotonic() < deadline, fleet.logs()[-3000:]
            time.sleep(0.2)
        # Then without credentials (or with wrong ones) nothing answers but the health check
        for path in PROTECTED:
            assert http_get(base + path)[0] == 401, path
            assert http_get(base + path, auth="ops:wrong")[0] == 401, path
        assert http_get(base + "/healthcheck") == (200, "OK")
        # and with them everything does
        for path in PROTECTED:
            if path != "/broker":  # 404 off RabbitMQ's management API, after the auth check
                status, _body = http_get(base + path, auth=AUTH)
                assert status == 200, path
        deadline = time.monotonic() + 30
        while "flower_events_total{" not in http_get(base + "/metrics", auth=AUTH)[1]:
            assert time.monotonic() < deadline, "Flower counted no event"
            time.sleep(0.5)
        # It listens on loopback only
        assert _listening_addresses(port) == {"127.0.0.1"}
        # and its own metrics are not in the directory `taskrail metrics` serves
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))
        names = {family.name for family in registry.collect()}
        assert not {name for name in names if name.startswith("flower_")}, names
    finally:
        stop(flower)
        fleet.stop_all()
        trail.close()
    assert "Traceback" not in log.read_text(errors="replace")
    assert AUTH.split(":")[1] not in log.read_text(errors="replace")
