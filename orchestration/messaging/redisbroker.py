"""taskrail's Redis transport: kombu's own, with fewer round trips per message.

It stays wire-compatible with ``kombu.transport.redis`` (the same queue lists, the same
``unacked`` hash and ``unacked_index`` sorted set, the same message and unacked
formats), so any Celery or kombu client can publish to or consume from taskrail's
queues, and a message left unacknowledged by one is restored by the other. What
differs saves round trips and CPU on the hop path (docs/design.md, "Performance"):

- **One client per channel.** kombu builds a new ``redis.Redis`` for every publish
  and every acknowledgement; here each channel keeps one (redis-py clients are
  thread-safe).
- **Batched fetch.** When BRPOP hands over a message, one Lua call records it as
  unacknowledged and pops up to the rest of the prefetch window from the consumed
  queues, one from each in turn, recording each one too, before any of them runs.
  kombu needs two round trips per message (BRPOP, then the unacked bookkeeping).
  Message priorities are not looked at within a batch (taskrail sends none).
  (:mod:`orchestration.messaging.redisfetch`)
- **Batched acknowledgements.** In a worker (the transport runs in an event loop),
  acknowledgements are collected and sent in one pipeline at the next turn of the
  loop, before it waits for more messages; elsewhere each is sent at once. The
  prefetch window opens at once either way. A worker that dies before that pipeline
  leaves those messages unacknowledged: they come back after the visibility timeout
  and, hops being idempotent, do nothing.
- **Publishes join that pipeline.** A hop run by the event loop's own thread (a
  ``solo`` worker) pushes its next hop message with :meth:`Channel.push`, which holds
  it until the same turn of the loop and sends it just before the acknowledgements:
  after the hop's commit, before its ack, one round trip for the whole batch. A
  worker that dies in between loses those messages like a crash between a hop's
  commit and its send: the sweeper re-drives the tasks. Other threads and processes
  push at once.

Bytes on a queue that are not a kombu envelope (not JSON, not an object with a
delivery tag, a body that is not base64, ...) are kept as dead letters
(:mod:`orchestration.messaging.deadletters`) and the worker goes on; kombu's own transport
raises out of its event loop on them, which stops the worker.

Select it with Celery's ``broker_transport`` (``orchestration.messaging.dispatch`` does for
``redis://`` and ``rediss://`` URLs).
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis

from orchestration import constants as c
from orchestration.logging import get_logger
from orchestration.messaging.deadletters import RedisDeadLetters, dead_letter
from orchestration.messaging.redisfetch import FetchingChannel, unacked_record

log = get_logger("taskrail.broker")

TRANSPORT = f"{__name__}:Transport"
SCHEMES = ("redis:", "rediss:")
# Acknowledgements held back at most this many before they are sent anyway.
MAX_PENDING_ACKS = 256
# How long a publisher waits for a free connection of the channel's pool.
POOL_WAIT_S = 10.0

# The worker's event loop, as (pid, thread): pushes made on it wait for its next turn.
_loop_owner: tuple[int, int] | None = None
# Channels holding pushes for the loop's next turn.
_deferred: set[Channel] = set()


def _on_loop_thread() -> bool:
    return _loop_owner is not None and _loop_owner == (os.getpid(), threading.get_ident())


def flush_deferred_pushes() -> None:
    """Send every push held for the loop's next turn (the loop's flusher calls this)."""
    while _deferred:
        channel = _deferred.pop()
        try:
            channel.flush_pushes()
        except (OSError, *channel.connection_errors) as err:
            log.warning("broker_publish_lost", error=str(err), note="the sweeper re-drives")


class QoS(kombu_redis.QoS):
    """kombu's ack emulation, with the fetch and the acks of a batch done together."""

    channel: Channel

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        if delivery_tag in channel._prerecorded:
            channel._prerecorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        if channel._brpop_message is None and channel._reading:
            # The message BRPOP just handed over: record it and fetch more, in one call.
            delivery = message.delivery_info
            channel._brpop_message = (
                delivery_tag,
                unacked_record(message._raw, delivery["exchange"], delivery["routing_key"]),
            )
            channel._fetch_more()
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        channel = self.channel
        if channel.connection.in_event_loop:
            channel._pending_acks.append(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
            if len(channel._pending_acks) >= MAX_PENDING_ACKS:
                flush_deferred_pushes()
                channel.flush_acks()
            return
        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            self._remove_from_indices(delivery_tag, pipe).execute()
        virtual.QoS.ack(self, delivery_tag)


def _lpush_runs(raw: Any, items: Sequence[tuple[str, bytes]]) -> None:
    """LPUSH ``(key, payload)`` pairs in order, one command per run of the same key.

    ``LPUSH key a b c`` leaves the list as ``LPUSH a; LPUSH b; LPUSH c`` would, so the
    consumer's BRPOP still sees them first in, first out.
    """
    pipe = raw.pipeline(transaction=False)
    for key, run in itertools.groupby(items, key=operator.itemgetter(0)):
        pipe.lpush(key, *(payload for _key, payload in run))
    pipe.execute()


class Channel(FetchingChannel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync_client: Any = None
        self._raw_client: Any = None
        self._pending_acks: deque[str] = deque()  # appended from any thread
        self._pending_pushes: list[tuple[str, bytes]] = []
        super().__init__(*args, **kwargs)

    # -- clients ------------------------------------------------------------------

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or (self._pool is not None and client.connection_pool is not self._pool):
            client = self._sync_client = super()._create_client(asynchronous=False)
        return client

    def _get_pool(self, asynchronous: bool = False) -> Any:
        pool = super()._get_pool(asynchronous=asynchronous)
        if asynchronous:
            return pool
        # Every thread of a threads pool publishes through this pool: one that finds all
        # connections in use waits for one (kombu's pool would raise "Too many
        # connections" and fail the hop).
        return redis.BlockingConnectionPool(
            max_connections=pool.max_connections,
            timeout=POOL_WAIT_S,
            connection_class=pool.connection_class,
            **pool.connection_kwargs,
        )

    def _raw(self) -> redis.Redis:
        """A client on the channel's pool that adds no key prefix (our keys carry it).

        A channel being closed keeps its clients: their pool reconnects if it can, and
        fails with a connection error (which kombu ignores on close) if it cannot.
        """
        client = self._raw_client
        if client is None or (self._pool is not None and client.connection_pool is not self._pool):
            client = self._raw_client = redis.Redis(connection_pool=self.pool)
        return client

    @property
    def pool(self) -> Any:
        if self._pool is None and self.connection.client is None:
            # kombu rebuilds the pool from the connection's parameters, which a closed
            # connection no longer has: say so as the connection error it is.
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super().pool

    # -- dead letters ------------------------------------------------------------------

    def dead_letters(self) -> RedisDeadLetters:
        """This broker's dead-letter list (on the channel's own connections)."""
        return RedisDeadLetters(self._raw(), self._key(c.DEAD_LETTER_KEY))

    def _dead_letter(self, queue: str, reason: str, item: bytes) -> None:
        dead_letter(self.dead_letters(), queue, reason, item)

    # -- publishing -----------------------------------------------------------------

    def push(self, messages: Iterable[tuple[str, dict[str, Any] | bytes]]) -> None:
        """Put prebuilt envelopes (:func:`orchestration.messaging.protocol.envelope`, or already
        encoded by :func:`orchestration.messaging.protocol.encoded_envelopes`) on their queues.

        What ``basic_publish`` to the default exchange does, without kombu's routing
        machinery; several messages go in one pipeline. Each envelope is encoded as it
        comes, so a generator of them never holds more than one. Raises the channel's
        connection errors.
        """
        encoded = [
            (self._key(q), m if isinstance(m, bytes) else orjson.dumps(m)) for q, m in messages
        ]
        if _on_loop_thread():
            self._pending_pushes += encoded
            _deferred.add(self)
            return
        raw = self._raw()
        if len(encoded) == 1:
            raw.lpush(*encoded[0])
            return
        _lpush_runs(raw, encoded)

    def flush_pushes(self) -> None:
        """Send the pushes held for the loop's next turn, in one pipeline, in order."""
        pending, self._pending_pushes = self._pending_pushes, []
        if not pending:
            return
        _lpush_runs(self._raw(), pending)

    # -- batched acks -------------------------------------------------------------

    def flush_acks(self) -> None:
        """Send the held-back acknowledgements in one pipeline."""
        pending = self._pending_acks
        if not pending:
            return
        tags = []
        with contextlib.suppress(IndexError):
            while True:
                tags.append(pending.popleft())
        pipe = self._raw().pipeline(transaction=False)
        pipe.zrem(self._key(self.unacked_index_key), *tags)
        pipe.hdel(self._key(self.unacked_key), *tags)
        pipe.execute()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush_pushes()
        with contextlib.suppress(Exception):
            self.flush_acks()
        _deferred.discard(self)
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel

    #: True once a worker's event loop drives this transport (acks are batched).
    in_event_loop = False

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        global _loop_owner
        super().register_with_event_loop(connection, loop)
        self.in_event_loop = True
        _loop_owner = (os.getpid(), threading.get_ident())
        # One flusher per loop: a reconnect's new transport replaces the old one's.
        for callback in [cb for cb in loop.on_tick if isinstance(cb, _AckFlusher)]:
            loop.on_tick.discard(callback)
        loop.on_tick.add(_AckFlusher(self))

    def flush_acks(self) -> None:
        """Send every channel's held-back acknowledgements (once per loop turn).

        A broker that cannot be reached loses them: those messages come back after
        the visibility timeout, and the consumer notices the outage on its own.
        """
        for channel in list(self.channels):
            if isinstance(channel, Channel):
                try:
                    channel.flush_acks()
                except (OSError, *self.connection_errors) as err:
                    log.warning("broker_acks_lost", error=str(err))


class _AckFlusher:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def __call__(self) -> None:
        flush_deferred_pushes()  # published before the acks of the hops that sent them
        self.transport.flush_acks()


TRANSPORT_ALIASES.setdefault("taskrail-redis", TRANSPORT)
