"""The three things the benchmarks run side by side, and how each is measured.

- :class:`Baseline`: ``bench/baseline_lifecycle.py``, the hand-written Celery lifecycle
  (= ``shared/bench/naive_lifecycle.py``): 3 plain tasks, each a compare-and-set UPDATE
  and an enqueue of the next.
- :class:`Taskrail`: ``celery -A workers worker`` from the repository root, the demo
  agents, payload ``{"scenario": "ok"}`` (plus ``work_ms`` for the I/O workload), so
  every task completes in 3 hops: taskrail.assign, taskrail.start, taskrail.execute.
- :class:`Noop`: ``bench/celery_noop.py`` (= ``shared/bench/noop.py``), Celery's own
  ceiling: one no-op task per message.

All of them on the same Postgres database (bench_taskrail) and Redis server (a database
number each), workers started fresh for each measurement with the reference's flags.
Throughput follows the reference: the rows are inserted first, the clock starts, the
first messages are enqueued, and the clock stops when a poll (every 50 ms; the no-op's
own 20 ms loop) sees all N done.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import _common as cm
import psycopg

FINAL = ("completed", "failed", "escalated")
TASK_TYPES = ("personal_tax", "payroll", "bookkeeping")

TASKRAIL_ENV = {
    "TASKRAIL_DATABASE_URL": cm.sqlalchemy_url(),
    "TASKRAIL_BROKER_URL": cm.redis_url(cm.REDIS_DB_TASKRAIL),
    "TASKRAIL_REDIS_URL": cm.redis_url(cm.REDIS_DB_BREAKERS),
    "TASKRAIL_AGENTS": "demo_agents",
    "TASKRAIL_LOG_FORMAT": "json",
}
BASELINE_ENV = {"BROKER": cm.redis_url(cm.REDIS_DB_BASELINE), "DSN": cm.pg_dsn(), "PREFETCH": "4"}
NOOP_ENV = {
    "BROKER": cm.redis_url(cm.REDIS_DB_NOOP),
    "COUNTER": cm.redis_url(cm.REDIS_DB_NOOP_COUNTER),
    "PREFETCH": "16",
}


def machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def idle_busy(seconds: float = 1.0) -> float:
    """Share of both cores busy while nothing of ours runs (0..1)."""
    a = machine_busy()
    time.sleep(seconds)
    b = machine_busy()
    return (b[0] - a[0]) / max(1, b[1] - a[1])


class Side:
    """What differs between the things measured: app, worker command, rows, enqueue."""

    name = ""
    hops_per_task = 3
    redis_dbs: set[int] = set()

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def start(self, procs: list[cm.Proc], env: dict[str, str] | None = None) -> cm.WorkerSet:
        raise NotImplementedError

    def db_env(self, dsn: str) -> dict[str, str]:
        """The workers' environment that points them at the database ``dsn`` (libpq URL)."""
        return {}

    def prepare(self, n: int, work_ms: float = 0.0) -> list[Any]:
        """Fresh rows (and broker db); returns the first messages to enqueue."""
        raise NotImplementedError

    def enqueue_all(self, jobs: list[Any]) -> None:
        raise NotImplementedError

    def enqueue_one(self, job: Any) -> None:
        raise NotImplementedError

    def done(self, c: psycopg.Connection) -> int:
        """How many of the prepared tasks are done."""
        raise NotImplementedError

    def check(self, c: psycopg.Connection, n: int) -> list[str]:
        return []


class Baseline(Side):
    name = "baseline"
    redis_dbs = {cm.REDIS_DB_BASELINE}

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        os.environ.update(BASELINE_ENV)
        import baseline_lifecycle as bl

        self.bl = bl
        self.rds = cm.flush_redis(cm.REDIS_DB_BASELINE)

    def start(self, procs: list[cm.Proc], env: dict[str, str] | None = None) -> cm.WorkerSet:
        self.rds.flushdb()
        full = {**os.environ, **BASELINE_ENV, **(env or {})}
        ws = cm.start_procs("baseline", "baseline_lifecycle", cm.BENCH, full, procs, self.log_dir)
        cm.wait_ready(ws, self.bl.app)
        return ws

    def db_env(self, dsn: str) -> dict[str, str]:
        return {"DSN": dsn}

    def prepare(self, n: int, work_ms: float = 0.0) -> list[Any]:
        with psycopg.connect(cm.pg_dsn(), autocommit=True) as c:
            return self.bl.create_rows(c, n)

    def enqueue_all(self, jobs: list[Any]) -> None:
        for i in jobs:  # the reference's loop
            self.bl.assign.delay(i)

    def enqueue_one(self, job: Any) -> None:
        self.bl.assign.delay(job)

    def done(self, c: psycopg.Connection) -> int:
        row = c.execute("SELECT count(*) FROM bench_task WHERE status = 'completed'").fetchone()
        return int(row[0])

    def check(self, c: psycopg.Connection, n: int) -> list[str]:
        states = dict(c.execute("SELECT status, count(*) FROM bench_task GROUP BY 1").fetchall())
        return [] if states.get("completed", 0) == n else [f"final states {states}"]

    def last_update(self, c: psycopg.Connection, job: Any) -> Any:
        return c.execute("SELECT status, updated_at FROM bench_task WHERE id = %s", (job,))


