"""A breaker's state in Redis, for coroutines: :mod:`.storage`'s operations awaited.

:class:`AsyncRedisBreakerStorage` runs the same Lua scripts (:mod:`.lua`, one source) on
the same keys (:func:`.storage.breaker_keys`) and parses the same replies
(:func:`.storage.parse_reply`) as :class:`.storage.RedisBreakerStorage`, through a
``redis.asyncio`` client, so a round trip never blocks the event loop and a sync and an
async process share one state. Redis errors propagate, as in the sync storage.

A ``redis.asyncio`` client's connections belong to the event loop that opened them:
:class:`.board.BreakerBoard` keeps one client per loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
from redis.commands.core import AsyncScript

from orchestration.breakers.model import Reply
from orchestration.breakers.storage import (
    CommandTally,
    Scripts,
    breaker_keys,
    parse_reply,
    script_argv,
)


class CountingAsyncRedis(redis.asyncio.Redis):
    """A ``redis.asyncio`` client that counts the commands it sends into ``tally``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tally = CommandTally()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.tally.add(1)
        return await super().execute_command(*args, **options)


class AsyncScripts(Scripts[AsyncScript]):
    """The Lua scripts of :mod:`.lua` registered on one async client."""


class AsyncRedisBreakerStorage:
    """One breaker's state in Redis, changed by the scripts of :mod:`.lua`, awaited.

    The operations of :class:`.storage.RedisBreakerStorage` (``read``,
    ``record_failure``, ``record_success``, ``acquire_trial``, ``finish_trial``,
    ``abandon_trial``, ``reset``, ``force_open``), one ``EVALSHA`` each. ``clock``
    (epoch seconds, tests) replaces Redis's ``TIME`` and the local monotonic clock.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        scripts: AsyncScripts,
        namespace: str,
        name: str,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.breaker_name = name
        self._redis = client
        self._keys = list(breaker_keys(namespace, name))
        self._scripts = scripts
        self._clock = clock
        self._mono = clock or time.monotonic

    async def _run(self, script: AsyncScript, *args: Any) -> Reply:
        argv = script_argv(self.breaker_name, self._clock, *args)
        raw = await script(keys=self._keys, args=argv, client=self._redis)
        return parse_reply(raw, self._mono())

    async def read(self, *, register: bool = False, fail_max: int = 0, reset_ms: int = 0) -> Reply:
        """The state; with ``fail_max >= 1`` also registers it and writes the settings."""
        return await self._run(self._scripts.read, "1" if register else "0", fail_max, reset_ms)

    async def record_failure(self, epoch: int, fail_max: int, reset_ms: int) -> Reply:
        return await self._run(self._scripts.failure, epoch, fail_max, reset_ms)

    async def record_success(self, epoch: int) -> Reply:
        return await self._run(self._scripts.success, epoch)

    async def acquire_trial(self, token: str, lease_ms: int) -> Reply:
        return await self._run(self._scripts.trial, token, lease_ms)

    async def finish_trial(self, token: str, ok: bool, reset_ms: int) -> Reply:
        return await self._run(self._scripts.trial_done, token, "1" if ok else "0", reset_ms)

    async def abandon_trial(self, token: str) -> Reply:
        return await self._run(self._scripts.abandon, token)

    async def reset(self, *, known_only: bool = False) -> Reply:
        return await self._run(self._scripts.reset, "1" if known_only else "0")

    async def force_open(self, reset_ms: int) -> Reply:
        return await self._run(self._scripts.force_open, reset_ms)
