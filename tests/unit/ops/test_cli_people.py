"""``taskrail list``, the people's moves and the bulk moves, run as the real command.

One world of tasks in every state is seeded once, in-process, on the embedded default
(SQLite); each case runs ``taskrail ...`` in a copy of it, all cases in parallel before
the tests. A case's effect is what changed against the world: a refused command must
leave both tables exactly as they were. A few cases run on PostgreSQL at the end.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from orchestration import constants as c
from orchestration.api import Taskrail
from orchestration.models import tasks_table
from orchestration.settings import Settings
from orchestration.store.db import Database
from orchestration.store.transitions import apply_transition
from tests.support import REPO, run_cli, taskrail_bin

AGENTS = "demo_agents,tests.agents"
TYPES = ("personal_tax", "payroll", "bookkeeping")
# Task i of the world ends in STATES[i % 8] (failed twice as often as the others).
STATES = (
    "failed",
    "pending",
    "escalated",
    "completed",
    "assigned",
    "in_progress",
    "failed",
    "cancelled",
)
PATHS = {
    "pending": (),
    "assigned": ("assign",),
    "in_progress": ("assign", "start"),
    "completed": ("assign", "start", "complete"),
    "failed": ("assign", "start", "fail"),
    "escalated": ("assign", "start", "escalate"),
    "cancelled": ("cancel",),
}
WORLD_SIZE = 32
OLD = 12  # the first OLD tasks were created three days ago
LONG_ERROR = "a reason much longer than the list's column " * 3
MARKUP_ERROR = "W-2 [red]missing[/] \x1b[2J"
MISSING = "999999"


@dataclass(frozen=True)
class Seeded:
    """What the world holds for one task."""

    id: int
    status: str
    task_type: str
    client_id: int
    agent: str | None
    claimed_by: str | None
    old: bool


@dataclass
class World:
    tasks: list[Seeded]
    names: dict[str, int]  # a role in the cases ("@esc_1") -> a task id

    def ids(self, keep: Callable[[Seeded], bool] = lambda t: True) -> list[int]:
        """Ids of the tasks ``keep`` accepts, newest first."""
        return sorted((t.id for t in self.tasks if keep(t)), reverse=True)

    def by_status(self, status: str) -> list[int]:
        return self.ids(lambda t: t.status == status)


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(TASKRAIL_AGENTS=AGENTS, PYTHONPATH=str(REPO), COLUMNS="200")
    env.update(extra)
    return env


def _settings(data_dir: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=None,
        redis_url=None,
        agents=AGENTS.split(","),
    )


def seed(trail: Taskrail) -> World:
    """Tasks in every state, of three types and four clients; two escalations claimed by
    bob; the first OLD created three days ago."""
    tasks: list[Seeded] = []
    for i in range(WORLD_SIZE):
        task_type, status = TYPES[i % 3], STATES[i % 8]
        agent = f"{task_type}_agent"
        task_id = trail.submit(task_type, 100 + i % 4, {"n": i})
        reason = {0: LONG_ERROR, 2: MARKUP_ERROR}.get(i, f"reason {i}")
        for event in PATHS[status]:
            assert apply_transition(trail.db, task_id, event, agent=agent, reason=reason).applied
        has_agent = status not in ("pending", "cancelled")
        client_id, assigned = 100 + i % 4, agent if has_agent else None
        tasks.append(Seeded(task_id, status, task_type, client_id, assigned, None, i < OLD))
    escalated = [t for t in tasks if t.status == "escalated"]
    for n, t in enumerate(escalated[:2]):
        trail.claim(t.id, by="bob", note=f"mine {n}")
        tasks[tasks.index(t)] = dataclasses.replace(t, claimed_by="bob")
    with trail.db.begin() as conn:
        conn.execute(
            update(tasks_table)
            .where(tasks_table.c.id.in_([t.id for t in tasks if t.old]))
            .values(created_at=datetime.now(UTC) - timedelta(days=3))
        )
    first = {s: [t.id for t in tasks if t.status == s] for s in PATHS}
    names = {
        "bob_1": escalated[0].id,
        "bob_2": escalated[1].id,
        "esc_1": escalated[2].id,
        "esc_2": escalated[3].id,
        **{f"{s}_{n}": ids[n] for s, ids in first.items() for n in range(min(3, len(ids)))},
    }
    return World(tasks, names)


# -- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    """A command line (split as a shell would; ``@role`` stands for a world task's id)."""

    line: str
    walk: bool = False  # follow each page's "next page:" line (or the last id, with --json)
    tty: bool = False  # stderr on a terminal

    @property
    def args(self) -> list[str]:
        return shlex.split(self.line)


CASES: dict[str, Case] = {
    # list
    "list_text": Case("list"),
    "list_statuses": Case("list --status Pending,assigned --status escalated --since @iso --json"),
    "list_agent_client": Case("list --agent payroll_agent --client 101 --json"),
    "list_type_claimed": Case("list --type payroll --claimed-by bob --json"),
    "walk_json": Case("list --limit 20 --json", walk=True),
    "walk_text": Case("list --status failed,escalated --since 2d --limit 4", walk=True),
    "show": Case("show @bob_1"),
    "show_json": Case("show @bob_1 --json"),
    # a person's move on one task
    "claim": Case("claim @esc_1 --by ana --note 'on it'"),
    "unclaim": Case("unclaim @bob_1 --by ana --json"),
    "resolve": Case(
        """resolve @bob_1 --result '{"refund": 120}' --by ana --note 'from the scan'"""
    ),
    "reopen": Case("""reopen @bob_2 --payload '{"w2": "scan.pdf"}' --by ana --note 'W-2 in'"""),
    "reject": Case("reject @esc_1 --reason 'client unreachable' --json"),
    "cancel": Case("cancel @in_progress_0 --reason 'client withdrew' --by ana"),
    "retry": Case("retry @failed_0 --by ana --note 'document fixed' --json"),
    # ... refused from a wrong state
    "claim_pending": Case("claim @pending_0 --by ana"),
    "unclaim_failed": Case("unclaim @failed_0"),
    "resolve_completed": Case("resolve @completed_0 --result '{}'"),
    "reopen_in_progress": Case("""reopen @in_progress_0 --payload '{"a": 1}'"""),
    "reject_failed": Case("reject @failed_0 --reason no"),
    "cancel_escalated": Case("cancel @esc_1 --reason x"),
    "retry_escalated": Case("retry @esc_1"),
    # bulk
    "retry_dry_json": Case("retry --status failed --dry-run --json"),
    "cancel_dry": Case("cancel --status pending,assigned,in_progress --dry-run"),
    "cancel_bulk": Case(
        "cancel --status pending --status assigned,in_progress --reason 'season over' --by ops "
        "--json"
    ),
    "retry_bulk_tty": Case(
        "retry --status failed --type payroll --since 1d --by ops --note batch", tty=True
    ),
    # bad input
    "resolve_bad_json": Case("resolve @esc_1 --result '{refund: 120'"),
    "reopen_bad_json": Case("reopen @esc_1 --payload w2=scan.pdf"),
    "reject_no_reason": Case("reject @esc_1"),
    "claim_empty_by": Case("claim @esc_1 --by ' '"),
    "claim_bad_id": Case("claim five"),
    "resolve_missing": Case(f"resolve {MISSING} --result '{{}}'"),
    "list_bad_status": Case("list --status failed,done"),
    "list_limit_0": Case("list --limit 0"),
    "list_limit_word": Case("list --limit ten"),
    "retry_both": Case("retry @failed_0 --status failed"),
    "retry_neither": Case("retry"),
    "cancel_id_and_filter": Case("cancel @pending_0 --type payroll --dry-run"),
    "retry_bulk_bad_since": Case("retry --status failed --since soon"),
    "retry_bulk_wrong_status": Case("retry --status failed,escalated"),
}


@dataclass
class Run:
    cwd: Path
    procs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.CompletedProcess[str]:
        return self.procs[-1]

    @property
    def out(self) -> str:
        return self.proc.stdout

    @property
    def err(self) -> str:
        return self.proc.stderr


def run_on_tty(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``taskrail args`` with stdout on a pipe and stderr on a terminal (a pty)."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [taskrail_bin(), *args],
        env={**env, "TERM": "xterm-256color"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the command closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    proc.wait(60)
    os.close(leader)
    return subprocess.CompletedProcess(
        args, proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")
    )


_NEXT = re.compile(r"^next page: (.*)$", re.M)


def _walk(
    first: list[str], env: dict[str, str], cwd: Path
) -> list[subprocess.CompletedProcess[str]]:
    procs = [run_cli(first, env=env, cwd=cwd, timeout=60)]
    while procs[-1].returncode == 0 and len(procs) < 20:
        if "--json" in first:
            page = json.loads(procs[-1].stdout)
            if len(page) < int(first[first.index("--limit") + 1]):
                break
            args = [*first, "--after", str(page[-1]["id"])]
        else:
            found = _NEXT.search(procs[-1].stdout)
            if found is None:
                break
            command = shlex.split(found.group(1))
            assert command[0] == "taskrail"
            args = command[1:]
        procs.append(run_cli(args, env=env, cwd=cwd, timeout=60))
    return procs


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, World]]:
    """The seeded world: a directory whose ``.taskrail`` each case copies."""
    cwd = tmp_path_factory.mktemp("world")
    data = cwd / ".taskrail"
    trail = Taskrail(_settings(data, f"sqlite:///{data / 'taskrail.db'}"))
    try:
        world = seed(trail)
    finally:
        trail.close()
    yield cwd, world


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, world_dir: tuple[Path, World]) -> dict[str, Run]:
    """Every case, run in its own copy of the world."""
    template, world = world_dir
    names = {**world.names, "iso": (datetime.now(UTC) - timedelta(days=1)).isoformat()}
    env = env_for()

    def run(item: tuple[str, Case]) -> tuple[str, Run]:
        name, case = item
        cwd = tmp_path_factory.mktemp(name)
        shutil.copytree(template / ".taskrail", cwd / ".taskrail")
        args = [str(names[a[1:]]) if a.startswith("@") else a for a in case.args]
        if case.walk:
            return name, Run(cwd, _walk(args, env, cwd))
        if case.tty:
            return name, Run(cwd, [run_on_tty(args, env, cwd)])
        return name, Run(cwd, [run_cli(args, env=env, cwd=cwd, timeout=60)])

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
        return dict(pool.map(run, CASES.items()))