class Taskrail(Side):
    name = "taskrail"
    redis_dbs = {cm.REDIS_DB_TASKRAIL, cm.REDIS_DB_BREAKERS}

    def __init__(
        self,
        log_dir: Path,
        log_level: str = "INFO",
        app: str = "workers",
        *,
        agents: str = "demo_agents",
        task_types: tuple[str, ...] = TASK_TYPES,
    ) -> None:
        super().__init__(log_dir)
        self.log_level = log_level
        self.app_name = app
        self.agents, self.task_types = agents, task_types
        for key in [k for k in os.environ if k.startswith("TASKRAIL_")]:
            del os.environ[key]  # the driver's own settings come from TASKRAIL_ENV only
        os.environ.update(
            TASKRAIL_ENV,
            TASKRAIL_AGENTS=agents,
            TASKRAIL_LOG_LEVEL="WARNING",
            TASKRAIL_DATA_DIR=str(log_dir / "data"),
        )
        from orchestration import constants as c
        from orchestration.api import NewTask
        from orchestration.api import Taskrail as Client
        from orchestration.logging import configure_logging
        from orchestration.messaging.dispatch import Dispatcher, make_celery
        from orchestration.settings import Settings

        class HeldBack(Dispatcher):
            """Keeps the first-hop messages submit_many would send, to send them later."""

            def __init__(self) -> None:
                self.held: list[tuple[str, list[Any]]] = []

            def send_many(self, hop: str, args_list: Any) -> int:  # type: ignore[override]
                rows = [(hop, list(a)) for a in args_list]
                self.held += rows
                return len(rows)

        configure_logging("console", "WARNING")  # the driver's own taskrail log lines
        self.c, self.NewTask, self.Client = c, NewTask, Client
        self.settings = Settings()
        self.app = make_celery(self.settings)
        self.dispatcher = Dispatcher(self.app)
        self.held_back = HeldBack
        self.rds = cm.flush_redis(cm.REDIS_DB_TASKRAIL)
        cm.flush_redis(cm.REDIS_DB_BREAKERS)

    def start(self, procs: list[cm.Proc], env: dict[str, str] | None = None) -> cm.WorkerSet:
        self.rds.flushdb()
        cm.flush_redis(cm.REDIS_DB_BREAKERS)
        full = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
        full.update(
            TASKRAIL_ENV,
            TASKRAIL_AGENTS=self.agents,
            TASKRAIL_LOG_LEVEL=self.log_level,
            TASKRAIL_DATA_DIR=str(self.log_dir / "data"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(cm.REPO), os.environ.get("PYTHONPATH")])),
        )
        full.update(env or {})
        ws = cm.start_procs("taskrail", self.app_name, cm.REPO, full, procs, self.log_dir)
        cm.wait_ready(ws, self.app)
        return ws

    def db_env(self, dsn: str) -> dict[str, str]:
        return {"TASKRAIL_DATABASE_URL": cm.as_sqlalchemy(dsn)}

    def producer(self, dispatcher: Any = None) -> Any:
        return self.Client(self.settings, dispatcher=dispatcher)

    def payload(self, work_ms: float) -> dict[str, Any]:
        return {"scenario": "ok", "work_ms": work_ms} if work_ms else {"scenario": "ok"}

    def prepare(self, n: int, work_ms: float = 0.0) -> list[Any]:
        with psycopg.connect(cm.pg_dsn(), autocommit=True) as c:
            c.execute("TRUNCATE tasks, task_events RESTART IDENTITY CASCADE")
        held = self.held_back()
        tr = self.producer(held)
        payload = self.payload(work_ms)
        for b in range(0, n, 1000):
            tr.submit_many(
                [
                    self.NewTask(self.task_types[i % len(self.task_types)], i, payload)
                    for i in range(b, min(n, b + 1000))
                ]
            )
        tr.close()
        assert len(held.held) == n and all(h == self.c.HOP_ASSIGN for h, _ in held.held)
        return [a for _, a in held.held]

    def enqueue_all(self, jobs: list[Any]) -> None:
        self.dispatcher.send_many(self.c.HOP_ASSIGN, jobs)

    def enqueue_one(self, job: Any) -> None:
        self.dispatcher.send(self.c.HOP_ASSIGN, job)

    def done(self, c: psycopg.Connection) -> int:
        row = c.execute("SELECT count(*) FROM tasks WHERE status = ANY(%s)", (list(FINAL),))
        return int(row.fetchone()[0])

    def check(self, c: psycopg.Connection, n: int) -> list[str]:
        notes = []
        states = dict(c.execute("SELECT status, count(*) FROM tasks GROUP BY 1").fetchall())
        if states.get("completed", 0) != n:
            notes.append(f"final states {states}, expected {n} completed")
        events = c.execute("SELECT count(*) FROM task_events").fetchone()[0]
        if events != 3 * n:
            notes.append(f"task_events has {events} rows, expected {3 * n}")
        return notes

    def last_update(self, c: psycopg.Connection, job: Any) -> Any:
        return c.execute("SELECT status, updated_at FROM tasks WHERE id = %s", (job[0],))


