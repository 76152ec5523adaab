"""taskrail's lifecycle against a hand-written Celery baseline, side by side in one run.

Both run on the same Postgres (a fresh database, bench_taskrail) and the same Redis
server (a database number each), with the same worker pool and process count
(default: one ``celery worker -P prefork -c 2``, flags as in the shared reference:
``-l warning --without-gossip --without-mingle --without-heartbeat``).

- baseline: ``bench/baseline_lifecycle.py`` (= shared/bench/naive_lifecycle.py): 3 plain
  Celery tasks, each a compare-and-set UPDATE + enqueue of the next one.
- taskrail: ``celery -A workers worker`` from the repository root, demo agents, payload
  {"scenario": "ok"} (task types personal_tax/payroll/bookkeeping in turn), so every task
  completes in 3 hops: taskrail.assign, taskrail.start, taskrail.execute.

Throughput (N tasks, default 3000): the rows are inserted first (baseline: the
reference's INSERT ... generate_series; taskrail: ``Taskrail.submit_many`` with a
dispatcher that holds the first-hop messages back), then the clock starts, every
first hop is enqueued (baseline: ``assign.delay(id)`` per task as in the reference;
taskrail: ``Dispatcher.send_many("taskrail.assign", ...)``, what submit_many does
after its INSERT), and the clock stops when a poll (every 50 ms, like the reference)
sees all N rows final. The enqueue rate is printed on its own. This is the
reference's method; the producer's INSERT cost is measured by bench/submit.py.

Latency (idle, freshly started workers, one task at a time after a 50 ms gap, 10
warm-up tasks dropped, 200 samples, 1 ms polling; latency_naive.py's method):
"observed" = from just before the first hop is enqueued until a poll sees
'completed'; "server" = the row's updated_at written by the last hop minus the
wall-clock enqueue time. For taskrail also "submit": from just before ``api.submit()``
(which adds the INSERT transaction) until a poll sees 'completed' (100 samples).

Round trips: one more, untimed run of 300 tasks per side with fresh workers. Redis
commands are counted with MONITOR, keeping only the side's own database numbers (so
other clients of a shared Redis server do not count; commands run inside Lua
scripts are shown apart). Postgres: transactions (pg_stat_database xact_commit +
xact_rollback of the benchmark database; worker statements are autocommit, so one
transaction is one round trip) and tuple writes (pg_stat_user_tables), read after
the workers exited, less the driver's own queries.

Memory: peak RSS (VmHWM) of every worker process (main + pool children) at the end of
the throughput run. CPU: utime+stime of the worker processes over the throughput run,
split into the main process (broker I/O, acks, events, feeding the pool) and the pool.

usage: python bench/lifecycle.py [-n 3000] [--rounds 1] [--pool prefork] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
import psycopg

FINAL = ("completed", "failed", "escalated")
TASK_TYPES = ("personal_tax", "payroll", "bookkeeping")
PAYLOAD = {"scenario": "ok"}

# The driver's environment for both sides (set before importing either app).
TASKRAIL_ENV = {
    "TASKRAIL_DATABASE_URL": cm.sqlalchemy_url(),
    "TASKRAIL_BROKER_URL": cm.redis_url(cm.REDIS_DB_TASKRAIL),
    "TASKRAIL_REDIS_URL": cm.redis_url(cm.REDIS_DB_BREAKERS),
    "TASKRAIL_AGENTS": "demo_agents",
    "TASKRAIL_LOG_FORMAT": "json",
}
BASELINE_ENV = {"BROKER": cm.redis_url(cm.REDIS_DB_BASELINE), "DSN": cm.pg_dsn(), "PREFETCH": "4"}


def machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def idle_sample(rds, seconds: float = 1.0) -> tuple[float, float]:
    """Redis commands/s (server-wide) and machine CPU busy (0..1) while nothing of ours runs."""
    a, busy0 = int(rds.info("stats")["total_commands_processed"]), machine_busy()
    time.sleep(seconds)
    b, busy1 = int(rds.info("stats")["total_commands_processed"]), machine_busy()
    return (b - a - 1) / seconds, (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])


class Side:
    """What differs between taskrail and the baseline: app, worker command, rows, enqueue."""

    name = ""
    status_table = ""
    redis_dbs: set[int] = set()

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir

    def start_workers(self) -> cm.WorkerSet:
        raise NotImplementedError

    def prepare(self, n: int) -> list:
        """Fresh rows (and broker db); returns the first-hop jobs to enqueue."""
        raise NotImplementedError

    def enqueue_all(self, jobs: list) -> None:
        raise NotImplementedError

    def enqueue_one(self, job) -> None:
        raise NotImplementedError

    def check(self, c: psycopg.Connection, n: int) -> list[str]:
        """Every task completed (and, for taskrail, one event per transition)."""
        states = dict(
            c.execute(
                f"SELECT status, count(*) FROM {self.status_table} GROUP BY status"
            ).fetchall()
        )
        if states.get("completed", 0) != n:
            return [f"final states {states}, expected {n} completed"]
        return []


class Baseline(Side):
    name = "baseline"
    status_table = "bench_task"
    redis_dbs = {cm.REDIS_DB_BASELINE}

    def __init__(self, args, log_dir):
        super().__init__(args, log_dir)
        import baseline_lifecycle as bl

        self.bl = bl
        self.rds = cm.flush_redis(cm.REDIS_DB_BASELINE)

    def start_workers(self) -> cm.WorkerSet:
        self.rds.flushdb()
        env = {**os.environ, **BASELINE_ENV}
        ws = cm.start_workers(
            "baseline",
            "baseline_lifecycle",
            cm.BENCH,
            env,
            self.args.pool,
            self.args.concurrency,
            self.args.workers,
            self.log_dir,
        )
        cm.wait_ready(ws, self.bl.app)
        return ws

    def prepare(self, n: int) -> list:
        with psycopg.connect(cm.pg_dsn(), autocommit=True) as c:
            ids = self.bl.create_rows(c, n)
        return ids

    def enqueue_all(self, jobs: list) -> None:
        for i in jobs:  # the reference's loop
            self.bl.assign.delay(i)

    def enqueue_one(self, job) -> None:
        self.bl.assign.delay(job)


class Taskrail(Side):
    name = "taskrail"
    status_table = "tasks"
    redis_dbs = {cm.REDIS_DB_TASKRAIL, cm.REDIS_DB_BREAKERS}

    def __init__(self, args, log_dir):
        super().__init__(args, log_dir)
        os.environ.update(
            TASKRAIL_ENV, TASKRAIL_LOG_LEVEL="WARNING", TASKRAIL_DATA_DIR=str(log_dir / "data")
        )
        from orchestration import constants as c
        from orchestration.api import NewTask
        from orchestration.api import Taskrail as Client
        from orchestration.dispatch import Dispatcher, make_celery
        from orchestration.logging import configure_logging
        from orchestration.settings import Settings

        class HeldBack(Dispatcher):
            """Keeps the first-hop messages submit_many would send, to send them later."""

            def __init__(self) -> None:
                self.held: list[tuple[str, list]] = []

            def send_many(self, hop, args_list):  # type: ignore[override]
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

    def start_workers(self) -> cm.WorkerSet:
        self.rds.flushdb()
        cm.flush_redis(cm.REDIS_DB_BREAKERS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
        env.update(
            TASKRAIL_ENV,
            TASKRAIL_LOG_LEVEL=self.args.taskrail_log_level,
            TASKRAIL_DATA_DIR=str(self.log_dir / "data"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(cm.REPO), os.environ.get("PYTHONPATH")])),
        )
        ws = cm.start_workers(
            "taskrail",
            self.args.taskrail_app,
            cm.REPO,
            env,
            self.args.pool,
            self.args.concurrency,
            self.args.workers,
            self.log_dir,
        )
        cm.wait_ready(ws, self.app)
        return ws

    def producer(self, dispatcher=None):
        return self.Client(self.settings, dispatcher=dispatcher)

    def prepare(self, n: int) -> list:
        with psycopg.connect(cm.pg_dsn(), autocommit=True) as c:
            c.execute("TRUNCATE tasks, task_events RESTART IDENTITY CASCADE")
        held = self.held_back()
        tr = self.producer(held)
        for b in range(0, n, 1000):
            tr.submit_many(
                [self.NewTask(TASK_TYPES[i % 3], i, PAYLOAD) for i in range(b, min(n, b + 1000))]
            )
        tr.close()
        assert len(held.held) == n and all(h == self.c.HOP_ASSIGN for h, _ in held.held)
        return [a for _, a in held.held]

    def enqueue_all(self, jobs: list) -> None:
        self.dispatcher.send_many(self.c.HOP_ASSIGN, jobs)

    def enqueue_one(self, job) -> None:
        self.dispatcher.send(self.c.HOP_ASSIGN, job)

    def check(self, c, n):
        notes = super().check(c, n)
        events = c.execute("SELECT count(*) FROM task_events").fetchone()[0]
        if events != 3 * n:
            notes.append(f"task_events has {events} rows, expected {3 * n}")
        return notes


def throughput(side: Side, n: int, poll_s: float) -> dict:
    ws = side.start_workers()
    try:
        jobs = side.prepare(n)
        idle_redis, idle_busy = idle_sample(side.rds)
        mains = [p.pid for p in ws.procs]
        kids = [p for p in ws.pids() if p not in mains]
        cpu0, kcpu0, busy0 = cm.cpu_s(mains), cm.cpu_s(kids), machine_busy()
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)
        t0 = time.perf_counter()
        side.enqueue_all(jobs)
        t_enq = time.perf_counter() - t0
        wait_final(side, c, n, t0, poll_s, ws)
        dt = time.perf_counter() - t0
        cpu1, kcpu1, busy1 = cm.cpu_s(mains), cm.cpu_s(kids), machine_busy()
        rss = ws.rss()
        notes = side.check(c, n)
        c.close()
    finally:
        ws.stop()
    return {
        "tasks_s": n / dt,
        "hops_s": 3 * n / dt,
        "dt": dt,
        "enq_s": n / t_enq,
        "cpu_ms_hop": (cpu1 - cpu0 + kcpu1 - kcpu0) * 1000 / (3 * n),
        "main_cpu_ms_hop": (cpu1 - cpu0) * 1000 / (3 * n),
        "kids_cpu_ms_hop": (kcpu1 - kcpu0) * 1000 / (3 * n),
        "busy": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        "redis_idle": idle_redis,
        "idle_busy": idle_busy,
        "rss_sum": rss["sum"],
        "rss_max": rss["max"],
        "nproc": rss["n"],
        "notes": notes,
    }


def wait_final(side: Side, c: psycopg.Connection, n: int, t0: float, poll_s: float, ws) -> int:
    """Poll until all n rows are final (the reference's loop); returns the number of polls."""
    q = f"SELECT count(*) FROM {side.status_table} WHERE status = ANY(%s)"
    deadline = t0 + max(120.0, n / 10)
    polls = 0
    while True:
        done = c.execute(q, (list(FINAL),)).fetchone()[0]
        polls += 1
        if done >= n:
            return polls
        if time.perf_counter() > deadline:
            ws.check_alive()
            raise SystemExit(f"{side.name}: only {done}/{n} tasks final after {deadline - t0:.0f}s")
        time.sleep(poll_s)


def round_trips(side: Side, n: int) -> dict:
    """An untimed run of n tasks, counting Redis commands (MONITOR, the side's databases only)
    and Postgres transactions and tuple writes (the benchmark database) per hop."""
    ws = side.start_workers()
    try:
        jobs = side.prepare(n)
        time.sleep(1.2)  # the producer's backends have exited and reported
        pg0 = cm.pg_counters()  # 2 statements, reported when this connection closes
        mon = cm.RedisMonitor(side.redis_dbs)
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)
        t0 = time.perf_counter()
        side.enqueue_all(jobs)
        polls = wait_final(side, c, n, t0, 0.05, ws)
        c.close()
    finally:
        ws.stop()
    mon.stop()
    time.sleep(0.6)  # exited backends report their statistics
    pg1 = cm.pg_counters()
    hops = 3 * n
    return {
        "pg_xact_hop": (pg1["xact"] - pg0["xact"] - polls - 2) / hops,
        "pg_upd_hop": (pg1["upd"] - pg0["upd"]) / hops,
        "pg_ins_hop": (pg1["ins"] - pg0["ins"]) / hops,
        "redis_hop": sum(mon.counts.values()) / hops,
        "redis_cmds": sorted(((k, v / hops) for k, v in mon.counts.items()), key=lambda kv: -kv[1]),
        "redis_lua_hop": sum(mon.lua.values()) / hops,
    }


