"""Helpers for tests that drive real servers and real worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from orchestration.state_machine import TaskStateMachine

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "TASKRAIL_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
RESTING = {"completed", "failed", "escalated", "cancelled"}

# Every key this test session writes starts with its own prefix. The suite's Redis is a
# redis-server of its own (tests/conftest.py), so the prefix is a second guard only.
SESSION = uuid.uuid4().hex[:8]
KEY_PREFIX = f"t{SESSION}:"
BREAKER_NAMESPACE = f"taskrail-{SESSION}"
os.environ["TASKRAIL_TEST_KEY_PREFIX"] = KEY_PREFIX


def purge(url: str, prefix: str) -> None:
    """Delete this session's keys (never the whole database: other sessions share it)."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


@contextlib.contextmanager
def settings_from(env: Mapping[str, str], monkeypatch: Any) -> Iterator[Any]:
    """This process's settings and API client built from the ``TASKRAIL_*`` of ``env``."""
    from orchestration import api
    from orchestration.settings import get_settings

    for key in list(os.environ):
        if key.startswith("TASKRAIL_") and key not in env:
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("TASKRAIL_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    api.reset_client()
    try:
        yield get_settings()
    finally:
        api.reset_client()
        get_settings.cache_clear()


def celery_bin() -> str:
    return str(Path(sys.executable).with_name("celery"))


def taskrail_bin() -> str:
    return str(Path(sys.executable).with_name("taskrail"))


@dataclass
class WorkerProcess:
    """A real ``celery -A workers worker`` process and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log_offset: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"worker_ready"' in self.log() or "worker_ready" in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited early:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready in {timeout}s:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and every child it forked."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@dataclass
class WorkerFleet:
    env: dict[str, str]
    tmp: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    _count: int = 0

    def start(
        self,
        pool: str | None = "prefork",
        concurrency: int = 2,
        queues: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        wait: bool = True,
        extra_args: Sequence[str] = (),
    ) -> WorkerProcess:
        self._count += 1
        name = f"w{self._count}"
        log_path = self.tmp / f"{name}.log"
        cmd = [
            celery_bin(),
            "-A",
            "workers",
            "worker",
            "-n",
            f"{name}@%h",
            *(["-P", pool] if pool is not None else []),  # None: no --pool at all
            "-c",
            str(concurrency),
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if queues:
            cmd += ["-Q", queues]
        cmd += extra_args
        env = {**self.env, **(extra_env or {})}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = WorkerProcess(name, proc, log_path)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def start_beat(self, extra_env: Mapping[str, str] | None = None) -> WorkerProcess:
        """``celery -A workers beat``: schedules the sweeper."""
        self._count += 1
        name = f"beat{self._count}"
        log_path = self.tmp / f"{name}.log"
        env = {**self.env, **(extra_env or {})}
        Path(env.get("TASKRAIL_DATA_DIR", self.tmp)).mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [celery_bin(), "-A", "workers", "beat", "-l", "INFO"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        beat = WorkerProcess(name, proc, log_path)
        self.workers.append(beat)
        return beat

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)


def run_cli(
    args: Iterable[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [taskrail_bin(), *args],
        env=dict(env),
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until_resting(db_url: str, ids: Iterable[int], timeout: float = 120.0) -> dict[int, str]:
    """Poll until every task in ``ids`` rests (completed, failed, escalated)."""
    wanted = set(ids)
    engine = create_engine(db_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT id, status FROM tasks")).all()
            statuses = {i: s for i, s in rows if i in wanted}
            if len(statuses) == len(wanted) and all(s in RESTING for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                left = {i: s for i, s in statuses.items() if s not in RESTING}
                sample = dict(list(left.items())[:10])
                raise TimeoutError(f"{len(left)} tasks not resting after {timeout}s: {sample}")
            time.sleep(0.2)
    finally:
        engine.dispose()


def event_paths(db_url: str) -> dict[int, list[tuple[str, str, str]]]:
    """Every task's events as (event, from, to), oldest first."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT task_id, event, from_status, to_status FROM task_events ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    paths: dict[int, list[tuple[str, str, str]]] = {}
    for task_id, event, frm, to in rows:
        paths.setdefault(task_id, []).append((event, frm, to))
    return paths


class _Probe:
    status: Any = None


def assert_valid_path(task_id: int, path: list[tuple[str, str, str]], final: str) -> None:
    """The events replay on a fresh TaskStateMachine from pending and end at ``final``."""
    probe = _Probe()
    probe.status = "pending"
    sm = TaskStateMachine(task=probe)
    for event, frm, to in path:
        assert str(probe.status) == frm, (
            f"task {task_id}: event {event} from {frm} but task was {probe.status}"
        )
        sm.send(event, agent="x", reason="x")
        assert str(probe.status) == to, (
            f"task {task_id}: {event} led to {probe.status}, event says {to}"
        )
    assert str(probe.status) == final, (
        f"task {task_id}: events end at {probe.status}, row says {final}"
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OwnRedis:
    """A ``redis-server`` of the test's own on a spare port, to stop and restart at will."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        import redis

        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (SIGKILL): everything it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _postgres_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` live: $TASKRAIL_TEST_PG_BIN, else the newest installed."""
    configured = os.environ.get("TASKRAIL_TEST_PG_BIN")
    if configured:
        return Path(configured)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
    )
    if candidates:
        return candidates[-1].parent
    import shutil

    found = shutil.which("pg_ctl")
    if found is None:
        raise FileNotFoundError("no pg_ctl found (set TASKRAIL_TEST_PG_BIN)")
    return Path(found).parent


@dataclass
class OwnPostgres:
    """A PostgreSQL cluster of the test's own, in a temporary directory, on a spare port.

    ``initdb`` refuses to run as root, so as root every server command runs as the
    ``postgres`` OS user (``runuser``). Trust authentication on 127.0.0.1 and a socket
    in the cluster's own directory; ``fsync=off`` (the data is thrown away).
    """

    port: int = field(default_factory=free_port)
    root: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(_postgres_bindir() / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-3000:] if self.root else ""
            output = done.stdout + done.stderr
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{output}\n{log}")
        return done

    def init(self) -> OwnPostgres:
        """Create the cluster (``initdb``) in a fresh temporary directory."""
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="taskrail-pg-"))
        (self.root / "sock").mkdir()
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            for path in (self.root, self.root / "sock"):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        return self

    def start(self) -> OwnPostgres:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}/sock "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>``: fast rolls back open transactions and drops clients."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        cmd = [str(_postgres_bindir() / "pg_ctl"), "-D", str(self.data_dir), "status"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def destroy(self) -> None:
        """Stop the server (immediately) and delete the cluster."""
        import shutil

        if self.root is None:
            return
        if self.data_dir.exists() and self.running():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


# -- chaos suite: waiting for a run to drain, and checking every task ------------------------

ACTIVE = ("pending", "assigned", "in_progress")
EVENTS_TO_REST = {"completed": 3, "failed": 3, "escalated": 3}


def _stuck_rows(engine: Any, limit: int = 10) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, status, attempts, lease_owner, lease_expires_at, updated_at, "
                "redriven_at, not_before, last_error FROM tasks "
                "WHERE status IN ('pending', 'assigned', 'in_progress') ORDER BY id LIMIT :n"
            ),
            {"n": limit},
        ).mappings()
        return [dict(row) for row in rows]