@pytest.fixture(scope="module")
def world(world_dir: tuple[Path, World]) -> World:
    return world_dir[1]


# -- reading a case's database ----------------------------------------------------------------


def rows(cwd: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(cwd / ".taskrail" / "taskrail.db")
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def dump(cwd: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return (
        rows(cwd, "SELECT * FROM tasks ORDER BY id"),
        rows(cwd, "SELECT * FROM task_events ORDER BY id"),
    )


def broker_messages(cwd: Path) -> int:
    return len(list((cwd / ".taskrail" / "broker" / "queue").glob("*.msg")))


@dataclass
class Change:
    """What a case changed against the world."""

    tasks: dict[int, dict[str, tuple[Any, Any]]]  # id -> column -> (before, after)
    events: list[dict[str, Any]]  # the new audit rows
    messages: int  # new messages on the broker


def change(run: Run, template: Path) -> Change:
    def table(cwd: Path, name: str) -> list[dict[str, Any]]:
        con = sqlite3.connect(cwd / ".taskrail" / "taskrail.db")
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(f"SELECT * FROM {name} ORDER BY id")]
        finally:
            con.close()

    before = {r["id"]: r for r in table(template, "tasks")}
    after = {r["id"]: r for r in table(run.cwd, "tasks")}
    assert set(before) == set(after)
    tasks = {}
    for task_id, row in after.items():
        diff = {k: (before[task_id][k], v) for k, v in row.items() if before[task_id][k] != v}
        if diff:
            tasks[task_id] = diff
    old_events = table(template, "task_events")
    new_events = table(run.cwd, "task_events")
    assert new_events[: len(old_events)] == old_events
    return Change(
        tasks, new_events[len(old_events) :], broker_messages(run.cwd) - broker_messages(template)
    )


def assert_ok(run: Run) -> None:
    assert run.proc.returncode == 0, run.err
    assert run.err == ""


def assert_refused(run: Run, template: Path, *needles: str) -> None:
    """Exit 2, one ``error:`` line naming ``needles``, nothing on stdout, nothing written."""
    assert run.proc.returncode == 2, (run.out, run.err)
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in run.err
    assert dump(run.cwd) == dump(template)
    assert broker_messages(run.cwd) == broker_messages(template)


# -- list ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "keep"),
    [
        ("list_statuses", lambda t: t.status in ("pending", "assigned", "escalated") and not t.old),
        ("list_agent_client", lambda t: t.agent == "payroll_agent" and t.client_id == 101),
        ("list_type_claimed", lambda t: t.task_type == "payroll" and t.claimed_by == "bob"),
    ],
)
def test_list_filters(
    runs: dict[str, Run], world: World, name: str, keep: Callable[[Seeded], bool]
) -> None:
    run = runs[name]

    assert_ok(run)
    assert [t["id"] for t in json.loads(run.out)] == world.ids(keep)