def latency(side: Side, n: int, warm: int, gap_s: float, poll_s: float, submit_n: int) -> dict:
    ws = side.start_workers()
    out: dict[str, list[float]] = {"observed": [], "server": []}
    try:
        jobs = side.prepare(n + warm)
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)
        q = f"SELECT status, updated_at FROM {side.status_table} WHERE id = %s"

        def wait(task_id, t0):
            deadline = t0 + 30
            while True:
                row = c.execute(q, (task_id,)).fetchone()
                if row[0] == "completed":
                    return time.perf_counter(), row
                if row[0] in FINAL or time.perf_counter() > deadline:
                    raise SystemExit(f"{side.name}: task {task_id} is {row[0]} (latency run)")
                time.sleep(poll_s)

        for k, job in enumerate(jobs):
            time.sleep(gap_s)
            wall0, t0 = time.time(), time.perf_counter()
            side.enqueue_one(job)
            t1, row = wait(job if isinstance(job, int) else job[0], t0)
            if k >= warm:
                out["observed"].append((t1 - t0) * 1000)
                out["server"].append((row[1].timestamp() - wall0) * 1000)
        if isinstance(side, Taskrail) and submit_n:  # through api.submit (INSERT + enqueue)
            out["submit"] = []
            tr = side.producer()
            for k in range(submit_n + warm):
                time.sleep(gap_s)
                t0 = time.perf_counter()
                task_id = tr.submit(TASK_TYPES[k % 3], k, PAYLOAD)
                t1, _ = wait(task_id, t0)
                if k >= warm:
                    out["submit"].append((t1 - t0) * 1000)
            tr.close()
        c.close()
    finally:
        ws.stop()
    return {
        name: {
            "p50": cm.pct(xs, 50),
            "p95": cm.pct(xs, 95),
            "p99": cm.pct(xs, 99),
            "min": min(xs),
            "max": max(xs),
            "mean": statistics.mean(xs),
        }
        for name, xs in out.items()
    }


