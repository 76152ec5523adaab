"""Hand-written baseline: the lifecycle a user would write with plain Celery + SQL.

Equivalent to ``shared/bench/naive_lifecycle.py`` (the reference): each step is a
Celery task that does a compare-and-set UPDATE on the task row (autocommit) and
enqueues the next step: assign -> start -> complete (3 hops per task). No state
machine, no audit row, no breaker, no lease: the floor taskrail's overhead is
measured against. Same Celery settings as the reference: JSON, acks_late,
prefetch multiplier 4 (PREFETCH), results ignored.

Deliberate differences from the reference, none of which touches a hop:
- BROKER and DSN default to database 6 of the benchmark's own Redis server
  (BENCH_REDIS) and the Postgres database bench_taskrail instead of redis db 15 of
  the shared server and the ``postgres`` database; ``bench/lifecycle.py`` sets both
  explicitly anyway.
- WORK_MS (default 0) makes ``complete`` sleep that long before its update: the I/O
  workload of bench/io.py, a handler waiting on an outside call. 0 leaves the
  reference's task as it is.
- The producer side (create the table, insert the rows, time the run, poll) lives in
  ``bench/lifecycle.py`` so taskrail and this baseline share one driver; the table,
  the INSERT and the timing (first enqueue until all rows read 'completed', polling
  every 50 ms) are the reference's. ``produce()`` below is kept for running this
  file on its own, as the reference allows (``python baseline_lifecycle.py N``).

The worker is ``celery -A baseline_lifecycle worker`` run from ``bench/``.
"""

import os
import sys
import time

import psycopg
from celery import Celery


def _own_redis(db: int) -> str:
    """Database ``db`` of the benchmark's own Redis (BENCH_REDIS, set by bench/run)."""
    base = os.environ.get("BENCH_REDIS")
    if not base:
        raise SystemExit("set BROKER or BENCH_REDIS to a Redis of the benchmark's own")
    return f"{base}/{db}"


BROKER = os.environ.get("BROKER") or _own_redis(6)
DSN = os.environ.get("DSN", "postgresql://postgres@127.0.0.1:5432/bench_taskrail")
app = Celery("naive", broker=BROKER)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH", "4")),
    task_acks_late=True,
)

TABLE_DDL = (
    "CREATE TABLE bench_task (id bigserial primary key, status text not null, "
    "updated_at timestamptz default now())"
)

WORK_S = float(os.environ.get("WORK_MS", "0")) / 1000.0

_conn = None


def conn():
    global _conn
    if _conn is None:
        _conn = psycopg.connect(DSN, autocommit=True)
    return _conn


def cas(task_id, frm, to):
    cur = conn().execute(
        "UPDATE bench_task SET status=%s, updated_at=now() WHERE id=%s AND status=%s",
        (to, task_id, frm),
    )
    return cur.rowcount == 1


@app.task(name="naive.assign")
def assign(task_id):
    if cas(task_id, "pending", "assigned"):
        start.delay(task_id)


@app.task(name="naive.start")
def start(task_id):
    if cas(task_id, "assigned", "in_progress"):
        complete.delay(task_id)


@app.task(name="naive.complete")
def complete(task_id):
    if WORK_S:
        time.sleep(WORK_S)
    cas(task_id, "in_progress", "completed")


def create_rows(c, n):
    """The reference's table and rows: drop, create, insert n pending rows; returns their ids."""
    c.execute("DROP TABLE IF EXISTS bench_task")
    c.execute(TABLE_DDL)
    return [
        r[0]
        for r in c.execute(
            "INSERT INTO bench_task(status) SELECT 'pending' "
            "FROM generate_series(1,%s) RETURNING id",
            (n,),
        )
    ]


def produce(n):
    c = psycopg.connect(DSN, autocommit=True)
    ids = create_rows(c, n)
    t0 = time.perf_counter()
    for i in ids:
        assign.delay(i)
    t_enq = time.perf_counter() - t0
    while True:
        done = c.execute("SELECT count(*) FROM bench_task WHERE status='completed'").fetchone()[0]
        if done >= n:
            break
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    print(
        f"naive: {n} tasks x 3 hops in {dt:.2f}s -> {n / dt:.0f} tasks/s, "
        f"{3 * n / dt:.0f} hops/s (enqueue {n / t_enq:.0f}/s)"
    )


if __name__ == "__main__":
    produce(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