def test_each_filter_of_a_list_case_leaves_out_tasks_the_others_keep(world: World) -> None:
    # the cases above would pass with a filter ignored if it left nothing out
    for one, other in [
        (lambda t: t.agent == "payroll_agent", lambda t: t.client_id == 101),
        (lambda t: t.task_type == "payroll", lambda t: t.claimed_by == "bob"),
    ]:
        both = world.ids(lambda t, one=one, other=other: one(t) and other(t))
        assert both
        assert both != world.ids(one)
        assert both != world.ids(other)
    listed = ("pending", "assigned", "escalated")
    recent = world.ids(lambda t: t.status in listed and not t.old)
    assert recent
    assert recent != world.ids(lambda t: t.status in listed)


def test_walking_every_json_page_gives_the_whole_list_once_shaped_like_show_json(
    runs: dict[str, Run], world: World
) -> None:
    procs = runs["walk_json"].procs
    pages = [json.loads(p.stdout) for p in procs]
    shown = json.loads(runs["show_json"].out)["task"]

    assert all(p.returncode == 0 and p.stderr == "" for p in procs)
    assert [len(p) for p in pages] == [20, 12]
    listed = [t for page in pages for t in page]
    assert [t["id"] for t in listed] == world.ids()
    # list --json's objects are show --json's task
    assert next(t for t in listed if t["id"] == shown["id"]) == shown
    assert all(set(t) == set(shown) for t in listed)
    assert shown["claimed_by"] == "bob"
    assert shown["claimed_at"] is not None


