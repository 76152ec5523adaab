"""The pybreaker ``CircuitBreaker`` under a :class:`SharedBreaker`: configuration and entry points.

It holds what pybreaker users configure (``fail_max``, ``reset_timeout``, excluded
exceptions, listeners, ``throw_new_error_on_trip``) and routes pybreaker's own entry
points (``call``, the decorator, ``calling()``, ``open()``/``close()``) to the shared
breaker's atomic path.

Coroutines: pybreaker 1.4's decorator calls an ``async def`` like any function, so the
coroutine it returns is counted a success at once and runs unguarded; its
``call_async`` (and the decorator's ``__pybreaker_call_async=True``) run on Tornado,
holding the breaker's lock across the call. Here the decorator on an ``async def``
returns an ``async def`` (still a coroutine function to ``inspect``) guarded on the
shared breaker's asyncio path, ``call_async`` returns such a coroutine, and
``acalling()`` is ``calling()`` for ``async with``. An async generator function is
refused (see :mod:`.guards`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pybreaker

from orchestration.breakers.guards import ASYNC_GENERATOR_REFUSED
from orchestration.breakers.model import STATE_CLOSED
from orchestration.errors import ConfigurationError

if TYPE_CHECKING:
    from orchestration.breakers.breaker import SharedBreaker

T = TypeVar("T")


class Circuit(pybreaker.CircuitBreaker):
    """pybreaker's CircuitBreaker, configured as usual, driven through SharedBreaker.

    Stock ``call`` holds ``self._lock`` around the guarded call (callers serialise) and
    its ``state`` getter writes to the storage when its cached state object is stale;
    neither happens here.
    """

    def __init__(self, shared: SharedBreaker, **kwargs: Any) -> None:
        _refuse_success_threshold(kwargs.get("success_threshold", 1), shared.name)
        # pybreaker reads the state while constructing; a memory placeholder keeps
        # construction off Redis. SharedBreaker installs the real storage after.
        self._shared: SharedBreaker | None = None
        super().__init__(state_storage=pybreaker.CircuitMemoryStorage(STATE_CLOSED), **kwargs)
        self._shared = shared

    @property
    def success_threshold(self) -> int:
        return self._success_threshold

    @success_threshold.setter
    def success_threshold(self, threshold: int) -> None:
        _refuse_success_threshold(threshold, self.name)
        self._success_threshold = threshold

    @property
    def current_state(self) -> str:
        if self._shared is None:  # still constructing
            return STATE_CLOSED
        return self._shared.state

    @property
    def state(self) -> Any:
        return self._create_new_state(self.current_state)

    @state.setter
    def state(self, state_str: str) -> None:
        raise AttributeError("breaker state changes only through SharedBreaker")

    def is_system_error(self, exception: BaseException) -> bool:
        # pybreaker tests `type(exclusion) is type`, so an exception class with a
        # metaclass (ABCMeta) would be *called* as a predicate; test classes with isinstance.
        for exclusion in self._excluded_exceptions:
            if isinstance(exclusion, type):
                if isinstance(exception, exclusion):
                    return False
            elif exclusion(exception):
                return False
        return True

    @property
    def shared(self) -> SharedBreaker:
        assert self._shared is not None
        return self._shared

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.shared._guarded(
            func, args, kwargs, new_error_on_trip=self._throw_new_error_on_trip
        )

    @contextlib.contextmanager
    def calling(self) -> Any:
        with self.shared._guarded_block(new_error_on_trip=self._throw_new_error_on_trip):
            yield

    @contextlib.asynccontextmanager
    async def acalling(self) -> Any:
        async with self.shared._aguarded_block(new_error_on_trip=self._throw_new_error_on_trip):
            yield

    def call_async(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Any:
        """A coroutine that awaits ``func(*args, **kwargs)`` through the breaker (asyncio,
        not pybreaker's Tornado)."""
        return self.shared._aguarded(
            func, args, kwargs, new_error_on_trip=self._throw_new_error_on_trip
        )

    def __call__(self, *call_args: Any, **call_kwargs: Any) -> Callable[..., Any]:
        """pybreaker's decorator (``@circuit`` or ``@circuit()``); a coroutine function is
        guarded on the asyncio path. ``__pybreaker_call_async`` is accepted and ignored:
        the function's own kind decides."""
        call_kwargs.pop("__pybreaker_call_async", None)
        if call_kwargs:
            raise TypeError(f"unexpected decorator options: {sorted(call_kwargs)}")

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(func):
                raise TypeError(ASYNC_GENERATOR_REFUSED.format(name=self.name))
            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def guarded_coroutine(*args: Any, **kwargs: Any) -> Any:
                    return await self.call_async(func, *args, **kwargs)

                return guarded_coroutine

            @functools.wraps(func)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                return self.call(func, *args, **kwargs)

            return guarded

        return decorate(*call_args) if call_args else decorate

    def open(self) -> bool:
        self.shared.force_open()
        return self._throw_new_error_on_trip

    def close(self) -> None:
        self.shared.reset()

    def half_open(self) -> None:
        raise NotImplementedError("half-open is entered only by taking the trial lease")


def _refuse_success_threshold(threshold: int, name: str | None) -> None:
    if threshold != 1:
        raise ConfigurationError(
            f"breaker {name!r}: success_threshold must be 1 (one cluster-wide half-open "
            f"trial closes a taskrail breaker), not {threshold}"
        )
