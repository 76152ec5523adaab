"""The ``taskrail`` console script, run as a real subprocess on the embedded default.

Each case runs in a directory of its own (its own ``.taskrail/taskrail.db`` and
file-system broker), with no ``TASKRAIL_*`` variable but ``TASKRAIL_AGENTS``. A run of
the script costs a second or two of imports, so the module runs every case once, in
parallel, before its tests; each test then checks one case's output, exit code and
database file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestration.api import Taskrail
from orchestration.settings import Settings
from orchestration.store.migrate import head_revision
from orchestration.store.transitions import apply_transition
from tests.support import REPO, run_cli

AGENTS = "demo_agents,tests.agents"
# Task types of the agents in TASKRAIL_AGENTS=demo_agents,tests.agents (among others).
KNOWN_TYPES = ["bad_result", "bookkeeping", "echo", "payroll", "personal_tax"]
UNREACHABLE_DB = "postgresql://bob:s3cret@127.0.0.1:5999/x"
ID = "<seeded id>"  # stands for the id of the task a case's seed created


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(TASKRAIL_AGENTS=AGENTS, PYTHONPATH=str(REPO), COLUMNS="200")
    env.update(extra)
    return env


def db_path(cwd: Path) -> Path:
    return cwd / ".taskrail" / "taskrail.db"


def query(cwd: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db_path(cwd))
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def task_rows(cwd: Path) -> int:
    """Rows in ``tasks``; a database file that was never created holds none."""
    if not db_path(cwd).exists():
        return 0
    return int(query(cwd, "SELECT count(*) FROM tasks")[0][0])


def event_rows(cwd: Path) -> int:
    if not db_path(cwd).exists():
        return 0
    return int(query(cwd, "SELECT count(*) FROM task_events")[0][0])


def broker_messages(cwd: Path) -> int:
    return len(list((cwd / ".taskrail" / "broker" / "queue").glob("*.msg")))


# -- seeding a case's directory in-process, before its run ------------------------------------


def _trail(cwd: Path) -> Taskrail:
    settings = Settings(
        data_dir=cwd / ".taskrail",
        database_url=f"sqlite:///{db_path(cwd)}",
        broker_url=None,
        redis_url=None,
        agents=AGENTS.split(","),
    )
    return Taskrail(settings)


def _drive(trail: Taskrail, task_id: int, *events: str) -> None:
    for event in events:
        result = apply_transition(
            trail.db, task_id, event, agent="personal_tax_agent", reason="test"
        )
        assert result.applied


def seed_history(cwd: Path) -> dict[str, Any]:
    trail = _trail(cwd)
    try:
        task_id = trail.submit("personal_tax", 42, {"year": 2025})
        _drive(trail, task_id, "assign", "start")
    finally:
        trail.close()
    return {"id": task_id}


def seed_mix(cwd: Path) -> dict[str, Any]:
    trail = _trail(cwd)
    try:
        ids = [trail.submit("payroll", n) for n in range(4)]
        _drive(trail, ids[1], "assign")
        _drive(trail, ids[2], "assign", "start", "fail")
        _drive(trail, ids[3], "assign", "start", "complete")
    finally:
        trail.close()
    return {"ids": ids}


def seed_failed(cwd: Path) -> dict[str, Any]:
    trail = _trail(cwd)
    try:
        task_id = trail.submit("personal_tax", 42)
        _drive(trail, task_id, "assign", "start", "fail")
    finally:
        trail.close()
    return {"id": task_id}


def seed_pending(cwd: Path) -> dict[str, Any]:
    trail = _trail(cwd)
    try:
        task_id = trail.submit("personal_tax", 42)
    finally:
        trail.close()
    return {"id": task_id}


CWD = "<cwd>"  # stands for the case's own directory in an environment value
CWD_PATH = f"{REPO}{os.pathsep}{CWD}"


def _write(path: Path, text: str) -> dict[str, Any]:
    path.write_text(text)
    return {}


@dataclass
class Case:
    args: list[str]
    seed: Callable[[Path], dict[str, Any]] | None = None
    env: Mapping[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # what works
    "submit": Case(
        ["submit", "personal_tax", "--client", "42", "--payload", '{"year": 2025}', "--key", "k-42"]
    ),
    "show": Case(["show", ID], seed_history),
    "show_json": Case(["show", ID, "--json"], seed_history),
    "status_json": Case(["status", "--json"], seed_mix),
    "retry": Case(["retry", ID], seed_failed),
    "db_upgrade": Case(["db", "upgrade"]),
    # bad input
    "unknown_type": Case(["submit", "tax_return", "--client", "1"]),
    "payload_not_json": Case(["submit", "payroll", "--client", "1", "--payload", "{year: 2025"]),
    "payload_not_object": Case(["submit", "payroll", "--client", "1", "--payload", "[2025]"]),
    "client_missing": Case(["submit", "payroll"]),
    "client_not_int": Case(["submit", "payroll", "--client", "forty-two"]),
    "show_missing": Case(["show", "999"]),
    "retry_missing": Case(["retry", "999"]),
    "retry_not_failed": Case(["retry", ID], seed_pending),
    "db_unreachable": Case(
        ["submit", "payroll", "--client", "1"], env={"TASKRAIL_DATABASE_URL": UNREACHABLE_DB}
    ),
    # issue 19.3: one line, never a traceback
    "retry_json": Case(["retry", ID, "--json"], seed_failed),
    "show_id_too_big": Case(["show", "9223372036854775808"]),
    "show_id_non_ascii": Case(["show", "\u0661\u0662"]),
    "retry_id_negative": Case(["retry", "--", "-1"]),
    "client_too_big": Case(["submit", "payroll", "--client", "99999999999999999999"]),
    "client_underscore": Case(["submit", "payroll", "--client", "1_000"]),
    "client_non_ascii": Case(["submit", "payroll", "--client", "\u0664\u0662"]),
    "client_markup_nul": Case(["submit", "payroll", "--client", "[red]4\x012[/]"]),
    "db_not_a_url": Case(["show", "1"], env={"TASKRAIL_DATABASE_URL": "notaurl"}),
    "db_mysql": Case(
        ["show", "1"], env={"TASKRAIL_DATABASE_URL": "mysql://bob:s3cret@127.0.0.1/x"}
    ),
    "db_bad_port": Case(
        ["show", "1"], env={"TASKRAIL_DATABASE_URL": "postgresql://bob:s3cret@127.0.0.1:99999/x"}
    ),
    "setting_not_a_number": Case(["show", "1"], env={"TASKRAIL_METRICS_PORT": "s3cret"}),
    "agent_syntax_error": Case(
        ["submit", "payroll", "--client", "1"],
        seed=lambda cwd: _write(cwd / "broken_syntax_agent.py", "def handler(:\n"),
        env={"TASKRAIL_AGENTS": "demo_agents,broken_syntax_agent", "PYTHONPATH": CWD_PATH},
    ),
    "agent_raises_on_import": Case(
        ["submit", "payroll", "--client", "1"],
        seed=lambda cwd: _write(
            cwd / "raising_agent.py", "raise RuntimeError('no config at redis://:s3cret@h')\n"
        ),
        env={"TASKRAIL_AGENTS": "demo_agents,raising_agent", "PYTHONPATH": CWD_PATH},
    ),
    "broker_query_password_down": Case(
        ["submit", "payroll", "--client", "1"],
        env={"TASKRAIL_BROKER_URL": "redis://127.0.0.1:1/0?password=s3cret"},
    ),
}


@dataclass
class Run:
    cwd: Path
    seeded: dict[str, Any]
    proc: subprocess.CompletedProcess[str]

    @property
    def out(self) -> str:
        return self.proc.stdout

    @property
    def err(self) -> str:
        return self.proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every case, seeded and then run as ``taskrail ...`` in its own directory."""
    prepared: dict[str, tuple[Path, dict[str, Any], list[str], dict[str, str]]] = {}
    for name, case in CASES.items():
        cwd = tmp_path_factory.mktemp(name)
        seeded = case.seed(cwd) if case.seed else {}
        args = [str(seeded["id"]) if a == ID else a for a in case.args]
        env = {k: v.replace(CWD, str(cwd)) for k, v in case.env.items()}
        prepared[name] = (cwd, seeded, args, cli_env(**env))

    def run(name: str) -> tuple[str, Run]:
        cwd, seeded, args, env = prepared[name]
        return name, Run(cwd, seeded, run_cli(args, env=env, cwd=cwd, timeout=60))

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(run, prepared))