def test_following_the_printed_next_page_command_gives_the_filtered_list(
    runs: dict[str, Run], world: World
) -> None:
    procs = runs["walk_text"].procs
    expected = world.ids(lambda t: t.status in ("failed", "escalated") and not t.old)
    seen = []
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
        seen += [int(m) for m in re.findall(r"^│\s+(\d+) │", proc.stdout, re.M)]

    assert seen == expected
    assert len(procs) == 2
    first = _NEXT.search(procs[0].stdout)
    assert first is not None
    assert re.fullmatch(
        rf"taskrail list --status failed,escalated --since \S+ --limit 4 --after {expected[3]}",
        first.group(1),
    )
    # the relative --since was fixed when the first page was read: an ISO time
    assert datetime.fromisoformat(shlex.split(first.group(1))[5]) < datetime.now(UTC)
    assert not _NEXT.search(procs[-1].stdout)


def test_list_prints_a_table_with_stored_text_literal(runs: dict[str, Run], world: World) -> None:
    run = runs["list_text"]

    assert_ok(run)
    for header in ("id", "status", "type", "client", "agent", "claimed by", "attempts", "updated"):
        assert header in run.out
    assert "W-2 [red]missing[/] \\x1b[2J" in run.out  # markup as text, escape shown escaped
    assert "\x1b" not in run.out
    assert LONG_ERROR.strip() not in run.out  # cut short ...
    assert LONG_ERROR[:40] in run.out  # ... after its start
    assert "bob" in run.out
    assert len(re.findall(r"^│\s+\d+ │", run.out, re.M)) == len(world.tasks)
    assert "next page" not in run.out  # 32 tasks, a page of 50


