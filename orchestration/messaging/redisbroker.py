"""taskrail's Redis transport: kombu's own, with fewer round trips per message.

It stays wire-compatible with ``kombu.transport.redis`` (the same queue lists, the same
``unacked`` hash and ``unacked_index`` sorted set, the same message and unacked
formats), so any Celery or kombu client can publish to or consume from taskrail's
queues, and a message left unacknowledged by one is restored by the other. Three
things differ, each measured on the hop path (docs/performance.md):

- **One client per channel.** kombu builds a new ``redis.Redis`` for every publish
  and every acknowledgement; with redis-py 8 that costs about as much as the command
  it serves. Here each channel keeps one (redis-py clients are thread-safe).
- **Batched fetch.** When BRPOP hands over a message, one Lua call records it as
  unacknowledged and pops up to the rest of the prefetch window from the consumed
  queues, one from each in turn, recording each one too, before any of them runs.
  kombu needs two round trips per message (BRPOP, then the unacked bookkeeping).
  Message priorities are not looked at within a batch (taskrail sends none).
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
import time
from collections import deque
from collections.abc import Iterable, Sequence
from queue import Empty
from typing import Any

import orjson
import redis
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from orchestration import constants as c
from orchestration.errors import NotAHop
from orchestration.logging import get_logger
from orchestration.messaging.codec import loads
from orchestration.messaging.deadletters import RedisDeadLetters, dead_letter, decode_envelope

log = get_logger("taskrail.broker")

TRANSPORT = f"{__name__}:Transport"
SCHEMES = ("redis:", "rediss:")
# Acknowledgements held back at most this many before they are sent anyway.
MAX_PENDING_ACKS = 256
# How long a publisher waits for a free connection of the channel's pool.
POOL_WAIT_S = 10.0

# Records one message already popped (ARGV[3], ARGV[4]) as unacknowledged, then pops
# up to ARGV[1] more from the queue keys (KEYS[3..]), one from each in turn, recording
# each as kombu does: unacked[tag] = [message, exchange, routing_key], unacked_index[tag]
# = now. A message with a ``taskrail_once`` header is delivered once: the first one
# to be fetched sets ARGV[6] .. token:retries (SET NX PX ARGV[7]); a later copy is
# dropped. (Celery's own retry of a task is a new message: its retries differ.)
# Returns the first message's verdict (1 first, 0 a copy, -1 no such header), then
# key, message, flag for each popped one: 1 recorded, 0 unreadable (not recorded, for
# Python to handle), 2 a copy of a message already fetched (dropped).
_FETCH_LUA = """
local now = ARGV[2]
local function once(token, retries)
  if type(token) ~= 'string' or token == '' then return -1 end
  if type(retries) == 'number' then token = token .. ':' .. string.format('%d', retries) end
  if redis.call('SET', ARGV[6] .. token, '1', 'NX', 'PX', ARGV[7]) then return 1 end
  return 0
