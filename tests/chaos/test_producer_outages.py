"""A producer with a server down (issue 19.6): a bounded wait for the broker, and pooled
database connections that a PostgreSQL restart killed are replaced, not failed."""

from __future__ import annotations

import threading
import time

import pytest

from orchestration import api
from tests.support import OwnPostgres, OwnRedis

pytestmark = pytest.mark.chaos


def test_submit_with_the_broker_down_returns_within_about_a_second(
    chaos_settings, own_redis: OwnRedis
) -> None:
    # Given a producer that has published once
    api.submit("echo", 1)
    # When the broker dies
    own_redis.stop()
    # Then submit records the task and returns within about TASKRAIL_PUBLISH_MAX_WAIT_S
    started = time.monotonic()
    task_id = api.submit("echo", 2)
    waited = time.monotonic() - started
    assert waited < 2.0, f"submit waited {waited:.1f}s for a broker that is down"
    assert api.get(task_id).status == "pending"


def test_a_producer_survives_a_postgres_restart(chaos_settings, own_pg: OwnPostgres) -> None:
    # Given a producer whose pools hold several connections
    barrier = threading.Barrier(5)

    def submit_together() -> None:
        barrier.wait()
        api.history(api.submit("echo", 3))

    threads = [threading.Thread(target=submit_together) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # When PostgreSQL restarts (every connection of the pools is dead)
    own_pg.stop("fast")
    own_pg.start()
    # Then no call of the producer fails on a dead connection
    for n in range(12):
        task_id = api.submit("echo", 100 + n)
        assert api.get(task_id).client_id == 100 + n
        assert api.history(task_id) is not None
