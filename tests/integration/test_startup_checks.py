"""A worker (or beat) that cannot work refuses to start, with one line saying why; a hop
for a task type this worker lacks waits on the queue for one that has it (issue 18.9).

Real ``celery -A workers worker`` and ``beat`` processes on the real servers.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from orchestration import api
from tests.support import PG_ADMIN_URL, WorkerFleet, WorkerProcess, free_port, wait_until_resting

pytestmark = pytest.mark.integration

BROKEN_MODULES = {
    "missing": (None, "ModuleNotFoundError: No module named"),
    "syntax": ("def broken(:\n", "SyntaxError: "),
    "raises": ("raise RuntimeError('no licence key')\n", "RuntimeError: no licence key"),
}


def _exit_line(process: WorkerProcess, timeout: float = 60.0) -> tuple[int, str, str]:
    """Wait for the process to end; its exit code, last log line and whole log."""
    code = process.proc.wait(timeout)
    log = process.log()
    lines = [line for line in log.splitlines() if line.strip()]
    return code, lines[-1] if lines else "", log


@pytest.mark.parametrize("case", sorted(BROKEN_MODULES))
@pytest.mark.parametrize("command", ["worker", "beat"])
def test_an_agent_module_that_cannot_be_imported_stops_the_start(
    fleet: WorkerFleet, server_env: dict[str, str], tmp_path: Path, case: str, command: str
) -> None:
    # Given TASKRAIL_AGENTS naming a module that is missing, has a syntax error, or raises
    module = f"agents_{case}_{uuid.uuid4().hex[:6]}"
    source, expected = BROKEN_MODULES[case]
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    env = {
        "TASKRAIL_AGENTS": f"demo_agents,{module}",
        "PYTHONPATH": f"{tmp_path}:{server_env['PYTHONPATH']}",
    }
    # When the worker (or beat) starts
    if command == "worker":
        process = fleet.start(pool="solo", concurrency=1, extra_env=env, wait=False)
    else:
        process = fleet.start_beat(extra_env=env)
    # Then it exits non-zero, its last line naming the module and the reason, no traceback
    code, last, log = _exit_line(process)
    assert code != 0, log[-3000:]
    assert last.startswith(f"taskrail {command} cannot start: cannot import agent module"), last
    assert repr(module) in last and expected in last, last
    assert "Traceback" not in log and "worker_ready" not in log, log[-3000:]


def test_a_worker_whose_database_is_unreachable_does_not_start(fleet: WorkerFleet) -> None:
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{free_port()}/taskrail"
    process = fleet.start(
        pool="solo", concurrency=1, extra_env={"TASKRAIL_DATABASE_URL": url}, wait=False
    )
    code, last, log = _exit_line(process)
    assert code != 0
    assert last.startswith("taskrail worker cannot start: database unreachable at 127.0.0.1:"), last
    assert "hunter2" not in log and "Traceback" not in log


def test_a_worker_whose_database_is_unmigrated_does_not_start(fleet: WorkerFleet) -> None:
    # Given a fresh, empty database of this test's own
    name = f"taskrail_bare_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        worker = fleet.start(
            pool="solo", concurrency=1, extra_env={"TASKRAIL_DATABASE_URL": url}, wait=False
        )
        beat = fleet.start_beat(extra_env={"TASKRAIL_DATABASE_URL": url})
        for process, command in ((worker, "worker"), (beat, "beat")):
            code, last, log = _exit_line(process)
            assert code != 0
            assert last.startswith(f"taskrail {command} cannot start: database at "), last
            assert "taskrail db upgrade" in last and "Traceback" not in log
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_a_task_type_only_a_second_worker_knows_waits_for_it(
    fleet: WorkerFleet, server_settings, pg_url: str
) -> None:
    # Given a short-hop worker without the test agents (no "echo" agent)
    first = fleet.start(
        pool="solo", concurrency=1, queues="taskrail.hops",
        extra_env={"TASKRAIL_AGENTS": "demo_agents"},
    )  # fmt: skip
    # When an echo task is submitted, the first worker sees its assign hop and cannot do it
    task_id = api.submit("echo", 7, {"n": 1})
    deadline = time.monotonic() + 30
    while '"no_agent_for_task_type"' not in first.log():
        assert time.monotonic() < deadline, first.log()[-3000:]
        time.sleep(0.2)
    assert api.get(task_id).status == "pending"
    # Then it does not use the message up: a worker with the agent, started later, does it
    fleet.start(pool="threads", concurrency=4, queues="taskrail.hops,taskrail.execute")
    assert wait_until_resting(pg_url, [task_id], timeout=90) == {task_id: "completed"}
    assert first.alive()
