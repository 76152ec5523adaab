"""The producer API as coroutines, for asyncio applications (FastAPI and the like).

::

    from orchestration.api import aio

    task_id = await aio.submit("personal_tax", client_id=42, payload={"year": 2025})
    (await aio.get(task_id)).status
    await aio.history(task_id)
    await aio.claim(task_id, by="ana")

    async with aio.AsyncTaskrail(settings) as trail:   # a handle of one's own
        ids = await trail.submit_many([aio.NewTask("payroll", 7)])

Every call is the sync :class:`~orchestration.api.Taskrail`'s own: the same validation,
the same one-line :class:`~orchestration.errors.TaskrailError` for the same bad input
(nothing written), the same reads, compare-and-set writes and audit events (actor,
note, worker "api"), the same records. It runs inside SQLAlchemy's ``greenlet_spawn``
on an :class:`~orchestration.store.aio.AsyncDatabase`, so each statement waits on the
event loop through an async driver (psycopg's async connection on PostgreSQL,
``aiosqlite`` on the embedded SQLite): the loop keeps serving other coroutines while a
call waits for the database or the broker. What runs between two waits is the sync
API's Python, on the loop's thread, as any coroutine's code does.

First hops go out through :class:`~orchestration.messaging.aiodispatch.AsyncDispatcher`:
``redis.asyncio`` on a Redis broker (the very messages the sync API pushes); the
embedded file-system broker and AMQP have no async publisher, so there the sync one
publishes in a thread (``asyncio.to_thread``). A broker that is down leaves submitted
tasks pending for the sweeper, as the sync API does.

A handle belongs to one event loop (its pooled connections do): the module functions
use one :class:`AsyncTaskrail` per running loop, built from the ``TASKRAIL_*``
environment on first use (:func:`client`); ``await aio.reset_client()`` closes the
running loop's (an application's shutdown, e.g. FastAPI's lifespan). A ``progress``
callback of :meth:`AsyncTaskrail.retry_many` runs on the loop: keep it short.

Cancelling a coroutine that awaits a call (a client that went away, a timeout) answers
it with ``CancelledError`` at once; the call itself runs to its end in the background,
as it would have, so a move is written whole or not at all, and :meth:`aclose` waits
for it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, Unpack

from sqlalchemy.util import await_, greenlet_spawn

from orchestration import constants as c
from orchestration.api.base import producer_database
from orchestration.api.bulk import BulkResult, Progress
from orchestration.api.client import NewTask, Taskrail
from orchestration.filters import BulkFilterFields, FilterFields, TaskFilter
from orchestration.messaging.aiodispatch import AsyncDispatcher
from orchestration.settings import Settings, get_settings
from orchestration.store.aio import AsyncDatabase
from orchestration.store.records import EventRecord, TaskRecord

__all__ = [
    "AsyncTaskrail",
    "BulkResult",
    "NewTask",
    "cancel",
    "cancel_many",
    "claim",
    "client",
    "get",
    "history",
    "inbox",
    "list_tasks",
    "reject",
    "reopen",
    "reset_client",
    "resolve",
    "retry",
    "retry_many",
    "submit",
    "submit_many",
    "unclaim",
]

T = TypeVar("T")


class _LoopHops:
    """The sync API's hop sender, sending through an AsyncDispatcher on the loop."""

    def __init__(self, dispatcher: AsyncDispatcher) -> None:
        self._dispatcher = dispatcher

    def send_many(self, hop: str, args_list: Iterable[Sequence[Any]]) -> int:
        return await_(self._dispatcher.send_many(hop, list(args_list)))