class Noop(Side):
    """Celery's no-op ceiling: one message per task, the reference's produce-and-poll."""

    name = "celery-noop"
    hops_per_task = 1
    redis_dbs = {cm.REDIS_DB_NOOP}

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        os.environ.update(NOOP_ENV)
        import celery_noop

        self.noop = celery_noop
        self.rds = cm.flush_redis(cm.REDIS_DB_NOOP)
        self.counter = cm.flush_redis(cm.REDIS_DB_NOOP_COUNTER)

    def start(self, procs: list[cm.Proc], env: dict[str, str] | None = None) -> cm.WorkerSet:
        self.rds.flushdb()
        full = {**os.environ, **NOOP_ENV, **(env or {})}
        ws = cm.start_procs("noop", "celery_noop", cm.BENCH, full, procs, self.log_dir)
        cm.wait_ready(ws, self.noop.app)
        return ws

    def prepare(self, n: int, work_ms: float = 0.0) -> list[Any]:
        self.counter.set("done", 0)
        return list(range(n))

    def enqueue_all(self, jobs: list[Any]) -> None:
        for i in jobs:  # the reference's loop
            self.noop.t.delay(i)

    def done(self, c: psycopg.Connection) -> int:
        return int(self.counter.get("done") or 0)


def throughput(
    side: Side,
    procs: list[cm.Proc],
    n: int,
    *,
    work_ms: float = 0.0,
    poll_s: float = 0.05,
    env: dict[str, str] | None = None,
    own_backends: bool = False,
) -> dict[str, Any]:
    """One timed run of ``n`` tasks on fresh workers: rates, CPU per hop, memory.

    ``own_backends``: count the CPU of the bench database's Postgres backends only
    (:func:`_common.servers_cpu_s`)."""
    ws = side.start(procs, env)
    try:
        jobs = side.prepare(n, work_ms)
        before = idle_busy()
        mains = [p.pid for p in ws.procs]
        kids = [p for p in ws.pids() if p not in mains]
        cpu0, kcpu0, busy0 = cm.cpu_s(mains), cm.cpu_s(kids), machine_busy()
        each0 = [cm.cpu_s(ws.pids_of(k)) for k in range(len(mains))]
        servers0 = cm.servers_cpu_s(own_backends=own_backends)
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)
        t0 = time.perf_counter()
        side.enqueue_all(jobs)
        t_enq = time.perf_counter() - t0
        deadline = t0 + max(120.0, n / 5)
        while (done := side.done(c)) < n:
            if time.perf_counter() > deadline:
                ws.check_alive()
                raise SystemExit(f"{side.name}: only {done}/{n} done after {deadline - t0:.0f}s")
            time.sleep(poll_s)
        dt = time.perf_counter() - t0
        cpu1, kcpu1, busy1 = cm.cpu_s(mains), cm.cpu_s(kids), machine_busy()
        each1 = [cm.cpu_s(ws.pids_of(k)) for k in range(len(mains))]
        servers1 = cm.servers_cpu_s(own_backends=own_backends)
        rss = ws.rss()
        proc_rss = [
            sum(v for v in map(cm.peak_rss_mb, ws.pids_of(k)) if v is not None)
            for k in range(len(mains))
        ]
        notes = side.check(c, n)
        c.close()
    finally:
        ws.stop()
    hops = side.hops_per_task * n
    return {
        "tasks_s": n / dt,
        "hops_s": hops / dt,
        "dt": dt,
        "enq_s": n / t_enq,
        "cpu_ms_hop": (cpu1 - cpu0 + kcpu1 - kcpu0) * 1000 / hops,
        "main_cpu_ms_hop": (cpu1 - cpu0) * 1000 / hops,
        "kids_cpu_ms_hop": (kcpu1 - kcpu0) * 1000 / hops,
        "proc_cpu_ms_task": [(b - a) * 1000 / n for a, b in zip(each0, each1, strict=True)],
        "server_cpu_ms_task": {k: (servers1[k] - servers0[k]) * 1000 / n for k in servers0},
        "busy": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        "idle_busy": before,
        "rss_sum": rss["sum"],
        "rss_max": rss["max"],
        "nproc": rss["n"],
        "proc_rss": proc_rss,  # peak RSS (MB) of each worker process with its pool's children
        "notes": notes,
    }


