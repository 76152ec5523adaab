"""The pybreaker ``CircuitBreaker`` under a :class:`SharedBreaker`: configuration and entry points.

It holds what pybreaker users configure (``fail_max``, ``reset_timeout``, excluded
exceptions, listeners, ``throw_new_error_on_trip``) and routes pybreaker's own entry
points (``call``, the decorator, ``calling()``, ``open()``/``close()``) to the shared
breaker's atomic path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pybreaker

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

    def call_async(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("taskrail breakers guard synchronous calls only")

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
