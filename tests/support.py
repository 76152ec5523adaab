"""Helpers for tests that drive real servers and real worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from orchestration.state_machine import TaskStateMachine

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "TASKRAIL_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_HOST_URL = os.environ.get("TASKRAIL_TEST_REDIS", "redis://127.0.0.1:6379")
RESTING = {"completed", "failed", "escalated"}

# Every key this test session writes to the shared Redis starts with its own prefix, so
# that two test sessions on one machine never consume each other's messages.
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
        pool: str = "prefork",
        concurrency: int = 2,
        queues: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        wait: bool = True,
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
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if queues:
            cmd += ["-Q", queues]
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