def assert_input_error(run: Run, *needles: str) -> None:
    """Exit 2, one ``error:`` line on stderr naming ``needles``, nothing on stdout."""
    assert run.proc.returncode == 2, run.err
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in run.err


# -- what works ----------------------------------------------------------------------------


def test_submit_prints_the_id_of_a_new_pending_task(runs: dict[str, Run]) -> None:
    run = runs["submit"]

    assert run.proc.returncode == 0, run.err
    task_id = int(run.out.strip())
    assert query(
        run.cwd, "SELECT id, task_type, client_id, status, payload, idempotency_key FROM tasks"
    ) == [(task_id, "personal_tax", 42, "pending", '{"year":2025}', "k-42")]
    assert broker_messages(run.cwd) == 1


def test_show_prints_the_task_and_its_history(runs: dict[str, Run]) -> None:
    run = runs["show"]

    assert run.proc.returncode == 0, run.err
    for text in (
        "personal_tax",
        "in_progress",
        "personal_tax_agent",
        "2025",
        f"history of task {run.seeded['id']}",
        "assign",
        "start",
        "pending",
        "assigned",
    ):
        assert text in run.out
    assert run.err == ""


def test_show_json_is_the_task_and_its_history(runs: dict[str, Run]) -> None:
    run = runs["show_json"]

    assert run.proc.returncode == 0, run.err
    doc = json.loads(run.out)
    assert set(doc) == {"task", "history"}
    task = doc["task"]
    assert task["id"] == run.seeded["id"]
    assert (task["task_type"], task["client_id"], task["status"]) == (
        "personal_tax",
        42,
        "in_progress",
    )
    assert task["payload"] == {"year": 2025}
    assert task["assigned_agent"] == "personal_tax_agent"
    assert task["created_at"].endswith("+00:00")
    assert [(e["event"], e["from_status"], e["to_status"]) for e in doc["history"]] == [
        ("assign", "pending", "assigned"),
        ("start", "assigned", "in_progress"),
    ]
    assert all(
        e["task_id"] == task["id"] and e["agent"] == "personal_tax_agent" for e in doc["history"]
    )