def drain(
    db_url: str, ids: Iterable[int], timeout: float, logs: Any = None, poll_s: float = 0.25
) -> float:
    """Wait until every task in ``ids`` rests; returns the ``time.monotonic()`` it happened.

    On timeout raises AssertionError naming the stuck tasks, their rows and the log lines
    that mention them (``logs``: a callable returning the fleet's logs).
    """
    wanted = set(ids)
    engine = create_engine(db_url, pool_pre_ping=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    active = conn.execute(
                        text(
                            "SELECT id FROM tasks "
                            "WHERE status IN ('pending', 'assigned', 'in_progress')"
                        )
                    ).scalars()
                    left = wanted.intersection(active)
                    total = conn.execute(text("SELECT count(*) FROM tasks")).scalar_one()
                if not left and total >= len(wanted):
                    return time.monotonic()
            except Exception:  # the database may be down on purpose; try again
                left = wanted
            if time.monotonic() > deadline:
                stuck = _stuck_rows(engine)
                detail = "\n".join(str(row) for row in stuck)
                lines = ""
                if logs is not None and stuck:
                    needles = [f'"task_id": {row["id"]},' for row in stuck[:3]]
                    lines = "\n".join(
                        line[:400]
                        for line in logs().splitlines()
                        if any(n in line for n in needles)
                    )[-6000:]
                raise AssertionError(
                    f"{len(left)} tasks not resting after {timeout}s:\n{detail}\n"
                    f"log lines of the first ones:\n{lines}"
                )
            time.sleep(poll_s)
    finally:
        engine.dispose()


@dataclass
class Verdict:
    """What :func:`verify_every_task` found: numbers for the report."""

    tasks: int
    by_status: dict[str, int]
    lost: int  # tasks not in a final state
    duplicate_transitions: int
    handler_runs: int  # runs of counted tasks that returned
    handler_calls: int  # calls of counted tasks, returned or not
    rerun_tasks: int  # counted tasks whose handler was called more than once


def verify_every_task(
    db_url: str,
    expected: Mapping[int, str],
    counter: Any = None,
    counted: Iterable[int] = (),
    *,
    exactly_once: bool = False,
) -> Verdict:
    """Check every task of ``expected`` (id -> final status) and return the numbers.

    For each task: the expected final status; events that replay on the state machine
    from pending to it, one per transition (three to rest); a result iff completed.
    For the ``counted`` tasks (the chaos agents, counting in Redis ``counter``): the
    stored result is one that a finished run returned; with ``exactly_once`` the
    handler was called once and returned once. Raises AssertionError listing the
    first problems.
    """
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = {
                row["id"]: dict(row)
                for row in conn.execute(
                    text("SELECT id, status, result, attempts, last_error FROM tasks")
                ).mappings()
            }
    finally:
        engine.dispose()
    paths = event_paths(db_url)
    problems: list[str] = []
    by_status: dict[str, int] = {}
    duplicates = 0
    for task_id, want in expected.items():
        row = rows.get(task_id)
        if row is None:
            problems.append(f"task {task_id}: missing")
            continue
        status = str(row["status"])
        by_status[status] = by_status.get(status, 0) + 1
        path = paths.get(task_id, [])
        seen: set[tuple[str, str]] = set()
        for event, frm, _to in path:
            if (event, frm) in seen:
                duplicates += 1
            seen.add((event, frm))
        if status != want:
            problems.append(f"task {task_id}: {status}, expected {want} ({row['last_error']})")
            continue
        try:
            assert_valid_path(task_id, path, want)
        except AssertionError as err:
            problems.append(str(err))
        if len(path) != EVENTS_TO_REST[want]:
            problems.append(f"task {task_id}: {len(path)} events: {path}")
        if (row["result"] is not None) != (want == "completed"):
            problems.append(f"task {task_id}: {status} with result {row['result']!r}")
    counted = sorted(counted)
    runs_total = calls_total = reruns = 0
    if counter is not None and counted:
        from tests.agents import key

        pipe = counter.pipeline(transaction=False)
        for task_id in counted:
            pipe.lrange(key(f"runs:{task_id}"), 0, -1)
            pipe.get(key(f"calls:{task_id}"))
        replies = pipe.execute()
        for i, task_id in enumerate(counted):
            runs = [r.decode() for r in replies[2 * i]]
            calls = int(replies[2 * i + 1] or 0)
            runs_total += len(runs)
            calls_total += calls
            reruns += calls > 1
            result = rows.get(task_id, {}).get("result")
            if expected[task_id] == "completed":
                if not isinstance(result, dict) or result.get("task") != task_id:
                    problems.append(f"task {task_id}: result {result!r} is not its own")
                elif result.get("run") not in runs:
                    problems.append(f"task {task_id}: result {result!r} from no run in {runs}")
            if exactly_once and (calls, len(runs)) != (1, 1):
                problems.append(f"task {task_id}: handler called {calls}x, returned {len(runs)}x")
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:15])
    assert duplicates == 0
    lost = sum(n for status, n in by_status.items() if status not in RESTING)
    return Verdict(len(expected), by_status, lost, duplicates, runs_total, calls_total, reruns)


# The chaos suite's numbers (tasks, faults, lost, duplicates, drain), printed at the end
# of the run: each test process appends JSON lines to a file of its own in this folder
# (tests/conftest.py creates it and prints the summary, also under pytest-xdist).
REPORTS_ENV = "PYTEST_TASKRAIL_REPORTS_DIR"  # not TASKRAIL_*: tests reset those


def record_report(report: Mapping[str, Any]) -> None:
    folder = os.environ.get(REPORTS_ENV)
    if not folder:
        return
    import json

    with open(Path(folder) / f"{os.getpid()}.jsonl", "a") as out:
        out.write(json.dumps(report, default=str) + "\n")


def json_types(value: Any) -> Any:
    """A JSON value's shape: its containers, with each scalar replaced by its type's name
    (a float that came back an int shows)."""
    if isinstance(value, dict):
        return {k: json_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_types(v) for v in value]
    return type(value).__name__


def race(run: Any, producers: Iterable[Any], timeout_s: float) -> None:
    """``run(0)`` and ``run(1)`` on two threads at once; the producers are closed after."""
    import threading

    threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
    finally:
        for p in producers:
            p.close()
