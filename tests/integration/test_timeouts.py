"""Connections that cannot hang: keepalives and timeouts on every client (issue 18.10).

The options reach the real clients (PostgreSQL, the broker's and the breakers' Redis),
and a statement to a PostgreSQL cut off by a partition fails within the configured
seconds (tests/partition_probe.py, in network namespaces of its own).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from orchestration.breakers import BreakerBoard
from orchestration.messaging.dispatch import celery_config, make_celery
from orchestration.settings import Settings
from orchestration.store.db import ConnectionTimeouts, Database
from tests.support import REPO

pytestmark = pytest.mark.integration


@pytest.fixture
def worker_db(pg_url: str) -> Iterator[Database]:
    settings = Settings(db_statement_timeout_s=7, db_lock_timeout_s=3, db_tcp_timeout_s=4)
    db = Database(pg_url, timeouts=ConnectionTimeouts.from_settings(settings, worker=True))
    yield db
    db.dispose()


def test_worker_connections_carry_keepalives_and_timeouts(worker_db: Database) -> None:
    with worker_db.driver_connection() as conn:
        params = conn.info.get_parameters()
        shown = conn.execute("SELECT current_setting('statement_timeout'), "
                             "current_setting('lock_timeout')").fetchone()  # fmt: skip
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == str(ConnectionTimeouts.keepalives_idle_s)
    assert params["keepalives_interval"] == str(ConnectionTimeouts.keepalives_interval_s)
    assert params["keepalives_count"] == str(ConnectionTimeouts.keepalives_count)
    assert params["tcp_user_timeout"] == "4000"
    assert params["connect_timeout"] == "5"
    assert shown == ("7s", "3s")
    with worker_db.begin() as conn:  # the other pool too
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "7s"


def test_a_long_worker_statement_is_cancelled_as_unavailable(worker_db: Database) -> None:
    from orchestration.errors import DatabaseUnavailable

    with (
        pytest.raises(DatabaseUnavailable, match="statement timeout"),
        worker_db.driver_connection() as conn,
    ):
        conn.execute("SELECT pg_sleep(10)")


def test_producer_connections_have_no_statement_timeout(pg_url: str) -> None:
    db = Database(pg_url, timeouts=ConnectionTimeouts.from_settings(Settings()), pre_ping=True)
    try:
        with db.driver_connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
            assert conn.info.get_parameters()["keepalives"] == "1"
    finally:
        db.dispose()


def test_the_url_s_own_options_are_kept(pg_url: str) -> None:
    url = pg_url + "?options=-c%20application_name%3Dmine"
    db = Database(url, timeouts=ConnectionTimeouts(statement_s=9))
    try:
        with db.driver_connection() as conn:
            row = conn.execute("SELECT current_setting('application_name'), "
                               "current_setting('statement_timeout')").fetchone()  # fmt: skip
        assert row == ("mine", "9s")
    finally:
        db.dispose()


def test_timeouts_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "TASKRAIL_DB_CONNECT_TIMEOUT_S": "3",
        "TASKRAIL_DB_TCP_TIMEOUT_S": "6.5",
        "TASKRAIL_DB_STATEMENT_TIMEOUT_S": "12",
        "TASKRAIL_DB_LOCK_TIMEOUT_S": "0",
    }.items():
        monkeypatch.setenv(name, value)
    args = ConnectionTimeouts.from_settings(Settings(), worker=True).libpq_args()
    assert args["connect_timeout"] == 3
    assert args["tcp_user_timeout"] == 6500
    assert args["options"] == "-c statement_timeout=12000"


def test_the_broker_client_gets_timeouts_and_keepalive(redis_server: str) -> None:
    settings = Settings(broker_url=f"{redis_server}/9", broker_socket_timeout_s=4)
    options = celery_config(settings)["broker_transport_options"]
    assert options["socket_timeout"] == 4
    assert options["brpop_timeout"] < options["socket_timeout"]
    app = make_celery(settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        kwargs = channel.client.connection_pool.connection_kwargs
        assert channel.brpop_timeout == options["brpop_timeout"]
        assert channel.health_check_interval == options["health_check_interval"]
    assert kwargs["socket_timeout"] == 4
    assert kwargs["socket_connect_timeout"] == 1.0
    assert kwargs["socket_keepalive"] is True
    assert kwargs["socket_keepalive_options"][socket.TCP_KEEPIDLE] > 0


def test_a_broker_socket_timeout_not_above_brpop_s_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(broker_socket_timeout_s=0.5)


def test_the_breaker_client_gets_keepalive(redis_server: str) -> None:
    board = BreakerBoard(f"{redis_server}/10")
    assert board._client is not None
    kwargs = board._client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] > 0 and kwargs["socket_connect_timeout"] > 0
    assert kwargs["socket_keepalive"] is True


def test_a_statement_to_a_partitioned_server_fails_within_the_configured_seconds() -> None:
    # Given a PostgreSQL in a network namespace of its own, reached over a veth pair,
    # and connections with a 2 s connect timeout, a 2 s TCP user timeout and keepalives
    # probing after 1 s every 1 s, 2 probes (tests/partition_probe.TIMEOUTS)
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.partition_probe"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    # When the server's host goes silent, Then every wait ends within seconds, and the
    # pool works again as soon as the network heals
    assert report["before"]["outcome"] == "ok"
    for step, limit_s in (("sent_into_cut", 2 + 2), ("connect_into_cut", 2 + 1),
                          ("cut_while_waiting", 0.5 + 1 + 2 * 1 + 2)):  # fmt: skip
        assert report[step]["outcome"].startswith("unavailable"), report
        assert report[step]["s"] <= limit_s, report
    assert report["after_heal"]["outcome"] == "ok", report
    assert report["after_second_heal"]["outcome"] == "ok", report
