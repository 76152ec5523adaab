"""The store on an async driver: :class:`AsyncDatabase`, for code run by ``greenlet_spawn``.

The async producer API (:mod:`orchestration.api.aio`) runs the sync API's own code, the
same validation, reads, compare-and-set writes and inserts, inside SQLAlchemy's
``greenlet_spawn``: every statement that code makes on an :class:`AsyncDatabase` goes
to an async driver (psycopg's ``AsyncConnection`` on PostgreSQL, ``aiosqlite`` on the
embedded SQLite) and waits on the event loop, never in a blocking socket read. That is
the mechanism SQLAlchemy's own ``AsyncSession`` runs the ORM on: what runs between two
statements is the same Python the sync API runs, on the loop's thread.

What differs from :class:`~orchestration.store.db.Database` is where a wait happens:

- the engines are ``create_async_engine``'s (their ``sync_engine`` is what the store's
  code sees), with the same pool sizes, timeouts and SQLite pragmas;
- :meth:`AsyncDatabase.driver_connection` hands the hot path psycopg's
  ``AsyncConnection`` behind the sync ``Connection`` methods it calls
  (``execute(...).fetchone()``, ``transaction()``), each awaited on the loop;
- :meth:`AsyncDatabase.pause` sleeps with ``asyncio.sleep``;
- the schema check (once per database) runs on a sync connection in a thread, because
  Alembic and the SQLite migration lock block.

Every method that touches the database must run inside ``greenlet_spawn`` (outside it,
SQLAlchemy raises ``MissingGreenlet``); errors are translated into taskrail's exactly
as :class:`Database` does it (the async drivers raise the same driver exceptions).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_

from orchestration.errors import ConfigurationError
from orchestration.redact import redact_url
from orchestration.store.db import Database

__all__ = ["AsyncDatabase", "async_url"]

_ASYNC_DRIVERS = {"postgresql": "psycopg", "sqlite": "aiosqlite"}


def async_url(url: URL) -> URL:
    """``url`` with the async driver of its database (psycopg, aiosqlite).

    Raises ConfigurationError for a database taskrail has no async driver for.
    """
    backend = url.get_backend_name()
    driver = _ASYNC_DRIVERS.get(backend)
    if driver is None:
        raise ConfigurationError(
            f"database URL {redact_url(url.render_as_string(hide_password=False))!r}: "
            f"the async API supports {', '.join(sorted(_ASYNC_DRIVERS))}, not {backend}"
        )
    return url.set(drivername=f"{backend}+{driver}")


class _Cursor:
    """An async psycopg cursor's rows, fetched on the loop."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def fetchone(self) -> Any:
        return await_(self._cursor.fetchone())

    def fetchall(self) -> list[Any]:
        rows: list[Any] = await_(self._cursor.fetchall())
        return rows


class _Driver:
    """psycopg's ``AsyncConnection`` behind the ``Connection`` methods the store's hot
    path calls; each call awaits on the loop (inside ``greenlet_spawn``)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None) -> _Cursor:
        return _Cursor(await_(self._conn.execute(query, params, prepare=prepare)))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        block = self._conn.transaction()
        await_(block.__aenter__())
        try:
            yield
        except BaseException as err:
            if not await_(block.__aexit__(type(err), err, err.__traceback__)):
                raise
        else:
            await_(block.__aexit__(None, None, None))


class AsyncDatabase(Database):
    """A :class:`Database` whose statements wait on the event loop (see the module).

    Takes the same arguments as :class:`Database`, with the ordinary URL
    (``postgresql+psycopg://``, ``sqlite:///``): the async driver is chosen from it.
    One event loop per instance (its pooled connections belong to the loop that opened
    them). Raises ConfigurationError for a database without an async driver.
    """

    _async_engines: tuple[AsyncEngine, ...] = ()

    def _create_engines(self, kwargs: dict[str, Any]) -> tuple[Engine, Engine]:
        url = async_url(self.url)
        engine = create_async_engine(url, **kwargs)
        autocommit = (
            engine
            if self.is_sqlite
            else create_async_engine(url, isolation_level="AUTOCOMMIT", **kwargs)
        )
        self._async_engines = tuple(dict.fromkeys((engine, autocommit)))
        self._schema_wait: asyncio.Lock | None = None
        return engine.sync_engine, autocommit.sync_engine

    def pause(self, seconds: float) -> None:
        await_(asyncio.sleep(seconds))

    @contextlib.contextmanager
    def driver_connection(self) -> Iterator[Any]:
        """The pooled psycopg ``AsyncConnection`` (autocommit), seen as a sync one."""
        with super().driver_connection() as conn:
            yield _Driver(conn)

    # -- schema ---------------------------------------------------------------

    def ensure_schema(self) -> None:
        """As :meth:`Database.ensure_schema`, waited for on the loop: the check (and on
        SQLite the upgrade) runs once, on a sync connection in a thread."""
        if self._schema_ok:
            return
        await_(self._ensure_schema())

    async def _ensure_schema(self) -> None:
        if self._schema_wait is None:
            self._schema_wait = asyncio.Lock()
        async with self._schema_wait:  # one check for the coroutines that ask at once
            if not self._schema_ok:
                await asyncio.to_thread(self._check_schema)
                self._schema_ok = True

    def _check_schema(self) -> None:
        checker = Database(
            self.url.render_as_string(hide_password=False),
            pool_size=1,
            auto_upgrade=self.auto_upgrade,
            timeouts=self.timeouts,
        )
        try:
            checker.ensure_schema()
        finally:
            checker.dispose()

    def upgrade(self) -> None:
        """Apply every pending migration (on a sync connection, in a thread)."""
        await_(asyncio.to_thread(self._upgrade_sync))
        self._schema_ok = True

    def _upgrade_sync(self) -> None:
        migrator = Database(
            self.url.render_as_string(hide_password=False), pool_size=1, timeouts=self.timeouts
        )
        try:
            migrator.upgrade()
        finally:
            migrator.dispose()

    # -- closing --------------------------------------------------------------

    def dispose(self) -> None:
        """Close the pooled connections (inside ``greenlet_spawn``; else :meth:`aclose`)."""
        await_(self.aclose())

    async def aclose(self) -> None:
        """Close the pooled connections; the next statement opens new ones."""
        for engine in self._async_engines:
            await engine.dispose()
