"""Every way a driver error can leave orchestration.store.db comes out as taskrail's error.

A real PostgreSQL behind a relay the test controls (tests/relay.py): refused, dropped
(a restart), shut down by the server, plus SQLite and the pool. A raw driver error that
escaped used to bypass the hops' retry of infrastructure errors (issue 18.3).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestration.errors import (
    ConfigurationError,
    DatabaseRejected,
    DatabaseUnavailable,
    SchemaNotReady,
)
from orchestration.store.db import Database
from tests.relay import TcpRelay

pytestmark = pytest.mark.integration


@pytest.fixture
def relay(pg_url: str) -> Iterator[TcpRelay]:
    url = make_url(pg_url)
    relay = TcpRelay(url.host or "127.0.0.1", url.port or 5432)
    yield relay
    relay.close()


@pytest.fixture
def relayed_db(pg_url: str, relay: TcpRelay) -> Iterator[Database]:
    """A database reached through the relay, its schema already checked."""
    db = Database(relay.url_for(pg_url), pool_size=2, pool_timeout_s=0.5)
    db.ensure_schema()
    yield db
    db.dispose()


def _select_one(db: Database) -> int:
    with db.driver_connection() as conn:
        return int(conn.execute("SELECT 1").fetchone()[0])


# -- unreachable: DatabaseUnavailable on every path ---------------------------------------


def test_driver_connection_to_a_refusing_server_is_unavailable(
    relayed_db: Database, relay: TcpRelay
) -> None:
    # Given a pool whose connections are gone and a server that refuses new ones
    relay.refuse()
    relay.drop()
    relayed_db.autocommit_engine.pool.dispose()
    # When the hot path asks for a connection, Then taskrail's error, not psycopg's
    with pytest.raises(DatabaseUnavailable, match="refused"):
        _select_one(relayed_db)


def test_connect_and_begin_to_a_refusing_server_are_unavailable(
    relayed_db: Database, relay: TcpRelay
) -> None:
    relay.refuse()
    relay.drop()
    relayed_db.engine.pool.dispose()
    with pytest.raises(DatabaseUnavailable), relayed_db.connect() as conn:
        conn.execute(text("SELECT 1"))
    with pytest.raises(DatabaseUnavailable), relayed_db.begin() as conn:
        conn.execute(text("SELECT 1"))


def test_ensure_schema_with_the_server_down_is_unavailable(pg_url: str, relay: TcpRelay) -> None:
    relay.refuse()
    db = Database(relay.url_for(pg_url))
    try:
        with pytest.raises(DatabaseUnavailable, match="refused"):
            db.ensure_schema()
    finally:
        db.dispose()


def test_a_dropped_connection_is_unavailable_then_replaced(
    relayed_db: Database, relay: TcpRelay
) -> None:
    # Given a pooled connection, then a restart that drops it
    assert _select_one(relayed_db) == 1
    relay.drop()
    # When it is used: unavailable, and it leaves the pool
    with pytest.raises(DatabaseUnavailable):
        _select_one(relayed_db)
    # Then the next statement gets a new connection
    assert _select_one(relayed_db) == 1


def test_a_commit_on_a_dropped_connection_is_unavailable(
    relayed_db: Database, relay: TcpRelay
) -> None:
    # The connection dies inside the transaction: the error comes at COMMIT, or at the
    # rollback of a connection being closed; neither escapes raw.
    with pytest.raises(DatabaseUnavailable), relayed_db.begin() as conn:
        conn.execute(text("SELECT 1"))
        relay.drop()
    with (
        pytest.raises(DatabaseUnavailable),
        relayed_db.driver_connection() as raw,
        raw.transaction(),
    ):
        raw.execute("SELECT 1")
        relay.drop()
    assert _select_one(relayed_db) == 1


def test_a_server_shutting_the_session_down_is_unavailable(
    relayed_db: Database, pg_url: str
) -> None:
    # Given a pooled connection that the server then terminates (admin shutdown, 57P01)
    with relayed_db.driver_connection() as conn:
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
    admin = Database(pg_url)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        admin.dispose()
    with pytest.raises(DatabaseUnavailable):
        _select_one(relayed_db)
    with pytest.raises(DatabaseUnavailable), relayed_db.connect() as conn:
        # The pool of the other engine: its connection dies the same way.
        (pid,) = conn.execute(text("SELECT pg_backend_pid()")).one()
        conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    assert _select_one(relayed_db) == 1


def test_an_interface_error_is_unavailable(relayed_db: Database) -> None:
    with pytest.raises(DatabaseUnavailable), relayed_db.driver_connection() as conn:
        cur = conn.cursor()
        cur.close()
        cur.execute("SELECT 1")  # psycopg.InterfaceError: the cursor is closed


def test_a_pool_without_a_free_connection_is_unavailable(relayed_db: Database) -> None:
    held = threading.Event()
    release = threading.Event()

    def hold(n: int) -> None:
        with relayed_db.driver_connection():
            held.set()
            release.wait(5)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    held.wait(5)
    try:
        with pytest.raises(DatabaseUnavailable, match="no free connection"):
            _select_one(relayed_db)
    finally:
        release.set()
        for thread in threads:
            thread.join()


def test_pre_ping_replaces_connections_a_restart_killed(pg_url: str, relay: TcpRelay) -> None:
    # Given a producer's database (pre_ping) with two pooled connections on both engines
    db = Database(relay.url_for(pg_url), pool_size=2, pre_ping=True)
    try:
        for _ in range(2):
            with db.driver_connection(), db.driver_connection(), db.connect(), db.connect():
                pass
        # When the server restarts (every connection dropped)
        relay.drop()
        # Then no caller sees the dead connections
        for _ in range(4):
            assert _select_one(db) == 1
            with db.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        # And with the server down, the ping's reconnect fails as taskrail's error
        relay.refuse()
        relay.drop()
        with pytest.raises(DatabaseUnavailable):
            _select_one(db)
    finally:
        db.dispose()


# -- refused statements: DatabaseRejected, not an outage ----------------------------------


def test_data_errors_are_rejected_not_unavailable(relayed_db: Database) -> None:
    with (
        pytest.raises(DatabaseRejected, match="syntax") as caught,
        relayed_db.driver_connection() as conn,
    ):
        conn.execute("SELEC 1")
    assert not isinstance(caught.value, DatabaseUnavailable)
    with pytest.raises(DatabaseRejected, match="division by zero"), relayed_db.connect() as conn:
        conn.execute(text("SELECT 1 / 0"))
    with pytest.raises(DatabaseRejected, match="duplicate key"), relayed_db.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE t (id int PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1), (1)"))
    # The connection is still good: data errors do not drop it.
    assert _select_one(relayed_db) == 1


# -- SQLite and configuration -------------------------------------------------------------


def test_sqlite_errors_are_taskrail_errors(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        db.ensure_schema()
        with pytest.raises(DatabaseUnavailable, match="no such table"), db.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
        with pytest.raises(DatabaseRejected, match="UNIQUE"), db.begin() as conn:
            conn.execute(text("CREATE TEMP TABLE t (id int PRIMARY KEY)"))
            conn.execute(text("INSERT INTO t VALUES (1), (1)"))
    finally:
        db.dispose()


def test_an_unmigrated_database_is_schema_not_ready(pg_url: str) -> None:
    # the session database, seen through a name it does not have: no schema table there
    db = Database(pg_url.rsplit("/", 1)[0] + "/postgres")
    try:
        with pytest.raises(SchemaNotReady, match="taskrail db upgrade"):
            db.ensure_schema()
    finally:
        db.dispose()


@pytest.mark.parametrize(
    "url", ["not a url", "nosuchdialect://u:secret@h/db", "postgresql+nosuchdriver://h/db"]
)
def test_a_database_url_that_cannot_work_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Database(url)
    assert "secret" not in str(caught.value)


def test_a_sqlite_file_under_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match="cannot create the folder"):
        Database(f"sqlite:///{tmp_path / 'file' / 'sub' / 'x.db'}")
