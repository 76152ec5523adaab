"""Sending first hops from an event loop: :class:`AsyncDispatcher`.

On taskrail's Redis transport the messages are the sync :class:`Dispatcher`'s own,
encoded by the same code (:func:`~orchestration.messaging.dispatch.hop_batches`), and
pushed with ``redis.asyncio`` onto the same queue lists (the broker key prefix
included): one LPUSH per batch of up to ``PUBLISH_BATCH``, in order, as the sync path
pushes them. A Celery worker cannot tell them apart.

Every other broker (the embedded file-system broker, AMQP) has no async publisher in
kombu: there the sync :class:`Dispatcher` publishes in a thread of the loop's default
executor (``asyncio.to_thread``), so the loop keeps running while it waits.

A broker that cannot be reached raises BrokerUnavailable, as the sync path does,
after about ``publish_max_wait_s`` of retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from orchestration import constants as c
from orchestration.errors import BrokerUnavailable
from orchestration.messaging.dispatch import (
    Dispatcher,
    hop_batches,
    make_celery,
    redis_keepalive_options,
)
from orchestration.redact import redact_text
from orchestration.settings import Settings

__all__ = ["AsyncDispatcher"]

# What a Redis broker that cannot be reached raises.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


class AsyncDispatcher:
    """Publishes hop messages by task name without blocking the event loop.

    ``AsyncDispatcher(settings, dispatcher=None)``: ``dispatcher`` is the sync one
    (built from the settings by default) whose messages this one sends, and which
    publishes for it off Redis. One event loop per instance.
    """

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self.settings = settings
        self.sync = dispatcher or Dispatcher(make_celery(settings))
        options = self.sync.app.conf.broker_transport_options or {}
        self._prefix = str(options.get("global_keyprefix") or "")
        self._client: aioredis.Redis | None = None

    @property
    def where(self) -> str:
        return self.sync.where

    def _redis(self) -> aioredis.Redis:
        """The Redis client of the direct path, made on first use (connects lazily)."""
        if self._client is None:
            s = self.settings
            wait_s = s.publish_max_wait_s
            self._client = aioredis.Redis.from_url(
                s.effective_broker_url,
                socket_timeout=s.broker_socket_timeout_s,
                socket_connect_timeout=c.BROKER_CONNECT_TIMEOUT_S,
                socket_keepalive=True,
                socket_keepalive_options=redis_keepalive_options(),
                health_check_interval=c.BROKER_HEALTH_CHECK_INTERVAL_S,
                # About publish_max_wait_s for a broker that is down, as the sync path.
                retry=Retry(
                    ExponentialBackoff(cap=wait_s / 2, base=wait_s / 4),
                    2 if wait_s > 0 else 0,
                ),
            )
        return self._client

    async def send_many(self, hop: str, args_list: Iterable[Sequence[Any]]) -> int:
        """Publish ``hop`` for each of ``args_list``; returns how many were sent.

        Raises BrokerUnavailable.
        """
        if not self.sync.direct:
            listed = list(args_list)
            return await asyncio.to_thread(self.sync.send_many, hop, listed)
        client = self._redis()
        sent = 0
        for queue, encoded in hop_batches(hop, args_list):
            try:
                await client.lpush(self._prefix + queue, *encoded)
            except _REDIS_ERRORS as err:
                raise BrokerUnavailable(self.where, redact_text(str(err))) from err
            sent += len(encoded)
        return sent

    async def aclose(self) -> None:
        """Close the Redis client (a new one is made on the next send)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