def test_show_has_actor_and_note_in_its_history(runs: dict[str, Run]) -> None:
    run, doc = runs["show"], json.loads(runs["show_json"].out)

    assert_ok(run)
    assert re.search(r"┃ at .*┃ actor .*┃ note", run.out)
    assert "mine 0" in run.out
    claim = doc["history"][-1]
    assert (claim["event"], claim["actor"], claim["note"]) == ("claim", "bob", "mine 0")
    assert all({"actor", "note"} <= set(e) for e in doc["history"])
    assert doc["task"]["claimed_by"] == "bob"


# -- a person's move on one task -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "role", "printed", "status", "actor", "note"),
    [
        ("claim", "esc_1", "claimed by ana", "escalated", "ana", "on it"),
        ("unclaim", "bob_1", None, "escalated", "ana", None),
        ("resolve", "bob_1", "resolved by ana", "completed", "ana", "from the scan"),
        ("reopen", "bob_2", "is pending again (reopened by ana)", "pending", "ana", "W-2 in"),
        ("reject", "esc_1", None, "failed", None, None),
        ("cancel", "in_progress_0", "cancelled by ana", "cancelled", "ana", None),
        ("retry", "failed_0", None, "pending", "ana", "document fixed"),
    ],
)
def test_a_move_prints_one_line_and_is_audited(
    runs: dict[str, Run],
    world_dir: tuple[Path, World],
    name: str,
    role: str,
    printed: str | None,
    status: str,
    actor: str | None,
    note: str | None,
) -> None:
    template, world = world_dir
    run, task_id = runs[name], world.names[role]

    assert_ok(run)
    if printed is None:  # --json
        assert json.loads(run.out) == {"id": task_id, "status": status}
    else:
        assert run.out == f"task {task_id} {printed}\n"
    done = change(run, template)
    assert list(done.tasks) == [task_id]
    assert rows(run.cwd, "SELECT status FROM tasks WHERE id = ?", task_id) == [(status,)]
    assert [(e["task_id"], e["event"], e["to_status"], e["note"]) for e in done.events] == [
        (task_id, name, status, note)
    ]
    # --by, or the OS user
    assert done.events[0]["actor"] == (actor or getpass.getuser())


def test_what_each_move_writes(runs: dict[str, Run], world_dir: tuple[Path, World]) -> None:
    template, world = world_dir
    names = world.names

    claimed = change(runs["claim"], template)
    assert claimed.tasks[names["esc_1"]]["claimed_by"] == (None, "ana")
    assert claimed.messages == 0
    unclaimed = change(runs["unclaim"], template)
    assert unclaimed.tasks[names["bob_1"]]["claimed_by"] == ("bob", None)
    resolved = change(runs["resolve"], template).tasks[names["bob_1"]]
    assert json.loads(resolved["result"][1]) == {"refund": 120}
    assert resolved["completed_at"][0] is None
    assert resolved["completed_at"][1] is not None
    reopened = change(runs["reopen"], template)
    row = reopened.tasks[names["bob_2"]]
    assert row["claimed_by"] == ("bob", None)
    assert json.loads(row["payload"][1]) == {**json.loads(row["payload"][0]), "w2": "scan.pdf"}
    assert reopened.messages == 1  # back to the agents
    rejected = change(runs["reject"], template).tasks[names["esc_1"]]
    assert rejected["last_error"][1] == "client unreachable"
    cancelled = change(runs["cancel"], template).tasks[names["in_progress_0"]]
    assert cancelled["last_error"][1] == "client withdrew"
    assert change(runs["retry"], template).messages == 1


