"""Database access: one :class:`Database` per process wraps a pooled SQLAlchemy engine.

No connection is made when a :class:`Database` is created; the first statement opens
one. Connection failures surface as :class:`DatabaseUnavailable`, naming the host but
never the password.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, event, exc
from sqlalchemy.engine import Engine, make_url

from orchestration.errors import DatabaseUnavailable, SchemaNotReady
from orchestration.redact import redact_text


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# How long a statement waits for a free pooled connection before the database counts
# as unavailable.
POOL_TIMEOUT_S = 30.0


def _pool_exhausted(where: str, timeout_s: float) -> DatabaseUnavailable:
    return DatabaseUnavailable(where, f"no free connection in the pool after {timeout_s:g}s")


class Database:
    """A pooled engine plus the schema check. Safe to share between threads."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        pool_timeout_s: float = POOL_TIMEOUT_S,
        auto_upgrade: bool | None = None,
    ) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        # The embedded SQLite default migrates itself on first use; Postgres is
        # migrated on purpose, with `taskrail db upgrade`.
        self.auto_upgrade = self.is_sqlite if auto_upgrade is None else auto_upgrade
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # A fixed set of connections, opened once and kept. With overflow, every
            # burst of a threads worker (handlers that finish together) opened extra
            # connections and closed them on return: a new server process, a login and
            # re-prepared statements each time, hundreds per thousand tasks. A thread
            # now waits for a free connection (statements are short) instead.
            kwargs.update(
                pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout_s, pool_recycle=3600
            )
            if self.is_postgres:
                kwargs["connect_args"] = {"connect_timeout": 5}
        self.engine: Engine = create_engine(self.url, **kwargs)
        # A pool of its own for single-statement writes: switching a pooled connection
        # to autocommit and back costs round trips on every checkout.
        self.autocommit_engine: Engine = (
            create_engine(self.url, isolation_level="AUTOCOMMIT", **kwargs)
            if not self.is_sqlite
            else self.engine
        )
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        dbapi = self.engine.dialect.loaded_dbapi
        self._dbapi_errors: tuple[type[BaseException], ...] = (dbapi.Error,)
        self._dbapi_operational: tuple[type[BaseException], ...] = (
            dbapi.OperationalError,
            dbapi.InterfaceError,
        )
        self.pool_timeout_s = pool_timeout_s
        self._schema_ok = False
        self._schema_lock = threading.Lock()

    @property
    def where(self) -> str:
        """Host, port and database name for messages; never the password."""
        if self.is_sqlite:
            return f"sqlite file {self.url.database}"
        port = f":{self.url.port}" if self.url.port else ""
        return f"{self.url.host or 'localhost'}{port}/{self.url.database or ''}"

    def _unavailable(self, err: BaseException) -> DatabaseUnavailable:
        detail = redact_text(str(getattr(err, "orig", err) or err)).strip().splitlines()
        return DatabaseUnavailable(self.where, detail[0] if detail else "")

    @contextlib.contextmanager
    def connect(self, *, autocommit: bool = False) -> Iterator[Connection]:
        """A pooled connection; ``autocommit`` runs each statement as its own transaction.

        Raises DatabaseUnavailable when the server cannot be reached or drops the link.
        """
        self.ensure_schema()
        try:
            conn = (self.autocommit_engine if autocommit else self.engine).connect()
        except exc.DBAPIError as err:
            raise self._unavailable(err) from err
        except exc.TimeoutError as err:
            raise _pool_exhausted(self.where, self.pool_timeout_s) from err
        try:
            yield conn
        except exc.DBAPIError as err:
            if err.connection_invalidated or isinstance(err, exc.OperationalError):
                raise self._unavailable(err) from err
            raise
        finally:
            conn.close()

    @contextlib.contextmanager
    def driver_connection(self) -> Iterator[Any]:
        """The pooled DB-API connection itself, in autocommit mode (PostgreSQL's hot path).

        The hops' single-statement writes run here: SQLAlchemy's statement machinery
        costs more than the round trip they make. A connection that fails is dropped
        from the pool. Raises DatabaseUnavailable.
        """
        self.ensure_schema()
        try:
            fairy = self.autocommit_engine.raw_connection()
        except exc.DBAPIError as err:
            raise self._unavailable(err) from err
        except exc.TimeoutError as err:
            raise _pool_exhausted(self.where, self.pool_timeout_s) from err
        try:
            yield fairy.driver_connection
        except self._dbapi_errors as err:
            if isinstance(err, self._dbapi_operational):
                fairy.invalidate(err)
                raise self._unavailable(err) from err
            raise
        finally:
            fairy.close()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection inside one transaction, committed on success."""
        with self.connect() as conn, conn.begin():
            yield conn

    # -- schema ---------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Make sure the schema is at the newest migration (once per process).

        SQLite (the embedded default) is upgraded in place; elsewhere an old or missing
        schema raises SchemaNotReady.
        """
        if self._schema_ok:
            return
        from orchestration import migrate

        with self._schema_lock:  # the threads of a threads pool check once, not each
            if self._schema_ok:
                return
            try:
                current = migrate.is_current(self.engine)
                if not current:
                    if not self.auto_upgrade:
                        raise SchemaNotReady(self.where)
                    with self._migration_lock():
                        migrate.upgrade(self.engine)
            except exc.DBAPIError as err:
                raise self._unavailable(err) from err
            self._schema_ok = True

    def upgrade(self) -> None:
        """Apply every pending migration."""
        from orchestration import migrate

        try:
            with self._migration_lock():
                migrate.upgrade(self.engine)
        except exc.DBAPIError as err:
            raise self._unavailable(err) from err
        self._schema_ok = True

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if not (self.is_sqlite and self.url.database and self.url.database != ":memory:"):
            yield
            return
        lock_path = Path(self.url.database).with_suffix(".migrate.lock")
        with open(lock_path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.engine.dispose()
        self.autocommit_engine.dispose()
