"""Database access: one :class:`Database` per process wraps a pooled SQLAlchemy engine.

No connection is made when a :class:`Database` is created; the first statement opens
one. Every driver and pool error (psycopg, sqlite3, SQLAlchemy's wrappers of them, a
pool timeout) is turned into taskrail's error tree in one place, :meth:`Database.translate`:
a server that cannot be reached, drops the link or shuts down is
:class:`DatabaseUnavailable` (retried by the hops); a statement the database refuses
(constraint, data, SQL) is :class:`DatabaseRejected`. Messages name the host but never
the password. PostgreSQL connections carry TCP keepalives and timeouts
(:class:`ConnectionTimeouts`), so a server or network that stops answering fails a
statement within seconds instead of hanging it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import Connection, create_engine, event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from orchestration import constants as c
from orchestration.errors import (
    ConfigurationError,
    DatabaseRejected,
    DatabaseUnavailable,
    SchemaNotReady,
    TaskrailError,
)
from orchestration.redact import redact_text, redact_url

if TYPE_CHECKING:
    from orchestration.settings import Settings


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


@dataclass(frozen=True)
class ConnectionTimeouts:
    """How long a PostgreSQL connection may wait on a server or network that stopped
    answering. ``statement_s`` and ``lock_s`` (server-side, 0: none) suit workers, whose
    statements are short; producers and operators keep them off."""

    connect_s: float = c.DB_CONNECT_TIMEOUT_S
    tcp_user_s: float = c.DB_TCP_USER_TIMEOUT_S
    keepalives_idle_s: int = c.DB_KEEPALIVES_IDLE_S
    keepalives_interval_s: int = c.DB_KEEPALIVES_INTERVAL_S
    keepalives_count: int = c.DB_KEEPALIVES_COUNT
    statement_s: float = 0.0
    lock_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, *, worker: bool = False) -> ConnectionTimeouts:
        """The operator's settings; with ``worker`` the statement and lock timeouts too."""
        return cls(
            connect_s=settings.db_connect_timeout_s,
            tcp_user_s=settings.db_tcp_timeout_s,
            statement_s=settings.db_statement_timeout_s if worker else 0.0,
            lock_s=settings.db_lock_timeout_s if worker else 0.0,
        )

    def libpq_args(self, url_options: str | None = None) -> dict[str, Any]:
        """psycopg connect arguments (libpq keywords); ``url_options``: the URL's own."""
        args: dict[str, Any] = {
            # libpq takes whole seconds and treats anything below 2 as 2.
            "connect_timeout": max(2, math.ceil(self.connect_s)),
            "keepalives": 1,
            "keepalives_idle": self.keepalives_idle_s,
            "keepalives_interval": self.keepalives_interval_s,
            "keepalives_count": self.keepalives_count,
            "tcp_user_timeout": int(self.tcp_user_s * 1000),
        }
        server = [f"-c {name}={int(seconds * 1000)}" for name, seconds in (
            ("statement_timeout", self.statement_s), ("lock_timeout", self.lock_s)
        ) if seconds > 0]  # fmt: skip
        options = " ".join(filter(None, [url_options, *server]))
        if options:
            args["options"] = options
        return args


