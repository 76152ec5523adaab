"""Helpers for the coroutine-path breaker tests: an event loop per test body, a call
cancelled mid-call, a listener that records what it hears."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pybreaker

from orchestration.breakers import BreakerBoard

T = TypeVar("T")


def run(board: BreakerBoard, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``body()`` on a fresh event loop; the board's client on that loop closed after."""

    async def main() -> T:
        try:
            return await body()
        finally:
            await board.aclose()

    return asyncio.run(main())


async def cancel_mid_call(start: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]) -> str:
    """``start(handler)`` in a task, cancelled once ``handler`` is running.

    Returns "cancelled"; a refusal (or any error before the handler ran) is raised.
    """
    running = asyncio.Event()

    async def handler() -> None:
        running.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(start(handler))
    started = asyncio.ensure_future(running.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        task.result()
        raise AssertionError("the handler returned")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    return "cancelled"


class OutcomeRecorder(pybreaker.CircuitBreakerListener):
    """Every listener callback, in order (``before_call`` without its arguments)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        self.events.append(("before_call",))

    def success(self, cb: Any) -> None:
        self.events.append(("success",))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.events.append(("failure", type(exc).__name__))

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.events.append(("state_change", old_state and old_state.name, new_state.name))

    def take(self) -> list[tuple[Any, ...]]:
        taken, self.events = self.events, []
        return taken
