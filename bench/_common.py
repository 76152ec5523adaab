"""Helpers shared by bench/submit.py and bench/lifecycle.py (not a benchmark itself).

Everything here reads the servers from outside: a fresh Postgres database, a Redis
server of the benchmark's own (started here unless BENCH_REDIS names one), server-side
counters (pg_stat_database, pg_stat_user_tables, Redis MONITOR filtered by database)
and /proc for worker CPU and RSS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_own_redis() -> str:
    """Start a ``redis-server`` of the benchmark's own on a free loopback port.

    Nothing on disk; stopped when this process exits. Returns its URL without a
    database number. The benchmark flushes and fills only servers it started.
    """
    import atexit

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    atexit.register(stop)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"could not start redis-server on port {port}") from None
            time.sleep(0.05)
    url = f"redis://127.0.0.1:{port}"
    os.environ["BENCH_REDIS"] = url  # scripts and workers started from here use it too
    return url


PG_HOST = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
# The Redis server the benchmark flushes and fills: bench/run starts one of its own and
# passes it in BENCH_REDIS; a script run alone starts its own. Never the shared 6379.
REDIS_HOST = os.environ.get("BENCH_REDIS") or start_own_redis()
DB_NAME = os.environ.get("BENCH_DB_NAME", "bench_taskrail")
# Redis database numbers of the benchmark's own server, one per role.
REDIS_DB_SUBMIT = 3
REDIS_DB_TASKRAIL = 4
REDIS_DB_BREAKERS = 5
REDIS_DB_BASELINE = 6
REDIS_DB_NOOP = 7  # Celery's no-op ceiling: its broker
REDIS_DB_NOOP_COUNTER = 8  # ... and the counter its task increments
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def pg_dsn(db: str = DB_NAME) -> str:
    """A libpq URL (psycopg.connect, the baseline)."""
    return f"{PG_HOST}/{db}"


def sqlalchemy_url(db: str = DB_NAME) -> str:
    """The same database as a SQLAlchemy URL for psycopg 3."""
    return as_sqlalchemy(pg_dsn(db))


def as_sqlalchemy(dsn: str) -> str:
    """A libpq URL as SQLAlchemy's URL for psycopg 3."""
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


def redis_url(db: int) -> str:
    return f"{REDIS_HOST}/{db}"


def fresh_database(db: str = DB_NAME, migrate: bool = True) -> None:
    """Drop and create ``db``; apply taskrail's migrations with Database(url).upgrade()."""
    with psycopg.connect(pg_dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{db}"')
    if migrate:
        from orchestration.store.db import Database

        database = Database(sqlalchemy_url(db))
        database.upgrade()
        database.dispose()


def flush_redis(db: int) -> redis.Redis:
    """A client of database ``db`` of the benchmark's own Redis, emptied first."""
    client = redis.Redis.from_url(redis_url(db))
    client.flushdb()
    return client


def pct(xs: list[float], p: float) -> float:
    """Percentile with linear interpolation (the reference's latency_naive.py)."""
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- server-side counters --------------------------------------------------------


def pg_counters(db: str = DB_NAME) -> dict[str, int]:
    """Transactions of ``db`` and tuple writes on its tables, read on a connection of its own.

    The reading connection's own transaction is not flushed into the figures it reads
    (backends report their statistics when they go idle or exit), so take this after
    the backends being measured have exited or gone idle for over a second.
    """
    with psycopg.connect(pg_dsn(db), autocommit=True) as c:
        xact = c.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (db,)
        ).fetchone()[0]
        upd, ins = c.execute(
            "SELECT coalesce(sum(n_tup_upd), 0), coalesce(sum(n_tup_ins), 0) "
            "FROM pg_stat_user_tables"
        ).fetchone()
    return {"xact": int(xact), "upd": int(upd), "ins": int(ins)}


@contextlib.contextmanager
def autovacuum_off(db: str = DB_NAME) -> Iterator[None]:
    """Autovacuum off on every table of ``db`` for the block, then back on.

    An autovacuum or autoanalyze run counts as a transaction of the database in
    ``pg_stat_database``; one that lands inside a counted run would look like a stray
    statement of the workers.
    """
    with psycopg.connect(pg_dsn(db), autocommit=True) as c:
        tables = [r[0] for r in c.execute("SELECT relid::regclass::text FROM pg_stat_user_tables")]
        for table in tables:
            c.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    try:
        yield
    finally:
        with psycopg.connect(pg_dsn(db), autocommit=True) as c:
            for table in tables:
                c.execute(f"ALTER TABLE {table} RESET (autovacuum_enabled)")


