"""The ``taskrail`` command against real servers: secrets masked everywhere (issue 19.9),
and a demo that never hangs silently (19.10).

A Redis of the test's own with ``requirepass`` (broker and breaker state) and a database
of the test's own on the shared PostgreSQL, configured with the password in each URL form:
every line the CLI prints and every worker log line is searched for it.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.support import PG_ADMIN_URL, REPO, WorkerFleet, free_port, run_cli

pytestmark = pytest.mark.integration

PASSWORD = "p@ss:w0rd/Zq"
ESCAPED = "p%40ss%3Aw0rd%2FZq"
NEEDLES = ("w0rd", ESCAPED, "w0rd%2FZq", "Zq")


@pytest.fixture(scope="module")
def secret_redis() -> Iterator[int]:
    """A redis-server of the test's own that requires PASSWORD; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    client = redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield port
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A database of the test's own on the shared PostgreSQL; yields its name."""
    name = f"taskrail_secrets_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _env(tmp: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        PYTHONPATH=str(REPO),
        TASKRAIL_AGENTS="demo_agents",
        TASKRAIL_DATA_DIR=str(tmp / "data"),
        TASKRAIL_BROKER_KEY_PREFIX=f"t{uuid.uuid4().hex[:6]}:",
        TMPDIR=str(tmp / "tmp"),
        COLUMNS="60",
        **settings,
    )
    (tmp / "tmp").mkdir(exist_ok=True)
    return env


def _url_forms(port: int, database: str) -> list[dict[str, str]]:
    """Each URL form of the password, for the database, the broker and the breaker Redis."""
    pg = "127.0.0.1:5432"
    return [
        {
            "TASKRAIL_DATABASE_URL": f"postgresql://postgres:{ESCAPED}@{pg}/{database}",
            "TASKRAIL_BROKER_URL": f"redis://127.0.0.1:{port}/0?password={ESCAPED}",
            # unescaped "@" and ":" in the password
            "TASKRAIL_REDIS_URL": f"redis://:p@ss:w0rd%2FZq@127.0.0.1:{port}/1",
        },
        {
            "TASKRAIL_DATABASE_URL": f"postgresql://postgres@{pg}/{database}?password={ESCAPED}",
            "TASKRAIL_BROKER_URL": f"redis://:{ESCAPED}@127.0.0.1:{port}/0",
            "TASKRAIL_REDIS_URL": f"redis://127.0.0.1:{port}/1?db=1&password={ESCAPED}",
        },
    ]


def _assert_no_password(where: str, output: str) -> None:
    for needle in NEEDLES:
        assert needle not in output, f"{where} shows the password ({needle}):\n{output[-3000:]}"


@pytest.mark.parametrize("form", [0, 1])
def test_no_form_of_a_password_reaches_cli_output_or_logs(
    tmp_path: Path, secret_redis: int, pg_database: str, form: int
) -> None:
    # Given every server configured with the password in one of its URL forms
    env = _env(tmp_path, **_url_forms(secret_redis, pg_database)[form])
    upgrade = run_cli(["db", "upgrade"], env, cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    fleet = WorkerFleet(env, tmp_path)
    outputs = {"db upgrade": upgrade.stdout + upgrade.stderr}
    try:
        fleet.start(pool="threads", concurrency=4)
        # When an operator runs the commands that print settings, state and breakers
        for args in (
            ["demo", "-n", "6", "--workers", "0", "--timeout", "120"],
            ["demo", "-n", "3", "--workers", "0", "--json"],
            ["status"],
            ["status", "--json"],
            ["breakers"],
            ["breakers", "--json"],
            ["show", "1"],
        ):
            done = run_cli(args, env, cwd=tmp_path)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            outputs[" ".join(args)] = done.stdout + done.stderr
        assert "***" in outputs["demo -n 6 --workers 0 --timeout 120"]
    finally:
        fleet.stop_all()
    outputs["worker log"] = fleet.logs()
    # Then no output and no log line holds the password, in any form
    assert "worker_ready" in outputs["worker log"]
    for where, output in outputs.items():
        _assert_no_password(where, output)


def test_demo_with_the_breaker_redis_down_fails_at_once(tmp_path: Path) -> None:
    # Given a breaker Redis on a closed port (with a password in its URL)
    env = _env(
        tmp_path,
        TASKRAIL_DATABASE_URL=f"sqlite:///{tmp_path / 'taskrail.db'}",
        TASKRAIL_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
        TASKRAIL_REDIS_URL=f"redis://:{ESCAPED}@127.0.0.1:{free_port()}/1",
    )
    assert run_cli(["db", "upgrade"], env, cwd=tmp_path).returncode == 0
    # When the demo runs
    started = time.monotonic()
    done = run_cli(["demo", "-n", "3"], env, cwd=tmp_path, timeout=60)
    # Then it fails at once, in one line naming the breaker Redis, and leaves nothing behind
    assert time.monotonic() - started < 15
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: breaker Redis unreachable at redis://:***@127.0.0.1:")
    assert "Traceback" not in done.stdout + done.stderr
    _assert_no_password("demo", done.stdout + done.stderr)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_demo_with_the_broker_down_names_the_worker_error_and_its_log(tmp_path: Path) -> None:
    # Given a broker on a closed port: tasks are recorded, but the workers cannot consume
    env = _env(
        tmp_path,
        TASKRAIL_DATABASE_URL=f"sqlite:///{tmp_path / 'taskrail.db'}",
        TASKRAIL_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0?password={ESCAPED}",
    )
    assert run_cli(["db", "upgrade"], env, cwd=tmp_path).returncode == 0
    # When the demo runs with workers of its own
    started = time.monotonic()
    done = run_cli(["demo", "-n", "3", "--workers", "1"], env, cwd=tmp_path, timeout=90)
    elapsed = time.monotonic() - started
    # Then it gives up after about 15 s without progress, naming the worker's first error
    # line and the folder of its log, in one line and without a traceback
    assert done.returncode == 1, done.stderr
    assert elapsed < 40, elapsed
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, done.stderr
    assert "no demo task moved for 15s" in error[0]
    assert "first worker error:" in error[0]
    assert "Traceback" not in done.stdout + done.stderr
    _assert_no_password("demo", done.stdout + done.stderr)
    kept = error[0].rsplit("(worker logs kept in ", 1)[1].rstrip(")")
    assert Path(kept).parent == tmp_path / "tmp"
    assert list(Path(kept).glob("*.log"))