@pytest.mark.parametrize(
    ("name", "role", "needles"),
    [
        ("claim_pending", "pending_0", ("is pending", "only escalated tasks can be claimed")),
        ("unclaim_failed", "failed_0", ("is failed", "only escalated tasks can be unclaimed")),
        ("resolve_completed", "completed_0",
         ("is completed", "only escalated tasks can be resolved")),
        ("reopen_in_progress", "in_progress_0",
         ("is in_progress", "only escalated tasks can be reopened")),
        ("reject_failed", "failed_0", ("is failed", "only escalated tasks can be rejected")),
        ("cancel_escalated", "esc_1", ("is escalated", "only pending, assigned or in_progress")),
        ("retry_escalated", "esc_1", ("is escalated", "only failed tasks can be retried")),
    ],
)  # fmt: skip
def test_a_move_from_a_wrong_state_is_refused_and_writes_nothing(
    runs: dict[str, Run],
    world_dir: tuple[Path, World],
    name: str,
    role: str,
    needles: tuple[str, ...],
) -> None:
    template, world = world_dir
    assert_refused(runs[name], template, f"task {world.names[role]} ", *needles)


# -- bulk ----------------------------------------------------------------------------------


def test_a_dry_run_says_how_many_and_which_and_changes_nothing(
    runs: dict[str, Run], world_dir: tuple[Path, World]
) -> None:
    template, world = world_dir
    failed = world.by_status("failed")
    active = world.ids(lambda t: t.status in ("pending", "assigned", "in_progress"))

    for name in ("retry_dry_json", "cancel_dry"):
        assert_ok(runs[name])
        assert dump(runs[name].cwd) == dump(template), name
        assert broker_messages(runs[name].cwd) == broker_messages(template)
    assert json.loads(runs["retry_dry_json"].out) == {
        "event": "retry",
        "dry_run": True,
        "matched": len(failed),
        "moved": 0,
        "skipped": 0,
        "first_ids": failed,
    }
    shown = ", ".join(map(str, active[: c.BULK_SHOWN_IDS]))
    assert len(active) > c.BULK_SHOWN_IDS
    assert runs["cancel_dry"].out == (
        f"dry run: {len(active)} tasks would be cancelled; first ids: {shown}, ...; "
        "nothing changed\n"
    )


@pytest.mark.parametrize(
    ("name", "keep", "event", "status", "actor", "note"),
    [
        ("cancel_bulk", lambda t: t.status in ("pending", "assigned", "in_progress"), "cancel",
         "cancelled", "ops", None),
        ("retry_bulk_tty", lambda t: t.status == "failed" and not t.old
         and t.task_type == "payroll", "retry", "pending", "ops", "batch"),
    ],
)  # fmt: skip
def test_a_bulk_move_moves_and_audits_every_task_it_matches(
    runs: dict[str, Run],
    world_dir: tuple[Path, World],
    name: str,
    keep: Callable[[Seeded], bool],
    event: str,
    status: str,
    actor: str | None,
    note: str | None,
) -> None:
    template, world = world_dir
    run, expected = runs[name], world.ids(keep)

    assert run.proc.returncode == 0, run.err
    assert expected
    done = change(run, template)
    assert sorted(done.tasks, reverse=True) == expected
    assert all(d["status"][1] == status for d in done.tasks.values())
    assert sorted((e["task_id"] for e in done.events), reverse=True) == expected
    assert {(e["event"], e["to_status"], e["note"], e["actor"]) for e in done.events} == {
        (event, status, note, actor or getpass.getuser())
    }
    assert done.messages == (len(expected) if event == "retry" else 0)
    if "--json" in CASES[name].args:
        assert json.loads(run.out) == {
            "event": event,
            "dry_run": False,
            "matched": len(expected),
            "moved": len(expected),
            "skipped": 0,
            "first_ids": expected[: c.BULK_SHOWN_IDS],
        }
    else:
        assert run.out == f"retried {len(expected)} tasks\n"


def test_a_bulk_move_draws_its_progress_only_on_a_terminal(runs: dict[str, Run]) -> None:
    assert runs["cancel_bulk"].err == ""  # stderr is a pipe: no bar
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", runs["retry_bulk_tty"].err)
    assert "retry:" in drawn
    assert " 2/2 " in drawn, drawn  # done/total at the end
    assert "Traceback" not in drawn


