"""The connection pool on a real PostgreSQL server: a fixed set of connections, kept.

A threads worker's handlers often finish together; each burst used to open extra
("overflow") connections and close them again on return.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from orchestration.errors import DatabaseUnavailable
from orchestration.store.db import Database


@pytest.fixture
def small_db(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url, pool_size=2, pool_timeout_s=0.3)
    yield db
    db.dispose()


def test_a_burst_of_threads_shares_the_pool_without_opening_more_connections(
    small_db: Database,
) -> None:
    # Given a pool of 2 and 16 threads that all write at once, again and again
    backends: set[int] = set()
    errors: list[BaseException] = []
    start = threading.Barrier(16)
    seen = threading.Lock()

    def burst() -> None:
        try:
            start.wait()
            for _ in range(10):
                with small_db.driver_connection() as conn:
                    (pid,) = conn.execute("SELECT pg_backend_pid() FROM pg_sleep(0.002)").fetchone()
                with seen:
                    backends.add(pid)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=burst) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Then every statement ran, on the pool's two server connections and no others
    assert errors == []
    assert len(backends) == 2


def test_no_free_connection_within_the_timeout_is_a_clear_database_error(
    small_db: Database,
) -> None:
    # Given both pooled connections held by someone else
    with small_db.driver_connection(), small_db.driver_connection():
        # When a third statement wants one
        began = time.monotonic()
        with (
            pytest.raises(DatabaseUnavailable, match="no free connection in the pool"),
            small_db.driver_connection(),
        ):
            pass
        # Then it gave up after the pool timeout, not at once and not forever
        assert 0.25 <= time.monotonic() - began < 5


def test_the_transactional_pool_is_fixed_too(small_db: Database) -> None:
    with (
        small_db.connect(),
        small_db.connect(),
        pytest.raises(DatabaseUnavailable, match="no free connection in the pool"),
        small_db.connect() as conn,
    ):
        conn.execute(text("SELECT 1"))
    # and once they are back, the next statement gets one
    with small_db.begin() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