def test_status_json_counts_every_state(runs: dict[str, Run]) -> None:
    run = runs["status_json"]

    assert run.proc.returncode == 0, run.err
    doc = json.loads(run.out)
    assert doc["counts"] == {
        "pending": 1,
        "assigned": 1,
        "in_progress": 0,
        "completed": 1,
        "failed": 1,
        "escalated": 0,
        "cancelled": 0,
    }
    assert doc["total"] == 4


def test_retry_sends_a_failed_task_back_to_pending(runs: dict[str, Run]) -> None:
    run = runs["retry"]
    task_id = run.seeded["id"]

    assert run.proc.returncode == 0, run.err
    assert f"task {task_id} is pending again" in run.out
    assert query(
        run.cwd, "SELECT status, assigned_agent, attempts FROM tasks WHERE id = ?", task_id
    ) == [("pending", None, 0)]
    events = query(run.cwd, "SELECT event, from_status, to_status FROM task_events ORDER BY id")
    assert events[-1] == ("retry", "failed", "pending")
    assert len(events) == 4
    assert broker_messages(run.cwd) == 2  # the submit's assign hop and the retry's


def test_db_upgrade_creates_the_schema(runs: dict[str, Run]) -> None:
    run = runs["db_upgrade"]

    assert run.proc.returncode == 0, run.err
    assert "schema is current" in run.out
    assert query(run.cwd, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    tables = {r[0] for r in query(run.cwd, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"tasks", "task_events", "alembic_version"} <= tables
    assert task_rows(run.cwd) == 0


# -- bad input -------------------------------------------------------------------------------


def test_unknown_task_type_lists_the_known_ones(runs: dict[str, Run]) -> None:
    run = runs["unknown_type"]

    assert_input_error(run, "tax_return", *KNOWN_TYPES)
    assert task_rows(run.cwd) == 0


def test_payload_that_is_not_json(runs: dict[str, Run]) -> None:
    run = runs["payload_not_json"]

    assert_input_error(run, "invalid payload", "not valid JSON")
    assert task_rows(run.cwd) == 0


def test_payload_that_is_not_an_object(runs: dict[str, Run]) -> None:
    run = runs["payload_not_object"]

    assert_input_error(run, "invalid payload", "JSON object", "list")
    assert task_rows(run.cwd) == 0


def test_client_missing(runs: dict[str, Run]) -> None:
    run = runs["client_missing"]

    assert run.proc.returncode == 2
    assert "Missing option" in run.err
    assert "--client" in run.err
    assert "Traceback" not in run.err
    assert task_rows(run.cwd) == 0


def test_client_not_an_integer(runs: dict[str, Run]) -> None:
    run = runs["client_not_int"]

    assert_input_error(run, "client id must be an integer", "forty-two")
    assert task_rows(run.cwd) == 0


def test_show_of_a_missing_id(runs: dict[str, Run]) -> None:
    run = runs["show_missing"]

    assert_input_error(run, "no task with id 999")
    assert task_rows(run.cwd) == 0


def test_retry_of_a_missing_id(runs: dict[str, Run]) -> None:
    run = runs["retry_missing"]

    assert_input_error(run, "no task with id 999")
    assert task_rows(run.cwd) == 0
    assert event_rows(run.cwd) == 0


def test_retry_of_a_task_that_is_not_failed(runs: dict[str, Run]) -> None:
    run = runs["retry_not_failed"]
    task_id = run.seeded["id"]

    assert_input_error(run, f"task {task_id} is pending", "only failed tasks can be retried")
    assert query(run.cwd, "SELECT id, status FROM tasks") == [(task_id, "pending")]
    assert event_rows(run.cwd) == 0
    assert broker_messages(run.cwd) == 1  # only the seeding submit's


def test_unreachable_database_is_one_line_without_the_password(runs: dict[str, Run]) -> None:
    run = runs["db_unreachable"]

    assert run.proc.returncode == 1
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("error: database unreachable at 127.0.0.1:5999")
    assert "Traceback" not in run.err
    assert "s3cret" not in run.out + run.err
    assert not db_path(run.cwd).exists()  # nothing was written anywhere, not even SQLite
    assert task_rows(run.cwd) == 0


def test_every_case_ran_without_a_python_warning_on_stderr(runs: dict[str, Run]) -> None:
    for name, run in runs.items():
        assert "Warning" not in run.err, (name, run.err)


# -- issue 19.3: every failure is one line, never a traceback -----------------------------


def assert_one_line(run: Run, code: int, *needles: str, secret: str = "s3cret") -> None:
    """Exit ``code``, one ``error:`` line on stderr naming ``needles``, nothing on stdout."""
    assert run.proc.returncode == code, run.err
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in run.err
    assert secret not in run.err


def test_retry_json(runs: dict[str, Run]) -> None:
    run = runs["retry_json"]

    assert run.proc.returncode == 0, run.err
    assert json.loads(run.out) == {"id": run.seeded["id"], "status": "pending"}


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("show_id_too_big", "'9223372036854775808'"),
        ("show_id_non_ascii", "'\u0661\u0662'"),
        ("retry_id_negative", "'-1'"),
    ],
)
def test_task_ids_are_ascii_digits_in_range(runs: dict[str, Run], name: str, shown: str) -> None:
    assert_one_line(
        runs[name], 2, "task id must be an integer from 0 to 9223372036854775807", shown
    )
    assert task_rows(runs[name].cwd) == 0


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("client_too_big", "'99999999999999999999'"),
        ("client_underscore", "'1_000'"),
        ("client_non_ascii", "'\u0664\u0662'"),
        ("client_markup_nul", "'[red]4\\x012[/]'"),
    ],
)
def test_client_ids_are_ascii_digits_in_range(runs: dict[str, Run], name: str, shown: str) -> None:
    assert_one_line(runs[name], 2, "client id must be an integer", shown)
    assert task_rows(runs[name].cwd) == 0


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("db_not_a_url", ("TASKRAIL_DATABASE_URL", "not a URL")),
        ("db_mysql", ("TASKRAIL_DATABASE_URL", "unsupported database 'mysql'")),
        ("db_bad_port", ("TASKRAIL_DATABASE_URL", "port")),
        ("setting_not_a_number", ("TASKRAIL_METRICS_PORT", "integer")),
    ],
)
def test_bad_settings_are_one_line_naming_the_variable(
    runs: dict[str, Run], name: str, needles: tuple[str, ...]
) -> None:
    assert_one_line(runs[name], 2, "invalid setting", *needles)
    assert not db_path(runs[name].cwd).exists()