def fmt_tp(name: str, r: dict[str, Any]) -> str:
    return (
        f"  {name:11s} {r['tasks_s']:7.0f} tasks/s {r['hops_s']:7.0f} hops/s  ({r['dt']:.2f}s; "
        f"enqueue {r['enq_s']:.0f}/s; worker CPU/hop {r['main_cpu_ms_hop']:.2f} ms main + "
        f"{r['kids_cpu_ms_hop']:.2f} ms pool; machine busy "
        f"{r['busy'] * 100:.0f}%, {r['idle_busy'] * 100:.0f}% just before)"
    )


def latency(
    side: Baseline | Taskrail,
    procs: list[cm.Proc],
    n: int,
    warm: int,
    gap_s: float,
    poll_s: float,
    submit_n: int = 0,
) -> dict[str, list[float]]:
    """Idle workers, one task at a time (shared/bench/latency_naive.py's method): the
    samples in ms, by kind (observed, server, and submit for taskrail)."""
    ws = side.start(procs)
    out: dict[str, list[float]] = {"observed": [], "server": []}
    try:
        jobs = side.prepare(n + warm)
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)

        def wait(job: Any, t0: float) -> tuple[float, Any]:
            deadline = t0 + 30
            while True:
                row = side.last_update(c, job).fetchone()
                if row[0] == "completed":
                    return time.perf_counter(), row
                if row[0] in FINAL or time.perf_counter() > deadline:
                    raise SystemExit(f"{side.name}: task {job} is {row[0]} (latency run)")
                time.sleep(poll_s)

        for k, job in enumerate(jobs):
            time.sleep(gap_s)
            wall0, t0 = time.time(), time.perf_counter()
            side.enqueue_one(job)
            t1, row = wait(job, t0)
            if k >= warm:
                out["observed"].append((t1 - t0) * 1000)
                out["server"].append((row[1].timestamp() - wall0) * 1000)
        if isinstance(side, Taskrail) and submit_n:  # through api.submit (INSERT + enqueue)
            out["submit"] = []
            tr = side.producer()
            for k in range(submit_n + warm):
                time.sleep(gap_s)
                t0 = time.perf_counter()
                task_type = side.task_types[k % len(side.task_types)]
                task_id = tr.submit(task_type, k, {"scenario": "ok"})
                t1, _ = wait([task_id], t0)
                if k >= warm:
                    out["submit"].append((t1 - t0) * 1000)
            tr.close()
        c.close()
    finally:
        ws.stop()
    return out


def summary(xs: list[float]) -> dict[str, float]:
    """p50/p95/p99, min, max and mean of latency samples (ms)."""
    return {
        "p50": cm.pct(xs, 50),
        "p95": cm.pct(xs, 95),
        "p99": cm.pct(xs, 99),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.mean(xs),
        "n": len(xs),
    }