# -- worker processes --------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLK_TCK


def _cmdline_has(pid: str, text: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return text in fh.read()
    except OSError:
        return False


def servers_cpu_s(
    names: tuple[str, ...] = ("postgres", "redis-server"), *, own_backends: bool = False
) -> dict[str, float]:
    """CPU seconds used so far by every process whose name is one of ``names`` (the
    database's backends, the Redis server), by name; of the ``redis-server``
    processes only the benchmark's own (its title names the port). ``own_backends``:
    of the ``postgres`` processes only the backends of the bench database (their title
    names it), so that other people's tests on the same server are not counted; the
    server's own processes (WAL writer, checkpointer) are left out then."""
    out = dict.fromkeys(names, 0.0)
    own_redis = f":{urlsplit(REDIS_HOST).port}".encode()
    own_db = f" {DB_NAME} ".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                head, tail = fh.read().rsplit(")", 1)
        except OSError:
            continue
        name = head.split("(", 1)[1]
        if name == "redis-server" and not _cmdline_has(entry, own_redis):
            continue
        if name == "postgres" and own_backends and not _cmdline_has(entry, own_db):
            continue
        if name in out:
            fields = tail.split()
            out[name] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def status_mb(pid: int, field: str) -> float | None:
    """A memory field of /proc/<pid>/status (``VmHWM``, ``VmRSS``) in MB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the process's peak resident set size."""
    return status_mb(pid, "VmHWM")


@dataclass
class WorkerSet:
    """Celery worker processes started by the benchmark (each in a session of its own)."""

    label: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    log_paths: list[Path] = field(default_factory=list)

    def pids(self) -> list[int]:
        out: list[int] = []
        for p in self.procs:
            out += process_tree(p.pid)
        return out

    def pids_of(self, k: int) -> list[int]:
        """The ``k``-th worker process and its pool's children."""
        return process_tree(self.procs[k].pid)

    def check_alive(self) -> None:
        for p, log in zip(self.procs, self.log_paths, strict=True):
            if p.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise SystemExit(
                    f"{self.label} worker exited with {p.returncode}; log {log}:\n{tail}"
                )

    def rss(self) -> dict[str, float]:
        """Peak RSS (MB): per process, and the largest and the sum over all of them."""
        values = [v for v in (peak_rss_mb(p) for p in self.pids()) if v is not None]
        return {"sum": sum(values), "max": max(values, default=0.0), "n": len(values)}

    def stop(self, timeout: float = 20.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # warm shutdown, like the reference's kill -TERM
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: only what we started
                p.wait(5)


@dataclass(frozen=True)
class Proc:
    """One ``celery worker`` process: its pool (None: no ``-P`` flag at all, the app's
    default), concurrency, queues and other flags."""

    pool: str | None
    concurrency: int = 1
    queues: str | None = None
    extra: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"-P {self.pool} -c {self.concurrency}" if self.pool else f"-c {self.concurrency}"
        if self.queues:
            text += f" -Q {self.queues}"
        return " ".join([text, *self.extra])


def same_procs(pool: str | None, concurrency: int, instances: int) -> list[Proc]:
    return [Proc(pool, concurrency) for _ in range(instances)]


def describe_procs(procs: list[Proc]) -> str:
    """``2 x (-P solo -c 1)`` or a list of different processes."""
    if len(set(procs)) == 1:
        return f"{len(procs)} x ({procs[0].describe()})"
    return " + ".join(f"({p.describe()})" for p in procs)


def start_procs(
    label: str, app: str, cwd: Path, env: dict[str, str], procs: list[Proc], log_dir: Path
) -> WorkerSet:
    """Start ``procs`` as ``celery -A app worker`` processes, each in a session of its own,
    with the reference's flags (``-l warning --without-gossip --without-mingle
    --without-heartbeat``)."""
    celery = str(Path(sys.executable).with_name("celery"))
    ws = WorkerSet(label)
    for k, proc in enumerate(procs):
        log = log_dir / f"{label}_worker{k + 1}.log"
        cmd = [
            celery, "-A", app, "worker", "-n", f"{label}{k + 1}@%h",
            *(["-P", proc.pool] if proc.pool else []), "-c", str(proc.concurrency),
            "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        if proc.queues:
            cmd += ["-Q", proc.queues]
        cmd += list(proc.extra)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            ws.procs.append(popen)
        ws.log_paths.append(log)
    return ws


def start_workers(
    label: str,
    app: str,
    cwd: Path,
    env: dict[str, str],
    pool: str | None,
    concurrency: int,
    instances: int,
    log_dir: Path,
) -> WorkerSet:
    return start_procs(label, app, cwd, env, same_procs(pool, concurrency, instances), log_dir)


def wait_ready(ws: WorkerSet, celery_app, timeout: float = 30.0) -> None:
    """Wait until every worker answers a remote-control ping, plus half a second for its pool."""
    names = {f"{ws.label}{k + 1}" for k in range(len(ws.procs))}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.check_alive()
        replies = celery_app.control.ping(timeout=0.5) or []
        seen = {next(iter(r)).split("@", 1)[0] for r in replies}
        if names <= seen:
            time.sleep(0.5)
            return
    raise SystemExit(f"{ws.label} workers not ready after {timeout}s (see {ws.log_paths})")


class RedisMonitor:
    """Counts Redis commands per database with MONITOR, in a thread (for untimed runs only).

    Commands that a Lua script runs inside the server are counted apart: they are not
    round trips. Stop it with :meth:`stop`, which sends a marker through the server.
    """

    MARK = b"__bench_monitor_stop__"

    def __init__(self, dbs: set[int]) -> None:
        from collections import Counter

        self.dbs = {str(d).encode() for d in dbs}
        self.counts: Counter = Counter()
        self.lua: Counter = Counter()
        self.per_db: dict[int, Counter] = {}
        self._client = redis.Redis.from_url(redis_url(0))
        self._conn = self._client.connection_pool.get_connection()
        self._conn.send_command("MONITOR")
        self._conn.read_response()  # OK
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            line = self._conn.read_response()
            if not isinstance(line, bytes):
                continue
            try:
                rest = line.split(b" ", 1)[1]
                close = rest.index(b"] ")
                db, client = rest[1:close].split(b" ", 1)
                cmd = rest[close + 2 :].split(b'"', 2)[1].lower().decode()
            except (IndexError, ValueError):
                continue
            if self.MARK in rest:
                return
            if db in self.dbs:
                (self.lua if client == b"lua" else self.counts)[cmd] += 1
                if client != b"lua":
                    self.per_db.setdefault(int(db), type(self.counts)())[cmd] += 1

    def stop(self) -> None:
        self._client.echo(self.MARK)
        self._thread.join(10)
        self._client.connection_pool.disconnect()


class PgWireCounter:
    """A TCP relay in front of Postgres that counts the round trips its clients make.

    Every byte is passed on unchanged, both ways; the client's side of the protocol is
    parsed on the way through: a simple ``Query`` ('Q') or an extended-protocol
    ``Sync`` ('S', which ends a Parse/Bind/Execute batch and makes the client wait for
    the server's answer) is one round trip. Point the workers at :meth:`dsn` and read
    :attr:`round_trips` before and after a run: this counts what the workers send,
    and nothing else the server does in that window (autovacuum, the driver's own
    connections), which ``pg_stat_database`` cannot tell apart. For untimed runs only:
    the relay adds a hop to every statement.
    """

    UNTYPED = (80877103, 80877104)  # SSLRequest, GSSENCRequest: another untyped follows

    def __init__(self) -> None:
        server = urlsplit(PG_HOST)
        self.upstream = (server.hostname or "127.0.0.1", server.port or 5432)
        self.round_trips = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def dsn(self, db: str = DB_NAME) -> str:
        """``pg_dsn(db)`` through the relay (no TLS, so the protocol can be read)."""
        url = urlsplit(pg_dsn(db))
        user = f"{url.username}@" if url.username else ""
        relayed = url._replace(netloc=f"{user}127.0.0.1:{self.port}")
        return relayed.geturl() + "?sslmode=disable&gssencmode=disable"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._client_side, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(2)

    def _client_side(self, src: Any, dst: Any) -> None:
        buf = bytearray()
        started = False  # past the startup message (which has no type byte)
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                buf += data
                while True:
                    if not started:
                        if len(buf) < 8:
                            break
                        size = int.from_bytes(buf[:4], "big")
                        if len(buf) < size:
                            break
                        code = int.from_bytes(buf[4:8], "big")
                        del buf[:size]
                        started = code not in self.UNTYPED
                        continue
                    if len(buf) < 5:
                        break
                    size = 1 + int.from_bytes(buf[1:5], "big")
                    if len(buf) < size:
                        break
                    if buf[0] in (ord("Q"), ord("S")):
                        with self._lock:
                            self.round_trips += 1
                    del buf[:size]
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(2)

    def close(self) -> None:
        self._listener.close()
