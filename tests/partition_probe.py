"""Cut a PostgreSQL off the network and time how long a statement waits for it.

Run as root in a network namespace of its own (``unshare -n python -m
tests.partition_probe``): the PostgreSQL server runs in a second namespace, joined to
this one by a veth pair, so nothing touches the machine's network. The cut is a
``pfifo limit 0`` queue on the server's end of the pair: every packet the server's host
sends is lost (its replies, its acknowledgements, its answers to keepalive probes), as
in a partition between hosts. (Dropping on this side's own queue would not do: the
kernel treats a local drop as congestion and keeps probing for ever.) Prints one JSON
object of timings; tests/integration/test_timeouts.py reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from orchestration.errors import DatabaseUnavailable
from orchestration.store.db import ConnectionTimeouts, Database
from tests.support import OwnPostgres, _postgres_bindir

CLIENT_IP, SERVER_IP = "10.255.0.1", "10.255.0.2"
# Small on purpose: the test checks that statements fail within these, not the defaults.
TIMEOUTS = ConnectionTimeouts(
    connect_s=2, tcp_user_s=2.0, keepalives_idle_s=1, keepalives_interval_s=1, keepalives_count=2
)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@dataclass
class RemotePostgres(OwnPostgres):
    """An OwnPostgres in the network namespace of process ``ns_pid``, on SERVER_IP."""

    ns_pid: int = 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{SERVER_IP}:{self.port}/postgres"

    def _in_ns(self) -> list[str]:
        return ["nsenter", "-t", str(self.ns_pid), "-n"]

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [*self._in_ns(), "runuser", "-u", "postgres", "--",
               str(_postgres_bindir() / args[0]), *args[1:]]  # fmt: skip
        if args[0] == "pg_ctl" and "start" in args:
            i = cmd.index("-o") + 1
            cmd[i] = cmd[i].replace("listen_addresses=127.0.0.1", f"listen_addresses={SERVER_IP}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")
        return done

    def init(self) -> RemotePostgres:
        super().init()
        with open(self.data_dir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {CLIENT_IP}/32 trust\n")
        return self

    def cut(self) -> None:
        _sh(*self._in_ns(), "tc", "qdisc", "add", "dev", "vB", "root", "pfifo", "limit", "0")

    def heal(self) -> None:
        _sh(*self._in_ns(), "tc", "qdisc", "del", "dev", "vB", "root")


def network() -> subprocess.Popen[bytes]:
    """The server's namespace (a process holding it) joined to this one by vA <-> vB."""
    holder = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    time.sleep(0.2)
    ns = ["nsenter", "-t", str(holder.pid), "-n"]
    _sh("ip", "link", "set", "lo", "up")
    _sh("ip", "link", "add", "vA", "type", "veth", "peer", "name", "vB", "netns", str(holder.pid))
    _sh("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "vA")
    _sh("ip", "link", "set", "vA", "up")
    _sh(*ns, "ip", "link", "set", "lo", "up")
    _sh(*ns, "ip", "addr", "add", f"{SERVER_IP}/24", "dev", "vB")
    _sh(*ns, "ip", "link", "set", "vB", "up")
    return holder


def timed(db: Database, sql: str) -> dict[str, Any]:
    """Seconds until ``sql`` returned or failed, and how."""
    started = time.monotonic()
    try:
        with db.driver_connection() as conn:
            conn.execute(sql).fetchall()
        outcome = "ok"
    except DatabaseUnavailable as err:
        outcome = f"unavailable: {err}"
    except Exception as err:  # reported, and the test fails on it
        outcome = f"{type(err).__name__}: {err}"
    return {"s": round(time.monotonic() - started, 2), "outcome": outcome}


def main() -> None:
    holder = network()
    pg = RemotePostgres(ns_pid=holder.pid)
    report: dict[str, Any] = {}
    db: Database | None = None
    try:
        pg.init().start()
        db = Database(pg.url, pool_size=2, timeouts=TIMEOUTS)
        db._schema_ok = True  # a bare cluster: these statements need no taskrail schema
        report["before"] = timed(db, "SELECT 1")
        # A statement sent into the cut: its data is never acknowledged (tcp_user_timeout).
        pg.cut()
        report["sent_into_cut"] = timed(db, "SELECT 1")
        # A new connection while cut (connect_timeout).
        report["connect_into_cut"] = timed(db, "SELECT 1")
        pg.heal()
        report["after_heal"] = timed(db, "SELECT 1")
        # The request went through; the cut comes while the reply is awaited: nothing of
        # ours is unacknowledged, the keepalive probes find the link dead.
        threading.Timer(0.5, pg.cut).start()
        report["cut_while_waiting"] = timed(db, "SELECT pg_sleep(4)")
        pg.heal()
        report["after_second_heal"] = timed(db, "SELECT 1")
    finally:
        if db is not None:
            db.dispose()
        pg.destroy()
        holder.kill()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("partition_probe needs root (network namespaces)")
    main()