class AsyncTaskrail:
    """A producer's handle on one database and one broker, for one event loop.

    ``AsyncTaskrail(settings=None, *, db=None, dispatcher=None)``: the settings default
    to the ``TASKRAIL_*`` environment, the database (an
    :class:`~orchestration.store.aio.AsyncDatabase`) and the broker (an
    :class:`~orchestration.messaging.aiodispatch.AsyncDispatcher`) to the settings'
    own. Nothing is connected until the first call. Use it as ``async with``, or call
    :meth:`aclose`. Each method does and raises what :class:`Taskrail`'s of the same
    name does.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        db: AsyncDatabase | None = None,
        dispatcher: AsyncDispatcher | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.db = db or producer_database(self.settings, AsyncDatabase)
        self.dispatcher = dispatcher or AsyncDispatcher(self.settings)
        self._trail = Taskrail(
            self.settings,
            db=self.db,
            dispatcher=self.dispatcher.sync,
            hops=_LoopHops(self.dispatcher),
        )
        self._calls: set[asyncio.Future[Any]] = set()

    async def __aenter__(self) -> AsyncTaskrail:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the calls still running (those whose callers were cancelled), then
        close the pooled database connections and the broker client."""
        while self._calls:
            await asyncio.wait(list(self._calls))
        await self.db.aclose()
        await self.dispatcher.aclose()

    async def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``method`` of the sync API, its waits on the loop.

        The call runs as a task of its own, shielded: cancelling the caller answers it
        with CancelledError at once, and the call is finished in the background as it
        would have been (a move written whole or not at all), instead of being torn out
        of a statement (aiosqlite cannot stop one, and the connection it holds would keep
        its transaction). :meth:`aclose` waits for such calls.
        """
        call = asyncio.ensure_future(greenlet_spawn(method, *args, **kwargs))
        self._calls.add(call)
        call.add_done_callback(self._finished)
        return await asyncio.shield(call)

    def _finished(self, call: asyncio.Future[Any]) -> None:
        self._calls.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: a caller that went away does not hear of it

    # -- submitting and reading ------------------------------------------------------

    async def submit(
        self,
        task_type: str,
        client_id: int,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        """Record a new pending task and send its first hop; returns its id
        (:meth:`Taskrail.submit`)."""
        return await self._call(
            self._trail.submit, task_type, client_id, payload, idempotency_key=idempotency_key
        )

    async def submit_many(self, items: Iterable[NewTask | Mapping[str, Any]]) -> list[int]:
        """Submit many tasks in one transaction (:meth:`Taskrail.submit_many`)."""
        return await self._call(self._trail.submit_many, items)

    async def get(self, task_id: int) -> TaskRecord:
        """The task's current record (:meth:`Taskrail.get`)."""
        return await self._call(self._trail.get, task_id)

    async def history(self, task_id: int) -> list[EventRecord]:
        """The task's transitions, oldest first (:meth:`Taskrail.history`)."""
        return await self._call(self._trail.history, task_id)

    async def counts(self) -> dict[str, int]:
        """Number of tasks in each status (:meth:`Taskrail.counts`)."""
        return await self._call(self._trail.counts)

    async def list_tasks(
        self, *, limit: int = c.DEFAULT_LIST_LIMIT, **filters: Unpack[FilterFields]
    ) -> list[TaskRecord]:
        """Tasks matching every filter, newest first (:meth:`Taskrail.list_tasks`)."""
        return await self._call(self._trail.list_tasks, limit=limit, **filters)

    async def inbox(self, *, limit: int = c.DEFAULT_LIST_LIMIT) -> tuple[list[TaskRecord], int]:
        """The escalations inbox and how many are escalated (:meth:`Taskrail.inbox`)."""
        return await self._call(self._trail.inbox, limit=limit)

    # -- a person's moves ---------------------------------------------------------------

    async def retry(self, task_id: int, *, by: str | None = None, note: str | None = None) -> None:
        """failed -> pending, and back to the workers (:meth:`Taskrail.retry`)."""
        await self._call(self._trail.retry, task_id, by=by, note=note)

    async def claim(self, task_id: int, *, by: str | None = None, note: str | None = None) -> None:
        """Take an escalated task (:meth:`Taskrail.claim`)."""
        await self._call(self._trail.claim, task_id, by=by, note=note)

    async def unclaim(
        self, task_id: int, *, by: str | None = None, note: str | None = None
    ) -> None:
        """Give a claimed escalation back to the inbox (:meth:`Taskrail.unclaim`)."""
        await self._call(self._trail.unclaim, task_id, by=by, note=note)

    async def resolve(
        self, task_id: int, result: Any, *, by: str | None = None, note: str | None = None
    ) -> None:
        """escalated -> completed with the person's result (:meth:`Taskrail.resolve`)."""
        await self._call(self._trail.resolve, task_id, result, by=by, note=note)

    async def reopen(
        self,
        task_id: int,
        *,
        payload: Mapping[str, Any] | None = None,
        by: str | None = None,
        note: str | None = None,
    ) -> None:
        """escalated -> pending, back to the agents (:meth:`Taskrail.reopen`)."""
        await self._call(self._trail.reopen, task_id, payload=payload, by=by, note=note)

    async def reject(
        self, task_id: int, reason: str, *, by: str | None = None, note: str | None = None
    ) -> None:
        """escalated -> failed, with a reason (:meth:`Taskrail.reject`)."""
        await self._call(self._trail.reject, task_id, reason, by=by, note=note)

    async def cancel(
        self,
        task_id: int,
        *,
        reason: str | None = None,
        by: str | None = None,
        note: str | None = None,
    ) -> None:
        """pending, assigned or in progress -> cancelled (:meth:`Taskrail.cancel`)."""
        await self._call(self._trail.cancel, task_id, reason=reason, by=by, note=note)

    # -- many tasks at once ---------------------------------------------------------------

    async def retry_many(
        self,
        *,
        status: str | Iterable[Any] | None = "failed",
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Progress | None = None,
        **filters: Unpack[BulkFilterFields],
    ) -> BulkResult:
        """Retry every failed task matching the filters (:meth:`Taskrail.retry_many`)."""
        return await self._call(
            self._trail.retry_many,
            status=status,
            dry_run=dry_run,
            by=by,
            note=note,
            progress=progress,
            **filters,
        )

    async def cancel_many(
        self,
        *,
        status: str | Iterable[Any] | None,
        reason: str | None = None,
        dry_run: bool = False,
        by: str | None = None,
        note: str | None = None,
        progress: Progress | None = None,
        **filters: Unpack[BulkFilterFields],
    ) -> BulkResult:
        """Cancel every task matching the filters (:meth:`Taskrail.cancel_many`)."""
        return await self._call(
            self._trail.cancel_many,
            status=status,
            reason=reason,
            dry_run=dry_run,
            by=by,
            note=note,
            progress=progress,
            **filters,
        )

    async def bulk(self, event: str, flt: TaskFilter, **options: Any) -> BulkResult:
        """``event`` on every task matching ``flt`` (:meth:`Taskrail.bulk`)."""
        return await self._call(self._trail.bulk, event, flt, **options)


