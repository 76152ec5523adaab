"""Celery's own ceiling: a no-op task, the reference's ``shared/bench/noop.py``.

Same app settings as the reference (JSON, results ignored, prefetch multiplier 16 by
default, no acks_late, task events off): each task increments a Redis counter, which
the driver polls. Differences, none inside the task: the broker and counter databases
come from BROKER and COUNTER (bench/lifecycle.py sets the benchmark's own), and the
producer/timing loop lives in ``bench/sides.py`` beside the other sides'.

The worker is ``celery -A celery_noop worker`` run from ``bench/``.
"""

import os

import redis
from celery import Celery

BROKER = os.environ.get("BROKER", "redis://127.0.0.1:6379/7")
COUNTER = os.environ.get("COUNTER", "redis://127.0.0.1:6379/8")
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
