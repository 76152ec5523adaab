"""Scale: a long drain, the sweeper's query over a large table, and 1 to 4 workers.

Three parts, each optional (``--skip drain,sweeper,workers``):

- **drain**: ``-n`` tasks (default 100,000; demo agents, no-op handlers) fed to
  ``--workers`` running ``--pool solo`` workers with ``submit_many``, 1,000 at a time
  whenever fewer than ``--backlog`` (5,000) are unfinished, so tasks finish at a steady
  rate. Every second the driver samples how many tasks are final and each worker's
  resident set (VmRSS). Printed:
  throughput over the 10,000 tasks after the 10,000th and over the last 10,000, and the
  workers' RSS when the 10,000th task was final and at the end. Goals (issue 8): RSS
  growth < 10%, the last window's throughput within 10% of the first's.
- **sweeper**: a table of ``--rows`` tasks (default 1,000,000: 99% final, the rest
  active, a tenth of those stuck), analysed, then ``EXPLAIN (ANALYZE, BUFFERS)`` of the
  sweeper's claim statement (the real one, ``orchestration.store.recovery``) inside a
  transaction that is rolled back, and of ``taskrail status``'s stuck count. Goal:
  claim < 50 ms.
- **workers**: throughput of ``--scaling-n`` tasks (default 3,000) with 1, 2, 3 and 4
  ``--pool solo`` worker processes, on the same 2 cores.

usage: python bench/scale.py [-n 100000] [--rows 1000000] [--skip drain]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
import psycopg
from sides import TASK_TYPES, Taskrail, fmt_tp, throughput

SWEEPER_DB = f"{cm.DB_NAME}_sweeper"
GOAL_SWEEP_MS = 50.0


def rss_mb(pid: int) -> float:
    """VmRSS: the process's resident set now (0 for a process gone)."""
    return cm.status_mb(pid, "VmRSS") or 0.0


def drain(side: Taskrail, n: int, workers: int, window: int, backlog: int) -> None:
    """Feed ``n`` tasks (submit_many, 1,000 at a time, whenever fewer than ``backlog``
    are unfinished) to running workers and sample progress and memory every second."""
    procs = cm.same_procs("solo", 1, workers)
    print(f"drain: {n} tasks on {cm.describe_procs(procs)}, at most {backlog} unfinished")
    with psycopg.connect(cm.pg_dsn(), autocommit=True) as c:
        c.execute("TRUNCATE tasks, task_events RESTART IDENTITY CASCADE")
    ws = side.start(procs)
    producer = side.producer()
    payload = side.payload(0)
    # (t, final tasks, RSS per worker, CPU seconds of all workers)
    samples: list[tuple[float, int, list[float], float]] = []
    try:
        pids = [p.pid for p in ws.procs]
        c = psycopg.connect(cm.pg_dsn(), autocommit=True)
        submitted, t0 = 0, time.perf_counter()
        next_sample = t0
        deadline = t0 + max(600.0, n / 20)
        while True:
            # unfinished tasks: the sweeper's partial index answers this at any table size
            active = c.execute(
                "SELECT count(*) FROM tasks WHERE status IN ('pending', 'assigned', 'in_progress')"
            ).fetchone()[0]
            done = submitted - active
            now = time.perf_counter()
            if now >= next_sample or done >= n:
                cpu = cm.cpu_s(ws.pids())
                samples.append((now - t0, done, [rss_mb(p) for p in pids], cpu))
                next_sample += 1.0
            if done >= n:
                break
            if submitted < n and active < backlog:
                k = min(1000, n - submitted)
                producer.submit_many(
                    [
                        side.NewTask(TASK_TYPES[i % 3], i, payload)
                        for i in range(submitted, submitted + k)
                    ]
                )
                submitted += k
                continue
            if now > deadline:
                ws.check_alive()
                raise SystemExit(f"drain: only {done}/{n} done after {deadline - t0:.0f}s")
            time.sleep(0.1)
        notes = side.check(c, n)
        c.close()
    finally:
        producer.close()
        ws.stop()

    def at(count: int) -> tuple[float, int, list[float], float]:
        return next(s for s in samples if s[1] >= count)

    def rate(lo: int, hi: int) -> float:
        a, b = at(lo), at(hi)
        return (b[1] - a[1]) / max(1e-9, b[0] - a[0])

    def cpu_ms(lo: int, hi: int) -> float:
        a, b = at(lo), at(hi)
        return (b[3] - a[3]) * 1000 / max(1, b[1] - a[1])

    total_s = samples[-1][0]
    first = rate(window, 2 * window)
    last = rate(n - window, n)
    rss_first, rss_end = sum(at(window)[2]), sum(samples[-1][2])
    growth = rss_end / rss_first - 1
    print(f"  drained {n} tasks in {total_s:.0f}s: {n / total_s:.0f} tasks/s overall")
    cpu_first, cpu_last = cpu_ms(window, 2 * window), cpu_ms(n - window, n)
    print(
        f"  throughput tasks {window}-{2 * window}: {first:.0f}/s; last {window} "
        f"({n - window}-{n}): {last:.0f}/s; ratio {last / first:.2f} (worker CPU per task "
        f"{cpu_first:.2f} -> {cpu_last:.2f} ms, {cpu_last / cpu_first:.2f}x)"
    )
    starts = range(0, n - window + 1, window)
    print(
        f"  per window of {window} tasks, in order: tasks/s "
        + " ".join(f"{rate(k, k + window):.0f}" for k in starts)
        + "; worker CPU ms/task "
        + " ".join(f"{cpu_ms(k, k + window):.2f}" for k in starts)
    )
    per = ", ".join(f"{a:.0f}->{b:.0f}" for a, b in zip(at(window)[2], samples[-1][2], strict=True))
    print(
        f"  worker RSS at task {window}: {rss_first:.0f} MB, at the end: {rss_end:.0f} MB "
        f"({growth * 100:+.1f}%; per worker {per} MB)"
    )
    for note in notes:
        print(f"  ! {note}")
    ok_rss = growth < 0.10
    ok_rate = last >= 0.9 * first
    print(f"  goal RSS growth < 10%: {'MET' if ok_rss else 'NOT MET'} ({growth * 100:+.1f}%)")
    print(
        f"  goal throughput at the end within 10% of that at {window}: "
        f"{'MET' if ok_rate else 'NOT MET'} ({last / first:.2f}x)"
    )


