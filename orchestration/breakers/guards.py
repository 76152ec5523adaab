"""Guarding a callable or a block: the breaker's call path wrapped around the call.

:class:`Guards` is the part of :class:`.breaker.SharedBreaker` that wraps a call in
the split path (permit, call, outcome), for threads (``call``, ``calling``) and for
coroutines (``acall``, ``acalling``). What each kind of callable gets:

- A plain function: judged when it returns or raises.
- A generator (returned by a call): judged when it ends; closed early, no verdict.
- A coroutine function, given to ``call`` or ``acall``: admitted and judged on the
  coroutine path when the returned coroutine is awaited. Through ``call`` this is the
  awaitable ``call`` returns: ``await breaker.call(fetch, url)`` guards ``fetch``.
- Any other awaitable a function returns (``lambda: client.get(url)``): judged when
  awaited; through ``call`` its admission was read when ``call`` ran.
- An async generator: refused (TypeError, the permit given back): its items are
  produced after the call returns and it has no single outcome to judge; guard the
  calls inside it.

An awaitable or generator that is never awaited or run leaves its permit to lapse (a
trial's lease expires after ``trial_lease_s``).
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from orchestration.breakers.model import Permit

T = TypeVar("T")

ASYNC_GENERATOR_REFUSED = (
    "breaker {name}: an async generator is not guarded (it has no single outcome); "
    "guard the calls inside it"
)


class Guards:
    """``call``/``calling`` and ``acall``/``acalling`` over the split call path."""

    name: str

    if TYPE_CHECKING:  # the split path, as SharedBreaker defines it

        def before_call(
            self, func: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any
        ) -> Permit: ...
        def on_success(self, permit: Permit) -> None: ...
        def abandon(self, permit: Permit) -> None: ...
        def _settle_failure(
            self, permit: Permit, exc: BaseException, new_error_on_trip: bool
        ) -> None: ...
        async def abefore_call(
            self, func: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any
        ) -> Permit: ...
        async def aon_success(self, permit: Permit) -> None: ...
        async def aabandon(self, permit: Permit) -> None: ...
        async def _asettle_failure(
            self, permit: Permit, exc: BaseException, new_error_on_trip: bool
        ) -> None: ...

    # -- threads -----------------------------------------------------------------------

    def call(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)`` through the breaker; its exception propagates as is.

        Raises BreakerOpen / BreakerStateUnavailable before calling. No lock is held
        while ``func`` runs. A generator is judged when it ends, a coroutine function's
        call when awaited (see the module doc).
        """
        return self._guarded(func, args, kwargs, new_error_on_trip=False)

    def calling(self) -> contextlib.AbstractContextManager[Permit]:
        """``with breaker.calling(): ...`` guards the block like :meth:`call`."""
        return self._guarded_block(new_error_on_trip=False)

    def _guarded(
        self,
        func: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        new_error_on_trip: bool,
    ) -> T:
        if inspect.iscoroutinefunction(func):
            # Admission is awaited too: nothing blocks the event loop that awaits it.
            return self._aguarded(func, args, kwargs, new_error_on_trip=new_error_on_trip)  # type: ignore[return-value]
        permit = self.before_call(func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self._settle_failure(permit, exc, new_error_on_trip)
            raise
        return self._judged_later(permit, result, new_error_on_trip)

    def _judged_later(self, permit: Permit, result: Any, new_error_on_trip: bool) -> Any:
        """``result``, or what stands for it when its outcome comes later (a generator,
        an awaitable); records the success of a plain result."""
        if isinstance(result, types.GeneratorType):
            return self._guarded_generator(permit, result, new_error_on_trip)
        if inspect.isasyncgen(result):
            self.abandon(permit)
            raise TypeError(ASYNC_GENERATOR_REFUSED.format(name=self.name))
        if inspect.isawaitable(result):
            return self._guarded_awaitable(permit, result, new_error_on_trip)
        self.on_success(permit)
        return result

    def _guarded_generator(
        self, permit: Permit, inner: Generator[Any, Any, Any], new_error_on_trip: bool
    ) -> Generator[Any, Any, Any]:
        try:
            result = yield from inner
        except BaseException as exc:
            self._settle_failure(permit, exc, new_error_on_trip)
            raise
        self.on_success(permit)
        return result

    @contextlib.contextmanager
    def _guarded_block(self, *, new_error_on_trip: bool) -> Iterator[Permit]:
        permit = self.before_call()
        try:
            yield permit
        except BaseException as exc:
            self._settle_failure(permit, exc, new_error_on_trip)
            raise
        self.on_success(permit)

    # -- coroutines ----------------------------------------------------------------------

    async def acall(self, func: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """``await func(*args, **kwargs)`` through the breaker, on the coroutine path.

        The same rules as :meth:`call`, with every Redis round trip awaited. Raises
        BreakerOpen / BreakerStateUnavailable before calling; the downstream's exception
        propagates as is. A cancellation (``asyncio.CancelledError``: a time limit, a
        cancel) gives no verdict: nothing is counted and a trial's lease is released.
        """
        return await self._aguarded(func, args, kwargs, new_error_on_trip=False)

    def acalling(self) -> contextlib.AbstractAsyncContextManager[Permit]:
        """``async with breaker.acalling(): ...`` guards the block like :meth:`acall`."""
        return self._aguarded_block(new_error_on_trip=False)

    async def _aguarded(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        new_error_on_trip: bool,
    ) -> Any:
        permit = await self.abefore_call(func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            await self._asettle_failure(permit, exc, new_error_on_trip)
            raise
        if isinstance(result, types.GeneratorType):
            return self._guarded_generator(permit, result, new_error_on_trip)
        if inspect.isasyncgen(result):
            await self.aabandon(permit)
            raise TypeError(ASYNC_GENERATOR_REFUSED.format(name=self.name))
        await self.aon_success(permit)
        return result

    async def _guarded_awaitable(
        self, permit: Permit, inner: Awaitable[Any], new_error_on_trip: bool
    ) -> Any:
        try:
            result = await inner
        except BaseException as exc:
            await self._asettle_failure(permit, exc, new_error_on_trip)
            raise
        await self.aon_success(permit)
        return result

    @contextlib.asynccontextmanager
    async def _aguarded_block(self, *, new_error_on_trip: bool) -> AsyncIterator[Permit]:
        permit = await self.abefore_call()
        try:
            yield permit
        except BaseException as exc:
            await self._asettle_failure(permit, exc, new_error_on_trip)
            raise
        await self.aon_success(permit)
