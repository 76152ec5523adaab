"""Producer throughput: tasks/s of ``submit`` one at a time and of ``submit_many``.

Runs on Postgres (a fresh database, migrated with ``Database(url).upgrade()``) and
the benchmark's own Redis server (``_common``), because submitting inserts the task
row and then publishes the first hop (``taskrail.assign``) to the broker. No worker
runs: the messages pile up in the broker database, which is flushed at the end.

Figures:
- ``submit``: one ``api.submit`` call per task (one INSERT transaction + one publish).
- ``submit_many``: ``api.submit_many`` with batches of --batch tasks (one multi-row INSERT
  transaction + one publish per task over one producer connection). The split into
  "insert" and "publish" time comes from a Dispatcher subclass that times send_many.
Both use payload {"scenario": "ok"} on task type personal_tax, no idempotency key,
after a short untimed warm-up (connection pools, schema check).

usage: python bench/submit.py [--single N] [--batches B] [--batch 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--single", type=int, default=1000, help="tasks submitted one at a time")
    ap.add_argument("--batches", type=int, default=10, help="number of submit_many batches")
    ap.add_argument("--batch", type=int, default=1000, help="tasks per submit_many batch")
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()

    cm.fresh_database()
    rds = cm.flush_redis(cm.REDIS_DB_SUBMIT)
    os.environ.update(
        TASKRAIL_DATABASE_URL=cm.sqlalchemy_url(),
        TASKRAIL_BROKER_URL=cm.redis_url(cm.REDIS_DB_SUBMIT),
        TASKRAIL_REDIS_URL=cm.redis_url(cm.REDIS_DB_BREAKERS),
        TASKRAIL_AGENTS="demo_agents",
        TASKRAIL_LOG_LEVEL="WARNING",
    )
    from orchestration.api import NewTask, Taskrail
    from orchestration.logging import configure_logging
    from orchestration.messaging.dispatch import Dispatcher, make_celery
    from orchestration.settings import Settings

    configure_logging("console", "WARNING")

    class TimedDispatcher(Dispatcher):
        """The real dispatcher, plus the time spent publishing in send_many."""

        publish_s = 0.0

        def send_many(self, hop, args_list):  # type: ignore[override]
            t0 = time.perf_counter()
            try:
                return super().send_many(hop, args_list)
            finally:
                self.publish_s += time.perf_counter() - t0

    settings = Settings()
    dispatcher = TimedDispatcher(make_celery(settings))
    tr = Taskrail(settings, dispatcher=dispatcher)
    payload = {"scenario": "ok"}

    for i in range(args.warmup):
        tr.submit("personal_tax", i, payload)
    tr.submit_many([NewTask("personal_tax", i, payload) for i in range(args.warmup)])

    print(
        f"# submit.py  database {cm.DB_NAME} (fresh), broker redis db {cm.REDIS_DB_SUBMIT}, "
        f"no workers; warm-up {args.warmup} + {args.warmup} tasks not counted"
    )

    # submit, one at a time
    tr.db.dispose()  # the warm-up's backends exit and report their statistics
    time.sleep(0.5)
    pg0 = cm.pg_counters()
    dispatcher.publish_s = 0.0
    t0 = time.perf_counter()
    for i in range(args.single):
        tr.submit("personal_tax", i, payload)
    dt_single = time.perf_counter() - t0
    pub_single = dispatcher.publish_s
    tr.db.dispose()  # the backends exit and report their statistics
    time.sleep(0.5)
    pg1 = cm.pg_counters()

    # submit_many, in batches
    times, pubs = [], []
    for b in range(args.batches):
        items = [NewTask("personal_tax", b * args.batch + i, payload) for i in range(args.batch)]
        dispatcher.publish_s = 0.0
        t0 = time.perf_counter()
        ids = tr.submit_many(items)
        times.append(time.perf_counter() - t0)
        pubs.append(dispatcher.publish_s)
        assert len(ids) == args.batch
    tr.db.dispose()
    time.sleep(0.5)
    pg2 = cm.pg_counters()
    queued = rds.llen("taskrail.hops")

    # Redis commands, counted apart (MONITOR slows the server down): 100 submits, 1 batch.
    mon = cm.RedisMonitor({cm.REDIS_DB_SUBMIT})
    for i in range(100):
        tr.submit("personal_tax", i, payload)
    time.sleep(0.2)  # the monitor thread has read everything
    one = sum(mon.counts.values())
    tr.submit_many([NewTask("personal_tax", i, payload) for i in range(args.batch)])
    mon.stop()
    cmds_single = one / 100
    cmds_many = (sum(mon.counts.values()) - one) / args.batch

    n_many = args.batches * args.batch
    total = sum(times)
    rate_single = args.single / dt_single
    rate_many = n_many / total
    per_batch = sorted(args.batch / t for t in times)
    ms_single = dt_single / args.single * 1000
    print(
        f"submit      one at a time : {args.single:6d} tasks in {dt_single:6.2f}s -> "
        f"{rate_single:8.0f} tasks/s  ({ms_single:.3f} ms/task, of which publish "
        f"{pub_single / args.single * 1000:.3f} ms)"
    )
    print(
        f"submit_many batches of {args.batch}: {n_many:6d} tasks in {total:6.2f}s -> "
        f"{rate_many:8.0f} tasks/s  (per batch: min {per_batch[0]:.0f}, median "
        f"{cm.median(per_batch):.0f}, max {per_batch[-1]:.0f} tasks/s)"
    )
    ins_s, pub_s = total - sum(pubs), sum(pubs)
    print(
        f"  submit_many time split  : validate+INSERT {ins_s / n_many * 1e6:.1f} us/task "
        f"({n_many / ins_s:.0f}/s alone), publish {pub_s / n_many * 1e6:.1f} us/task "
        f"({n_many / pub_s:.0f}/s alone)"
    )
    xact_single = (pg1["xact"] - pg0["xact"] - 2) / args.single  # less pg_counters' own 2
    xact_many = (pg2["xact"] - pg1["xact"] - 2) / n_many
    print(
        f"  round trips per task    : submit: Postgres {xact_single:.2f} transactions, "
        f"Redis {cmds_single:.2f} commands; submit_many: Postgres {xact_many:.4f} "
        f"transactions, Redis {cmds_many:.2f} commands"
    )
    expected = args.warmup * 2 + args.single + n_many
    print(f"  first-hop messages in the broker queue: {queued} (expected {expected})")
    verdict = {True: "MET", False: "NOT MET"}
    print(
        f"  goal submit_many >= 10,000 tasks/s (issue 3): {verdict[rate_many >= 10000]} "
        f"({rate_many / 10000:.2f}x); >= 20,000 (issue 8): {verdict[rate_many >= 20000]}"
    )

    tr.close()
    rds.flushdb()


if __name__ == "__main__":
    main()