def test_a_cancel_in_bulk_records_the_reason(
    runs: dict[str, Run], world_dir: tuple[Path, World]
) -> None:
    template, _ = world_dir
    done = change(runs["cancel_bulk"], template)
    assert {d["last_error"][1] for d in done.tasks.values()} == {"season over"}


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("resolve_bad_json", ("result cannot be stored: not valid JSON",)),
        ("reopen_bad_json", ("invalid payload: not valid JSON",)),
        ("reject_no_reason", ("Missing option '--reason'",)),
        ("claim_empty_by", ("invalid by: must not be empty",)),
        ("claim_bad_id", ("task id must be an integer", "'five'")),
        ("resolve_missing", (f"no task with id {MISSING}",)),
        ("list_bad_status", ("invalid status: unknown status 'done'", "cancelled")),
        ("list_limit_0", ("invalid limit", "1 to 1000")),
        ("list_limit_word", ("invalid limit", "1 to 1000", "'ten'")),
        ("retry_both", ("give a task id or --status, not both",)),
        ("retry_neither", ("give a task id, or --status",)),
        ("cancel_id_and_filter", ("--type, --dry-run go with --status",)),
        ("retry_bulk_bad_since", ("invalid since", "'soon'")),
        ("retry_bulk_wrong_status", ("invalid status", "retried", "escalated")),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    runs: dict[str, Run], world_dir: tuple[Path, World], name: str, needles: tuple[str, ...]
) -> None:
    assert_refused(runs[name], world_dir[0], *needles)


def test_no_case_printed_a_python_warning(runs: dict[str, Run]) -> None:
    for name, run in runs.items():
        for proc in run.procs:
            assert "Warning" not in proc.stderr, (name, proc.stderr)
            assert "Traceback" not in proc.stderr, (name, proc.stderr)


# -- PostgreSQL ------------------------------------------------------------------------------


def test_list_and_moves_on_postgresql(pg_db: Database, pg_url: str, tmp_path: Path) -> None:
    # Given the world on PostgreSQL
    trail = Taskrail(_settings(tmp_path / "data", pg_url))
    try:
        world = seed(trail)
    finally:
        trail.close()
    env = env_for(TASKRAIL_DATABASE_URL=pg_url, TASKRAIL_DATA_DIR=str(tmp_path / "data"))
    failed, resolved_id = world.by_status("failed"), world.names["bob_1"]

    def together(*lines: str) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(max_workers=len(lines)) as pool:
            return list(pool.map(lambda line: run_cli(shlex.split(line), env, tmp_path, 60), lines))

    # When a filtered page is listed and a bulk retry dry-run
    page, dry = together(
        f"list --status failed --since 2d --limit 2 --after {failed[4]} --json",
        "retry --status failed --dry-run --json",
    )
    # Then
    assert [t["id"] for t in json.loads(page.stdout)] == [
        i for i in world.ids(lambda t: t.status == "failed" and not t.old) if i < failed[4]
    ][:2]
    assert json.loads(dry.stdout)["matched"] == len(failed)

    # When the failed tasks are retried in bulk and an escalation is resolved, at once
    bulk, resolved = together(
        "retry --status failed --by ops --note batch --json",
        f"resolve {resolved_id} --result '{{\"refund\": 7}}' --by ana",
    )
    # Then each task moved once, audited with who did it
    assert bulk.returncode == 0, bulk.stderr
    assert json.loads(bulk.stdout)["moved"] == len(failed)
    assert resolved.stdout == f"task {resolved_id} resolved by ana\n"
    with pg_db.connect() as conn:
        statuses = dict(conn.execute(text("SELECT id, status FROM tasks")).all())
        moves = conn.execute(
            text(
                "SELECT task_id, event, actor, note FROM task_events "
                "WHERE event IN ('retry', 'resolve') ORDER BY task_id DESC"
            )
        ).all()
    assert [tuple(m) for m in moves if m[1] == "retry"] == [
        (i, "retry", "ops", "batch") for i in failed
    ]
    assert [tuple(m) for m in moves if m[1] == "resolve"] == [(resolved_id, "resolve", "ana", None)]
    assert [statuses[i] for i in failed] == ["pending"] * len(failed)
    assert statuses[resolved_id] == "completed"