class Database:
    """A pooled engine plus the schema check. Safe to share between threads.

    ``timeouts`` bound PostgreSQL's waits (default: :class:`ConnectionTimeouts`);
    ``pre_ping`` tests a pooled connection before handing it out (one round trip), so a
    connection killed by a server restart is replaced instead of failing its caller.
    Raises ConfigurationError for a URL that names no usable database.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 5,
        pool_timeout_s: float = POOL_TIMEOUT_S,
        auto_upgrade: bool | None = None,
        timeouts: ConnectionTimeouts | None = None,
        pre_ping: bool = False,
    ) -> None:
        try:
            self.url = make_url(url)
        except exc.ArgumentError:
            raise ConfigurationError(
                f"database URL {redact_url(str(url))!r} is not a URL SQLAlchemy understands"
            ) from None
        self.timeouts = timeouts or ConnectionTimeouts()
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        # The embedded SQLite default migrates itself on first use; Postgres is
        # migrated on purpose, with `taskrail db upgrade`.
        self.auto_upgrade = self.is_sqlite if auto_upgrade is None else auto_upgrade
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                try:
                    Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise ConfigurationError(
                        f"cannot create the folder of SQLite file {self.url.database}: "
                        f"{err.strerror or err}"
                    ) from None
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # A fixed set of connections, opened once and kept: with overflow, bursts of
            # a threads worker opened and closed extra connections (a server process, a
            # login, re-prepared statements each time). A thread waits for a free one
            # instead (docs/design.md, "Performance choices").
            kwargs.update(
                pool_size=pool_size,
                max_overflow=0,
                pool_timeout=pool_timeout_s,
                pool_recycle=3600,
                pool_pre_ping=pre_ping,
            )
            if self.is_postgres:
                options = self.url.query.get("options")
                kwargs["connect_args"] = self.timeouts.libpq_args(
                    options if isinstance(options, str) else None
                )
        self._engine_kwargs = kwargs
        try:
            self.engine, self.autocommit_engine = self._create_engines(kwargs)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as err:
            raise ConfigurationError(
                f"database URL {redact_url(str(url))!r} cannot be used: {redact_text(str(err))}"
            ) from None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        dbapi = self.engine.dialect.loaded_dbapi
        self._dbapi_errors: tuple[type[BaseException], ...] = (dbapi.Error,)
        self._dbapi_operational: tuple[type[BaseException], ...] = (
            dbapi.OperationalError,
            # aiosqlite's adapted DB-API (the async API's SQLite) names no InterfaceError.
            getattr(dbapi, "InterfaceError", dbapi.OperationalError),
        )
        self.pool_timeout_s = pool_timeout_s
        self._schema_ok = False
        self._schema_lock = threading.Lock()

    def _create_engines(self, kwargs: dict[str, Any]) -> tuple[Engine, Engine]:
        """The pooled engine, and the one for single-statement writes (the same on SQLite).

        The second is a pool of its own: switching a pooled connection to autocommit
        and back costs round trips on every checkout.
        """
        engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            return engine, engine
        return engine, create_engine(self.url, isolation_level="AUTOCOMMIT", **kwargs)

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` before trying a statement again (a lost conflict)."""
        time.sleep(seconds)

    @property
    def where(self) -> str:
        """Host, port and database name for messages; never the password."""
        if self.is_sqlite:
            return f"sqlite file {self.url.database}"
        port = f":{self.url.port}" if self.url.port else ""
        return f"{self.url.host or 'localhost'}{port}/{self.url.database or ''}"

    # -- errors -----------------------------------------------------------------

    def _detail(self, err: BaseException) -> str:
        lines = redact_text(str(getattr(err, "orig", None) or err)).strip().splitlines()
        return lines[0] if lines else type(err).__name__

    def _unavailable(self, err: BaseException) -> DatabaseUnavailable:
        return DatabaseUnavailable(self.where, self._detail(err))

    def translate(self, err: BaseException) -> TaskrailError | None:
        """taskrail's error for a driver or pool error; None for anything else.

        Unreachable, refused, dropped, shut down, timed out (OperationalError,
        InterfaceError, a socket error, a pool timeout, a connection SQLAlchemy
        invalidated): DatabaseUnavailable. Any other driver error (constraint, data,
        SQL): DatabaseRejected. taskrail's own errors and everything else: None.
        """
        if isinstance(err, TaskrailError):
            return None
        if isinstance(err, exc.TimeoutError):
            return _pool_exhausted(self.where, self.pool_timeout_s)
        orig = err.orig if isinstance(err, exc.DBAPIError) else err
        if isinstance(err, exc.DBAPIError) and (
            err.connection_invalidated or isinstance(err, exc.OperationalError | exc.InterfaceError)
        ):
            return self._unavailable(err)
        if isinstance(orig, (*self._dbapi_operational, OSError)):
            return self._unavailable(err)
        if isinstance(err, exc.DBAPIError) or isinstance(orig, self._dbapi_errors):
            return DatabaseRejected(self.where, self._detail(err))
        return None

    def _raise_translated(self, err: BaseException) -> NoReturn:
        mapped = self.translate(err)
        if mapped is None:
            raise err
        raise mapped from err

    @contextlib.contextmanager
    def translated(self) -> Iterator[None]:
        """Turn driver and pool errors raised inside into taskrail's (see translate)."""
        try:
            yield
        except BaseException as err:
            self._raise_translated(err)

    @contextlib.contextmanager
    def connect(self, *, autocommit: bool = False) -> Iterator[Connection]:
        """A pooled connection; ``autocommit`` runs each statement as its own transaction.

        Raises DatabaseUnavailable when the server cannot be reached or drops the link,
        DatabaseRejected when it refuses a statement.
        """
        self.ensure_schema()
        with self.translated():
            conn = (self.autocommit_engine if autocommit else self.engine).connect()
        try:
            yield conn
        except BaseException as err:
            # Closing may fail too on a broken link; the first error is the one to tell.
            with contextlib.suppress(Exception):
                conn.close()
            self._raise_translated(err)
        with self.translated():
            conn.close()

    @contextlib.contextmanager
    def driver_connection(self) -> Iterator[Any]:
        """The pooled DB-API connection itself, in autocommit mode (PostgreSQL's hot path).

        The hops' single-statement writes run here: SQLAlchemy's statement machinery
        costs more than the round trip they make. A connection that fails is dropped
        from the pool. Raises DatabaseUnavailable, DatabaseRejected.
        """
        self.ensure_schema()
        # Unlike Engine.connect(), raw_connection() hands on the driver's own errors.
        with self.translated():
            fairy = self.autocommit_engine.raw_connection()
        try:
            yield fairy.driver_connection
        except BaseException as err:
            mapped = self.translate(err)
            if isinstance(mapped, DatabaseUnavailable):
                fairy.invalidate(err)
            with contextlib.suppress(Exception):
                fairy.close()
            self._raise_translated(err)
        with self.translated():
            fairy.close()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection inside one transaction, committed on success (errors as connect's)."""
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
        from orchestration.store import migrate

        with self._schema_lock:  # the threads of a threads pool check once, not each
            if self._schema_ok:
                return
            with self.translated():
                current = migrate.is_current(self.engine)
                if not current:
                    if not self.auto_upgrade:
                        raise SchemaNotReady(self.where)
                    self._upgrade()
            self._schema_ok = True

    def upgrade(self) -> None:
        """Apply every pending migration. Raises DatabaseUnavailable, DatabaseRejected."""
        with self.translated():
            self._upgrade()
        self._schema_ok = True

    def _upgrade(self) -> None:
        from orchestration.store import migrate

        with self._migration_lock():
            if self.timeouts.statement_s or self.timeouts.lock_s:
                # A migration may rewrite a big table: no statement or lock timeout.
                unbounded = dataclasses.replace(self.timeouts, statement_s=0.0, lock_s=0.0)
                options = self.url.query.get("options")
                engine = create_engine(
                    self.url,
                    poolclass=NullPool,
                    connect_args=unbounded.libpq_args(
                        options if isinstance(options, str) else None
                    ),
                )
                try:
                    migrate.upgrade(engine)
                finally:
                    engine.dispose()
            else:
                migrate.upgrade(self.engine)

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