end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
end
local out = {once(ARGV[5])}  -- ARGV[5] carries its retries already
local want = tonumber(ARGV[1])
local empty = {}
local live = #KEYS - 2
while want > 0 and live > 0 do
  for i = 3, #KEYS do
    if want <= 0 then break end
    if not empty[i] then
      local item = redis.call('RPOP', KEYS[i])
      if not item then
        empty[i] = true
        live = live - 1
      else
        want = want - 1
        local ok, msg = pcall(cjson.decode, item)
        local props = ok and type(msg) == 'table' and msg['properties']
        local tag = type(props) == 'table' and props['delivery_tag']
        local flag = 0
        if type(tag) == 'string' then
          local headers = type(msg['headers']) == 'table' and msg['headers'] or {}
          if once(headers['taskrail_once'], headers['retries']) == 0 then
            flag = 2
          else
            local info = props['delivery_info']
            if type(info) ~= 'table' then info = {} end
            local ex = type(info['exchange']) == 'string' and info['exchange'] or ''
            local rk = type(info['routing_key']) == 'string' and info['routing_key'] or ''
            redis.call('ZADD', KEYS[2], now, tag)
            redis.call('HSET', KEYS[1], tag,
              '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
            flag = 1
          end
        end
        out[#out + 1] = KEYS[i]; out[#out + 1] = item; out[#out + 1] = flag
      end
    end
  end
end
return out
"""

# A message header naming a token: the transport delivers a message with it once, and
# tells the consumer so in the header FIRST_HEADER (True; a later copy is dropped, or
# marked False when BRPOP handed it over).
ONCE_HEADER = "taskrail_once"
FIRST_HEADER = "taskrail_first"


def once_key(headers: Any) -> str:
    """The once-key of a message's headers ('' for none): its token and Celery retries."""
    token = headers.get(ONCE_HEADER) if isinstance(headers, dict) else None
    if not isinstance(token, str) or not token:
        return ""
    retries = headers.get("retries")
    if isinstance(retries, int) and not isinstance(retries, bool):
        return f"{token}:{retries}"
    return token


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


def _unacked_record(raw: Any, exchange: str, routing_key: str) -> bytes:
    """kombu's unacked entry ``[message, exchange, routing_key]``: orjson, or kombu's
    encoder for what orjson cannot write (integers beyond 64 bits are valid JSON)."""
    try:
        return orjson.dumps([raw, exchange, routing_key])
    except TypeError:
        return kombu_json.dumps([raw, exchange, routing_key]).encode()


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
                _unacked_record(message._raw, delivery["exchange"], delivery["routing_key"]),
            )
            verdict = channel._fetch_more(once_key(message.headers))
            if verdict >= 0:
                message.headers[FIRST_HEADER] = bool(verdict)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def restore_unacked(self, client: Any = None) -> Any:
        # Messages still unacknowledged when the consumer stops were never run (a warm
        # shutdown waits for running ones): another worker may deliver them once more.
        for message in list(self._delivered.values()):
            with contextlib.suppress(Exception):
                self.channel._forget_once(getattr(message, "headers", None))
        return super().restore_unacked(client)

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


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync_client: Any = None
        self._raw_client: Any = None
        self._fetch_script: Any = None
        self._prerecorded: set[str] = set()
        self._pending_acks: deque[str] = deque()  # appended from any thread
        self._fetched: list[tuple[str, Any, int]] = []
        self._brpop_message: tuple[str, bytes] | None = None
        self._reading = False
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
            self._fetch_script = client.register_script(_FETCH_LUA)
        return client

    @property
    def pool(self) -> Any:
        if self._pool is None and self.connection.client is None:
            # kombu rebuilds the pool from the connection's parameters, which a closed
            # connection no longer has: say so as the connection error it is.
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super().pool

    def _key(self, name: str) -> str:
        return f"{self.global_keyprefix}{name}"

    # -- batched fetch ------------------------------------------------------------

    def _brpop_read(self, **options: Any) -> Any:
        """kombu's BRPOP read, then the rest of the fetched batch, then its acks."""
        if self._reading:  # re-entered (a channel closing mid-batch): no batch
            return self._brpop_deliver(**options)
        self._reading = True
        try:
            delivered = self._brpop_deliver(**options)
            self._reading = False
            self._deliver_fetched()
            return delivered
        finally:
            self._reading = False
            self._brpop_message = None

    def _brpop_deliver(self, **options: Any) -> bool:
        """kombu's ``_brpop_read``, with bytes that are not an envelope dead-lettered.

        kombu decodes the popped bytes in the middle of its read, where a decode error
        escapes the event loop and stops the worker ("Unrecoverable error").
        """
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # Disconnect, so that the next turn of the loop reconnects.
                self.client.connection.disconnect()
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            try:
                payload = decode_envelope(item)
            except NotAHop as err:
                self._dead_letter(queue, err.reason, item)
                return True
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = False  # no BRPOP in flight (kombu writes None)
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush_reauth is not None:
                flush_reauth()

    def _fetch_more(self, once: str) -> int:
        """Record the BRPOP'd message as unacked and pop (and record) more, in one call.

        Returns the BRPOP'd message's once-verdict (1 first, 0 a copy, -1 none).
        """
        assert self._brpop_message is not None
        tag, value = self._brpop_message
        room = self.qos.can_consume_max_estimate()
        want = 100 if room is None else max(0, room - 1)
        # The order BRPOP uses next: the queue just read from comes last (round robin).
        queues = self._queue_cycle.consume(len(self.active_queues))
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        raw = self._raw()
        reply = self._fetch_script(
            keys=[self._key(self.unacked_key), self._key(self.unacked_index_key)]
            + [self._key(k) for k in keys],
            args=[
                want,
                time.time(),
                tag,
                value,
                once,
                self._key(c.ONCE_KEY_PREFIX),
                int(self.visibility_timeout * c.RUN_GUARD_TTL_FACTOR * 1000),
            ],
            client=raw,
        )
        prefix = len(self.global_keyprefix)
        for i in range(1, len(reply), 3):
            key = bytes_to_str(reply[i])[prefix:]
            queue = key.rsplit(self.sep, 1)[0]
            self._fetched.append((queue, reply[i + 1], int(reply[i + 2])))
        return int(reply[0])

    def _deliver_fetched(self) -> None:
        """Hand the extra messages of the batch to their consumers, in order."""
        while self._fetched:
            queue, item, flag = self._fetched.pop(0)
            try:
                payload = decode_envelope(item)
            except NotAHop as err:
                if flag == 1:
                    self._unrecord(item)
                self._dead_letter(queue, err.reason, item)
                continue
            if flag == 2:
                log.info(
                    "broker_message_dropped",
                    queue=queue,
                    reason="a copy of a message already delivered",
                    task=payload.get("headers", {}).get("task"),
                )
                continue
            if flag == 1:
                self._prerecorded.add(payload["properties"]["delivery_tag"])
                headers = payload.get("headers")
                if isinstance(headers, dict) and isinstance(headers.get(ONCE_HEADER), str):
                    headers[FIRST_HEADER] = True
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                self._requeue_fetched()
                raise

    # -- dead letters ------------------------------------------------------------------

    def dead_letters(self) -> RedisDeadLetters:
        """This broker's dead-letter list (on the channel's own connections)."""
        return RedisDeadLetters(self._raw(), self._key(c.DEAD_LETTER_KEY))

    def _dead_letter(self, queue: str, reason: str, item: bytes) -> None:
        dead_letter(self.dead_letters(), queue, reason, item)

    def _unrecord(self, item: bytes) -> None:
        """Forget a message the fetch script recorded as unacknowledged (it has a tag)."""
        with contextlib.suppress(Exception):
            tag = loads(bytes_to_str(item))["properties"]["delivery_tag"]
            self._prerecorded.discard(tag)
            with self._raw().pipeline(transaction=False) as pipe:
                pipe.zrem(self._key(self.unacked_index_key), tag)
                pipe.hdel(self._key(self.unacked_key), tag)
                pipe.execute()

    def _requeue_fetched(self) -> None:
        """Give back what was fetched but not delivered (a consumer raised)."""
        fetched, self._fetched = self._fetched, []
        for _queue, item, flag in fetched:
            with contextlib.suppress(Exception):
                payload = loads(bytes_to_str(item))
                tag = payload["properties"]["delivery_tag"]
                self._prerecorded.discard(tag)
                if flag == 1:
                    self._forget_once(payload.get("headers"))
                    self.qos.restore_by_tag(tag, leftmost=True)

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

    def _forget_once(self, headers: Any) -> None:
        """Let a message given back unrun be delivered again (its once-key goes)."""
        once = once_key(headers)
        if once:
            self._raw().delete(self._key(c.ONCE_KEY_PREFIX + once))

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