def sweeper(rows: int) -> None:
    from datetime import timedelta

    from sqlalchemy import text

    from orchestration.models import utcnow
    from orchestration.store.db import Database
    from orchestration.store.recovery import ACTIVE_STATUSES, _claim_sql

    print(f"sweeper: {rows} tasks in database {SWEEPER_DB}")
    cm.fresh_database(SWEEPER_DB)
    active = max(1, rows // 100)
    stuck = max(1, active // 10)
    t0 = time.perf_counter()
    with psycopg.connect(cm.pg_dsn(SWEEPER_DB), autocommit=True) as c:
        # final tasks, hours old; then active ones: most recent, a tenth stuck for minutes
        c.execute(
            "INSERT INTO tasks (client_id, task_type, status, payload, attempts, "
            "created_at, updated_at) "
            "SELECT i, 'personal_tax', (ARRAY['completed','completed','completed','failed',"
            "'escalated'])[1 + i %% 5], '{}'::jsonb, 1, now() - interval '3 hours', "
            "now() - interval '2 hours' + i * interval '1 millisecond' "
            "FROM generate_series(1, %s) i",
            (rows - active,),
        )
        c.execute(
            "INSERT INTO tasks (client_id, task_type, status, payload, attempts, "
            "created_at, updated_at) "
            "SELECT i, 'personal_tax', (ARRAY['pending','assigned','in_progress'])[1 + i %% 3], "
            "'{}'::jsonb, 0, now(), CASE WHEN i <= %s THEN now() - interval '10 minutes' "
            "ELSE now() END FROM generate_series(1, %s) i",
            (stuck, active),
        )
        c.execute("VACUUM ANALYZE tasks")
    print(
        f"  {rows - active} final, {active} active of which {stuck} stuck; built in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    db = Database(cm.sqlalchemy_url(SWEEPER_DB))
    claim = _claim_sql(True, ACTIVE_STATUSES, False)
    now = utcnow()
    params = {"now": now, "cutoff": now - timedelta(seconds=15), "batch": 500}
    summary = (
        "SELECT count(*), min(updated_at) FROM tasks WHERE status IN "
        f"({', '.join(repr(s.value) for s in ACTIVE_STATUSES)}) AND updated_at < :cutoff"
    )
    with db.engine.connect() as conn:
        queries = (("claim (sweeper pass, batch 500)", claim.element.text), ("stuck", summary))
        for label, sql in queries:
            trans = conn.begin()
            plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"), params).scalars().all()
            trans.rollback()
            ms = next(float(p.split(":")[1].split()[0]) for p in plan if p.startswith("Execution"))
            print(f"  {label}: {ms:.2f} ms")
            for p in plan:
                print(f"    {p}")
            if label.startswith("claim"):
                verdict = "MET" if ms < GOAL_SWEEP_MS else "NOT MET"
                print(f"  goal claim < {GOAL_SWEEP_MS:.0f} ms over {rows} rows: {verdict}")
    db.dispose()
    with psycopg.connect(cm.pg_dsn("postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {SWEEPER_DB}")


def scaling(side: Taskrail, n: int, upto: int) -> None:
    print(f"workers: {n} tasks with 1-{upto} --pool solo worker processes")
    base = None
    for k in range(1, upto + 1):
        r = throughput(side, cm.same_procs("solo", 1, k), n)
        base = base or r["hops_s"]
        print(fmt_tp(f"{k} worker{'s' if k > 1 else ' '}", r) + f"  x{r['hops_s'] / base:.2f}")
        for note in r["notes"]:
            print(f"  ! {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="tasks of the drain")
    ap.add_argument("--window", type=int, default=10_000, help="tasks per throughput window")
    ap.add_argument("--workers", type=int, default=2, help="solo workers of the drain")
    ap.add_argument("--backlog", type=int, default=5000, help="unfinished tasks at most")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the sweeper table")
    ap.add_argument("--scaling-n", type=int, default=3000)
    ap.add_argument("--scaling-upto", type=int, default=4)
    ap.add_argument("--skip", default="", help="comma-separated: drain, sweeper, workers")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.n < 3 * args.window:
        ap.error("-n must be at least 3 windows")

    log_dir = Path(tempfile.mkdtemp(prefix="taskrail-bench-scale-"))
    print(f"# scale.py  logs in {log_dir}")
    if "sweeper" not in skip:
        sweeper(args.rows)
    if skip >= {"drain", "workers"}:
        return
    cm.fresh_database()
    side = Taskrail(log_dir)
    if "workers" not in skip:
        scaling(side, args.scaling_n, args.scaling_upto)
    if "drain" not in skip:
        drain(side, args.n, args.workers, args.window, args.backlog)


if __name__ == "__main__":
    main()
