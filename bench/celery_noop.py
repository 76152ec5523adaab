"""Celery's own ceiling: a no-op task, the reference's ``shared/bench/noop.py``.

Same app settings as the reference (JSON, results ignored, prefetch multiplier 16 by
default, no acks_late, task events off): each task increments a Redis counter, which
the driver polls. Differences, none inside the task: the broker and counter databases
come from BROKER and COUNTER (bench/sides.py sets them to the benchmark's own Redis
server), and the
producer/timing loop lives in ``bench/sides.py`` beside the other sides'.

The worker is ``celery -A celery_noop worker`` run from ``bench/``.
"""

import os

import redis
from celery import Celery


def _own_redis(db: int) -> str:
    """Database ``db`` of the benchmark's own Redis (BENCH_REDIS, set by bench/run)."""
    base = os.environ.get("BENCH_REDIS")
    if not base:
        raise SystemExit("set BROKER and COUNTER, or BENCH_REDIS, to the benchmark's own Redis")
    return f"{base}/{db}"


BROKER = os.environ.get("BROKER") or _own_redis(7)
COUNTER = os.environ.get("COUNTER") or _own_redis(8)
app = Celery("noop", broker=BROKER)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH", "16")),
)
r = redis.Redis.from_url(COUNTER)


@app.task(name="noop.t")
def t(i):
    r.incr("done")