@pytest.mark.parametrize("name", ["agent_syntax_error", "agent_raises_on_import"])
def test_an_agent_module_that_cannot_load_is_one_line(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    assert_one_line(run, 2, "_agent")
    assert task_rows(run.cwd) == 0


def test_a_broker_down_with_its_password_in_the_query_is_masked(runs: dict[str, Run]) -> None:
    # kombu raised TypeError for ?password= (it read the password twice); now the task is
    # recorded and the warning names the broker with the password masked
    run = runs["broker_query_password_down"]

    assert "Traceback" not in run.err
    assert "s3cret" not in run.out + run.err
    assert "redis://:***@127.0.0.1:1/0" in run.err
    assert len(run.err.strip().splitlines()) == 1, run.err


def test_two_embedded_databases_never_share_a_queue(tmp_path: Path) -> None:
    # Given two embedded deployments in one directory, each with its own SQLite file
    urls = {name: f"sqlite:///{tmp_path / name}.db" for name in ("a", "b")}
    for url in urls.values():
        assert (
            run_cli(["db", "upgrade"], cli_env(TASKRAIL_DATABASE_URL=url), tmp_path).returncode == 0
        )
    # When each submits a task
    for url in urls.values():
        done = run_cli(
            ["submit", "payroll", "--client", "1"], cli_env(TASKRAIL_DATABASE_URL=url), tmp_path
        )
        assert done.returncode == 0, done.stderr
    # Then each message waits beside its own database, none in the shared default folder
    for name in urls:
        assert len(list((tmp_path / f"{name}.db.broker" / "queue").glob("*.msg"))) == 1, name
    assert not (tmp_path / ".taskrail" / "broker").exists()
