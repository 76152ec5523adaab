"""A Celery worker inside the current process, for the embedded default.

``taskrail demo`` with no servers configured runs its hops here: a WorkController
with a thread pool in a background thread, consuming the file-system broker.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from celery import Celery


@contextlib.contextmanager
def embedded_worker(
    app: Celery, concurrency: int = 4, start_timeout_s: float = 30.0
) -> Iterator[Any]:
    """Run a worker in a daemon thread until the block exits."""
    ready = threading.Event()
    worker = app.WorkController(
        pool="threads",
        concurrency=concurrency,
        hostname="embedded@localhost",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        ready_callback=lambda consumer: ready.set(),
        loglevel="WARNING",
    )
    thread = threading.Thread(target=worker.start, name="taskrail-embedded-worker", daemon=True)
    thread.start()
    if not ready.wait(start_timeout_s):
        raise RuntimeError("the embedded worker did not start")
    try:
        yield worker
    finally:
        worker.stop(in_sighandler=False)
        thread.join(15)
