"""The Procfile, docker-compose.yml and Dockerfile: parsed, kept in line, and their commands run.

No Docker engine runs here, so the compose file is checked by parsing it and running each
service's command (and health check) against the real ``celery`` and ``taskrail`` entry
points. The long-running commands run for real in tests/integration/test_operations.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from orchestration.settings import Settings
from orchestration.store import migrate
from tests.deploy_support import (
    SHARED_PROCESSES,
    command_words,
    compose,
    procfile,
)
from tests.support import PG_ADMIN_URL, REPO

BIN = Path(sys.executable).parent
APP_SERVICES = ("worker", "executor", "beat", "flower", "metrics", "web")
SERVICES = ("postgres", "redis", "migrate", *APP_SERVICES)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKRAIL_", "FLOWER_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        TASKRAIL_DATA_DIR=str(tmp_path / "data"),
        HOSTNAME="taskrail-test",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _compose_command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_has_every_service_with_health_checks_and_order() -> None:
    services = compose()["services"]
    assert set(SERVICES) <= set(services)
    for name in SERVICES:
        if name != "migrate":
            assert "healthcheck" in services[name], f"{name} has no health check"
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    # --scale worker=N: nothing that pins a worker to one container
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]


def test_compose_sets_only_real_settings() -> None:
    # Given every TASKRAIL_* variable any service sets
    services = compose()["services"]
    fields = {f"TASKRAIL_{name.upper()}" for name in Settings.model_fields}
    seen: set[str] = set()
    for name in ("migrate", *APP_SERVICES):
        env = services[name]["environment"]
        seen |= {key for key in env if key.startswith("TASKRAIL_")}
        # every app container shares the metrics directory
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/var/lib/taskrail/metrics", name
    # Then each is a field of Settings (a typo would be silently ignored)
    assert seen <= fields, seen - fields
    assert {"TASKRAIL_DATABASE_URL", "TASKRAIL_BROKER_URL", "TASKRAIL_REDIS_URL"} <= seen
    for name in APP_SERVICES:
        assert "metrics:/var/lib/taskrail/metrics" in services[name]["volumes"], name


def _node_name(words: list[str]) -> str | None:
    """The value of a command's ``--hostname=`` option (Celery's node name), if any."""
    return next((w.split("=", 1)[1] for w in words if w.startswith("--hostname=")), None)


def _without_node_name(words: list[str]) -> list[str]:
    return [w for w in words if not w.startswith("--hostname=")]


def test_procfile_and_compose_run_the_same_commands() -> None:
    procs = procfile()
    services = compose()["services"]
    assert set(SHARED_PROCESSES) <= set(procs)
    for name in SHARED_PROCESSES:
        ours, theirs = command_words(procs[name]), command_words(_compose_command(services[name]))
        assert _without_node_name(ours) == _without_node_name(theirs), name
        if name != "worker":
            assert _node_name(ours) == _node_name(theirs), name
    # Between them, worker and executor consume every queue: the short hops one at a
    # time, the handlers on threads with one message prefetched per thread.
    worker = command_words(procs["worker"])
    assert worker[:4] == ["celery", "-A", "workers", "worker"]
    assert "--queues=taskrail.hops,taskrail.control" in worker
    assert "--pool=solo" in worker
    # Every worker has a node name of its own (issue 19.12): under honcho each process
    # of a type gets its own PORT; each compose container its own hostname (%h), which
    # its health check pings.
    assert _node_name(worker) == "worker-${PORT:-5000}@%h"
    assert _node_name(command_words(_compose_command(services["worker"]))) == "worker@%h"
    assert "--destination worker@$$HOSTNAME" in services["worker"]["healthcheck"]["test"][1]
    assert _node_name(command_words(procs["executor"])) == "executor@%h"
    executor = command_words(procs["executor"])
    assert executor[:4] == ["celery", "-A", "workers", "worker"]
    assert "--queues=taskrail.execute" in executor
    assert "--pool=threads" in executor and "--prefetch-multiplier=1" in executor
    assert command_words(procs["beat"])[:4] == ["celery", "-A", "workers", "beat"]
    assert command_words(procs["flower"])[:4] == ["celery", "-A", "workers", "flower"]
    assert command_words(procs["metrics"])[:2] == ["taskrail", "metrics"]


def test_flower_and_metrics_require_credentials_in_both(tmp_path: Path) -> None:
    services = compose()["services"]
    required = re.compile(r"^\$\{(\w+):\?.+\}$")
    # compose refuses to start either without its credentials
    flower_auth = required.match(services["flower"]["environment"]["FLOWER_BASIC_AUTH"])
    metrics_auth = required.match(services["metrics"]["environment"]["TASKRAIL_METRICS_AUTH"])
    assert flower_auth and flower_auth.group(1) == "FLOWER_BASIC_AUTH"
    assert metrics_auth and metrics_auth.group(1) == "TASKRAIL_METRICS_AUTH"
    assert not any("--no-auth" in str(s.get("command")) for s in services.values())
    # and so do the Procfile's lines, run as honcho runs them, without the variables
    env = _env(tmp_path)
    procs = procfile()
    flower = subprocess.run(
        procs["flower"], shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert flower.returncode != 0
    assert "set FLOWER_BASIC_AUTH=user:password" in flower.stderr
    metrics = subprocess.run(
        procs["metrics"], shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert metrics.returncode == 2  # a configuration error
    assert "TASKRAIL_METRICS_AUTH" in metrics.stderr
    assert "serving" not in metrics.stderr


def _without_port(words: list[str]) -> list[str]:
    """``words`` without ``--port N``: honcho gives each process its own PORT."""
    at = words.index("--port")
    return words[:at] + words[at + 2 :]


def test_web_is_the_same_console_in_both_and_needs_its_credentials(tmp_path: Path) -> None:
    procs = procfile()
    services = compose()["services"]
    ours = command_words(procs["web"])
    theirs = command_words(_compose_command(services["web"]))
    # The same command, bound to loopback on a laptop (every interface in its container)
    assert ours[:2] == ["taskrail", "web"]
    assert _without_port(ours) == _without_port(theirs)
    assert "--host 127.0.0.1" in procs["web"]
    assert ours[ours.index("--port") + 1] == "${PORT:-8080}"
    assert theirs[theirs.index("--port") + 1] == "8080"
    assert services["web"]["ports"] == ["127.0.0.1:8080:8080"]
    # compose refuses to start it without credentials; its health check brings them
    required = re.compile(r"^\$\{(\w+):\?.+\}$")
    web_auth = required.match(services["web"]["environment"]["TASKRAIL_WEB_AUTH"])
    assert web_auth and web_auth.group(1) == "TASKRAIL_WEB_AUTH"
    check = services["web"]["healthcheck"]["test"]
    assert "TASKRAIL_WEB_AUTH" in check[-1] and ":8080/api/tasks" in check[-1]
    # and so does the Procfile's line, run as honcho runs it, without the variable
    done = subprocess.run(
        procs["web"],
        shell=True,
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2  # a configuration error
    assert "TASKRAIL_WEB_AUTH is not set" in done.stderr
    assert "serving" not in done.stderr


def test_every_command_exists_in_the_real_cli(tmp_path: Path) -> None:
    # Given each service's command (the Procfile's are the same, checked above; the
    # health checks run for real against live processes in test_operations.py)
    services = compose()["services"]
    commands = {name: _compose_command(services[name]) for name in ("migrate", *APP_SERVICES)}
    env = _env(tmp_path)

    def check(item: tuple[str, list[str]]) -> tuple[str, subprocess.CompletedProcess[str]]:
        name, argv = item
        return name, subprocess.run(
            [*argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )

    # When each runs with --help: click parses every option before --help acts (Flower's
    # own options belong to tornado, after click; it runs for real in test_operations.py)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(check, commands.items()))
    # Then each exists and accepts its options
    for name, done in results.items():
        assert done.returncode == 0, f"{name}: {commands[name]}\n{done.stdout}\n{done.stderr}"
        assert "Usage" in done.stdout, f"{name}: {done.stdout}"
    # and a misspelt option would have failed
    bad = subprocess.run(
        [*commands["metrics"], "--prot", "9808", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0


def test_dockerfile_builds_what_compose_runs() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    # Flower, a dev extra here, is installed in the image with the same requirement
    dev = project["project"]["optional-dependencies"]["dev"]
    flower_req = next(r for r in dev if r.startswith("flower"))
    assert f'"{flower_req}"' in dockerfile
    assert "pip install ." in dockerfile
    # every package the project ships is copied in
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert f"COPY {name} ./{name}" in dockerfile, name
    # the image's user owns the metrics tmpfs that compose mounts
    uid = re.search(r"--uid (\d+)", dockerfile)
    assert uid is not None
    volume = compose()["volumes"]["metrics"]["driver_opts"]
    assert f"uid={uid.group(1)}" in volume["o"]
    # the image's default command is the worker's
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None
    assert json.loads(cmd.group(1)) == _compose_command(compose()["services"]["worker"])
    for name in ("migrate", *APP_SERVICES):
        assert compose()["services"][name]["build"] == ".", name


@pytest.mark.integration
def test_migrate_service_command_upgrades_a_fresh_database(tmp_path: Path) -> None:
    # Given an empty PostgreSQL database
    name = f"taskrail_deploy_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        # When the migrate service's command runs against it
        env = {**_env(tmp_path), "TASKRAIL_DATABASE_URL": url}
        argv = _compose_command(compose()["services"]["migrate"])
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        # Then the schema is at the newest migration
        assert done.returncode == 0, done.stderr
        engine = create_engine(url)
        try:
            assert migrate.current_revision(engine) == migrate.head_revision()
        finally:
            engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.integration
def test_two_procfile_workers_have_a_node_name_each(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    # Given two Procfile workers started as the docs say (`honcho start -c worker=2`)
    env = {**server_env, "PATH": f"{BIN}{os.pathsep}{server_env.get('PATH', '')}"}
    env.pop("PORT", None)
    log = tmp_path / "honcho.log"
    honcho = str(BIN / "honcho")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [honcho, "start", "-c", "worker=2", "worker"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # When both are up and Celery pings the cluster
        names: set[str] = set()
        deadline = time.monotonic() + 90
        while len(names) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            ping = subprocess.run(
                [str(BIN / "celery"), "-A", "workers", "inspect", "ping", "--json",
                 "--timeout", "2"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            lines = [line for line in ping.stdout.splitlines() if line.startswith("{")]
            names = {name for line in lines for name in json.loads(line)}
        # Then each answers under a name of its own, and Celery saw no duplicate
        host = socket.gethostname()
        assert names == {f"worker-5000@{host}", f"worker-5001@{host}"}, names
        assert "DuplicateNodenameWarning" not in log.read_text(errors="replace")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