# -- the running loop's handle -------------------------------------------------------------

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncTaskrail] = (
    weakref.WeakKeyDictionary()
)


def client() -> AsyncTaskrail:
    """The running loop's :class:`AsyncTaskrail`, built from the environment on first use.

    Raises RuntimeError outside a running event loop.
    """
    loop = asyncio.get_running_loop()
    trail = _clients.get(loop)
    if trail is None:
        trail = _clients[loop] = AsyncTaskrail()
    return trail


async def reset_client() -> None:
    """Close and forget the running loop's handle (shutdown, settings changed, tests)."""
    trail = _clients.pop(asyncio.get_running_loop(), None)
    if trail is not None:
        await trail.aclose()


async def submit(
    task_type: str,
    client_id: int,
    payload: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
) -> int:
    """See :meth:`AsyncTaskrail.submit`."""
    return await client().submit(task_type, client_id, payload, idempotency_key=idempotency_key)


async def submit_many(items: Iterable[NewTask | Mapping[str, Any]]) -> list[int]:
    """See :meth:`AsyncTaskrail.submit_many`."""
    return await client().submit_many(items)


async def get(task_id: int) -> TaskRecord:
    """See :meth:`AsyncTaskrail.get`."""
    return await client().get(task_id)


async def history(task_id: int) -> list[EventRecord]:
    """See :meth:`AsyncTaskrail.history`."""
    return await client().history(task_id)


async def list_tasks(**filters: Any) -> list[TaskRecord]:
    """See :meth:`AsyncTaskrail.list_tasks`."""
    return await client().list_tasks(**filters)


async def inbox(*, limit: int = c.DEFAULT_LIST_LIMIT) -> tuple[list[TaskRecord], int]:
    """See :meth:`AsyncTaskrail.inbox`."""
    return await client().inbox(limit=limit)


async def retry(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`AsyncTaskrail.retry`."""
    await client().retry(task_id, by=by, note=note)


async def claim(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`AsyncTaskrail.claim`."""
    await client().claim(task_id, by=by, note=note)


async def unclaim(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`AsyncTaskrail.unclaim`."""
    await client().unclaim(task_id, by=by, note=note)


async def resolve(
    task_id: int, result: Any, *, by: str | None = None, note: str | None = None
) -> None:
    """See :meth:`AsyncTaskrail.resolve`."""
    await client().resolve(task_id, result, by=by, note=note)


async def reopen(
    task_id: int,
    *,
    payload: Mapping[str, Any] | None = None,
    by: str | None = None,
    note: str | None = None,
) -> None:
    """See :meth:`AsyncTaskrail.reopen`."""
    await client().reopen(task_id, payload=payload, by=by, note=note)


async def reject(
    task_id: int, reason: str, *, by: str | None = None, note: str | None = None
) -> None:
    """See :meth:`AsyncTaskrail.reject`."""
    await client().reject(task_id, reason, by=by, note=note)


async def cancel(
    task_id: int, *, reason: str | None = None, by: str | None = None, note: str | None = None
) -> None:
    """See :meth:`AsyncTaskrail.cancel`."""
    await client().cancel(task_id, reason=reason, by=by, note=note)


async def retry_many(**filters: Any) -> BulkResult:
    """See :meth:`AsyncTaskrail.retry_many`."""
    return await client().retry_many(**filters)


async def cancel_many(**filters: Any) -> BulkResult:
    """See :meth:`AsyncTaskrail.cancel_many`."""
    return await client().cancel_many(**filters)