def fmt_tp(name: str, r: dict) -> str:
    return (
        f"  {name:9s} {r['tasks_s']:7.0f} tasks/s {r['hops_s']:7.0f} hops/s  ({r['dt']:.2f}s; "
        f"enqueue {r['enq_s']:.0f}/s; worker CPU/hop {r['main_cpu_ms_hop']:.2f} ms main + "
        f"{r['kids_cpu_ms_hop']:.2f} ms pool; machine busy "
        f"{r['busy'] * 100:.0f}%, {r['idle_busy'] * 100:.0f}% just before)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3000, help="tasks per throughput run")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians printed)")
    ap.add_argument("--pool", default="prefork", help="celery worker -P for both sides")
    ap.add_argument("--concurrency", type=int, default=2, help="celery worker -c for both sides")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker instances per side (e.g. --pool solo --workers 2)",
    )
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--latency-warmup", type=int, default=10)
    ap.add_argument("--gap-ms", type=float, default=50.0)
    ap.add_argument(
        "--submit-latency-n",
        type=int,
        default=100,
        help="samples of taskrail's api.submit()->completed latency (0: skip)",
    )
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument(
        "--count-n",
        type=int,
        default=300,
        help="tasks of the untimed run that counts round trips (0: skip)",
    )
    ap.add_argument(
        "--taskrail-log-level",
        default="INFO",
        help="TASKRAIL_LOG_LEVEL of the taskrail workers (default INFO: the product's default)",
    )
    ap.add_argument(
        "--taskrail-app",
        default="workers",
        help="celery -A module for taskrail's workers (diagnostics: a module that imports "
        "workers and changes its app; default: workers)",
    )
    ap.add_argument(
        "--log-dir", default=None, help="worker logs (default: a new temporary directory)"
    )
    args = ap.parse_args()

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="taskrail_bench_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(BASELINE_ENV)
    cm.fresh_database()
    sides = [Baseline(args, log_dir), Taskrail(args, log_dir)]
    procs = f"-P {args.pool} -c {args.concurrency}" + (
        f" x{args.workers} instances" if args.workers > 1 else ""
    )
    print(
        f"# lifecycle.py  N={args.n} tasks (x3 hops), rounds={args.rounds}, "
        f"workers {procs} per side, taskrail log level {args.taskrail_log_level}; "
        f"Postgres db {cm.DB_NAME} (fresh), Redis dbs baseline {cm.REDIS_DB_BASELINE} / "
        f"taskrail {cm.REDIS_DB_TASKRAIL} (+{cm.REDIS_DB_BREAKERS} breakers); "
        f"worker logs in {log_dir}"
    )

    tp: dict[str, list[dict]] = {s.name: [] for s in sides}
    lat: dict[str, list[dict]] = {s.name: [] for s in sides}
    for r in range(1, args.rounds + 1):
        print(
            f"## round {r}/{args.rounds}  {time.strftime('%H:%M:%S')}  load {loadavg()}", flush=True
        )
        for side in sides:
            res = throughput(side, args.n, 0.05)
            tp[side.name].append(res)
            print(fmt_tp(side.name, res), flush=True)
            for note in res["notes"]:
                print(f"    WARNING {side.name}: {note}")
        b, t = tp["baseline"][-1], tp["taskrail"][-1]
        print(f"  ratio taskrail/baseline hops/s: {t['hops_s'] / b['hops_s']:.2f}", flush=True)
        if not args.no_latency:
            for side in sides:
                res = latency(
                    side,
                    args.latency_n,
                    args.latency_warmup,
                    args.gap_ms / 1000,
                    0.001,
                    args.submit_latency_n,
                )
                lat[side.name].append(res)
                for kind, v in res.items():
                    print(
                        f"  latency {side.name:8s} {kind:8s} p50 {v['p50']:6.2f}  "
                        f"p95 {v['p95']:6.2f}  p99 {v['p99']:6.2f}  "
                        f"(min {v['min']:.2f} max {v['max']:.2f}) ms",
                        flush=True,
                    )
    rt: dict[str, dict] = {}
    if args.count_n:
        print(
            f"## round trips: one untimed run of {args.count_n} tasks per side (Redis MONITOR on)",
            flush=True,
        )
        for side in sides:
            rt[side.name] = round_trips(side, args.count_n)

    med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
    b, t = tp["baseline"], tp["taskrail"]
    print()
    print(
        f"== summary (median of {args.rounds} round{'s' if args.rounds > 1 else ''}; N={args.n}, "
        f"{procs} per side) =="
    )
    print(f"{'':34s}{'baseline':>12s}{'taskrail':>12s}{'ratio':>8s}")
    rows = [
        ("tasks/s", "tasks_s", "{:12.0f}"),
        ("hops/s", "hops_s", "{:12.0f}"),
        ("enqueue of first hops, msgs/s", "enq_s", "{:12.0f}"),
        ("worker CPU per hop, ms", "cpu_ms_hop", "{:12.2f}"),
        ("  of which main process", "main_cpu_ms_hop", "{:12.2f}"),
        ("  of which pool (children)", "kids_cpu_ms_hop", "{:12.2f}"),
        ("worker peak RSS, sum, MB", "rss_sum", "{:12.1f}"),
        ("worker peak RSS, largest proc, MB", "rss_max", "{:12.1f}"),
    ]
    for label, key, f in rows:
        bv, tv = med(b, key), med(t, key)
        print(f"{label:34s}{f.format(bv)}{f.format(tv)}{tv / bv if bv else float('nan'):8.2f}")
    print(f"{'worker processes (main + children)':34s}{b[-1]['nproc']:12d}{t[-1]['nproc']:12d}")
    if rt:
        for label, key in (
            ("Postgres transactions per hop", "pg_xact_hop"),
            ("Postgres tuples updated per hop", "pg_upd_hop"),
            ("Postgres tuples inserted per hop", "pg_ins_hop"),
            ("Redis commands per hop", "redis_hop"),
            ("  (+ inside Lua scripts)", "redis_lua_hop"),
        ):
            bv, tv = rt["baseline"][key], rt["taskrail"][key]
            print(f"{label:34s}{bv:12.2f}{tv:12.2f}{tv / bv if bv else float('nan'):8.2f}")
        for name, r in rt.items():
            print(
                f"Redis commands per hop, {name}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["redis_cmds"])
            )
    before = max(x["idle_busy"] for x in b + t)
    warn = (
        "  <- other processes were using the CPU: absolute figures are low" if before > 0.1 else ""
    )
    print(
        "machine CPU busy in the second before each run (2 cores, our workers idle): "
        f"up to {before * 100:.0f}%{warn}"
    )
    ratio = med(t, "hops_s") / med(b, "hops_s")
    verdict = {True: "MET", False: "NOT MET"}
    print(
        f"ratio taskrail/baseline hops/s: {ratio:.2f}  (goal >= 0.8: {verdict[ratio >= 0.8]}; "
        f"issue 8 goal >= 1.0: {verdict[ratio >= 1.0]})"
    )
    if not args.no_latency:
        print(
            "latency submit->completed, ms (idle workers, 1 task at a time, "
            f"{args.latency_n} samples after {args.latency_warmup} warm-up, "
            f"{args.gap_ms:g} ms gap):"
        )
        for name in ("baseline", "taskrail"):
            for kind in lat[name][0]:
                vals = {
                    p: statistics.median(x[kind][p] for x in lat[name])
                    for p in ("p50", "p95", "p99")
                }
                print(
                    f"  {name:8s} {kind:8s} p50 {vals['p50']:6.2f}  p95 {vals['p95']:6.2f}  "
                    f"p99 {vals['p99']:6.2f}"
                )
        for p, goal in (("p50", 1.2), ("p99", 1.5)):
            bv = statistics.median(x["observed"][p] for x in lat["baseline"])
            tv = statistics.median(x["observed"][p] for x in lat["taskrail"])
            print(
                f"  ratio taskrail/baseline observed {p}: {tv / bv:.2f} (issue 8 goal <= {goal}: "
                f"{'MET' if tv / bv <= goal else 'NOT MET'})"
            )


if __name__ == "__main__":
    main()
