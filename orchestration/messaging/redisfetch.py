"""The Redis transport's batched fetch: one Lua call records the message BRPOP handed
over as unacknowledged and pops (and records) up to the rest of the prefetch window.

The records are kombu's own (``unacked[tag] = [message, exchange, routing_key]``,
``unacked_index[tag] = now``), so kombu's transport restores what taskrail's fetched
and the other way round. Bytes that are not a kombu envelope are dead-lettered.
"""

from __future__ import annotations

import contextlib
import time
from queue import Empty
from typing import Any

import orjson
import redis
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from orchestration.errors import NotAHop
from orchestration.messaging.codec import loads
from orchestration.messaging.deadletters import decode_envelope

# Records one message already popped (ARGV[3], ARGV[4]) as unacknowledged, then pops
# up to ARGV[1] more from the queue keys (KEYS[3..]), one from each in turn, recording
# each as kombu does: unacked[tag] = [message, exchange, routing_key], unacked_index[tag]
# = now (ARGV[2]). Returns key, message, flag for each popped one: 1 recorded, 0
# unreadable (not recorded, for Python to handle).
FETCH_LUA = """
local now = ARGV[2]
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
end
local out = {}
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
          local info = props['delivery_info']
          if type(info) ~= 'table' then info = {} end
          local ex = type(info['exchange']) == 'string' and info['exchange'] or ''
          local rk = type(info['routing_key']) == 'string' and info['routing_key'] or ''
          redis.call('ZADD', KEYS[2], now, tag)
          redis.call('HSET', KEYS[1], tag,
            '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
          flag = 1
        end
        out[#out + 1] = KEYS[i]; out[#out + 1] = item; out[#out + 1] = flag
      end
    end
  end
end
return out
"""


def unacked_record(raw: Any, exchange: str, routing_key: str) -> bytes:
    """kombu's unacked entry ``[message, exchange, routing_key]``: orjson, or kombu's
    encoder for what orjson cannot write (integers beyond 64 bits are valid JSON)."""
    try:
        return orjson.dumps([raw, exchange, routing_key])
    except TypeError:
        return kombu_json.dumps([raw, exchange, routing_key]).encode()


class FetchingChannel(kombu_redis.Channel):
    """kombu's Redis channel reading a batch per BRPOP (see the module doc).

    The QoS calls :meth:`_fetch_more` when it records the message BRPOP handed over and
    skips the messages in ``_prerecorded`` (the script recorded them). Subclasses give
    the client (:meth:`_raw`) and the dead-letter store (:meth:`_dead_letter`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fetch_script: Any = None
        self._prerecorded: set[str] = set()
        self._fetched: list[tuple[str, Any, int]] = []
        self._brpop_message: tuple[str, bytes] | None = None
        self._reading = False
        super().__init__(*args, **kwargs)

    def _raw(self) -> redis.Redis:
        """A client on the channel's pool that adds no key prefix (our keys carry it)."""
        raise NotImplementedError

    def _dead_letter(self, queue: str, reason: str, item: bytes) -> None:
        """Keep ``item``, popped from ``queue``, as a dead letter."""
        raise NotImplementedError

    def _key(self, name: str) -> str:
        return f"{self.global_keyprefix}{name}"

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

    def _fetch_more(self) -> None:
        """Record the BRPOP'd message as unacked and pop (and record) more, in one call."""
        assert self._brpop_message is not None
        tag, value = self._brpop_message
        room = self.qos.can_consume_max_estimate()
        want = 100 if room is None else max(0, room - 1)
        # The order BRPOP uses next: the queue just read from comes last (round robin).
        queues = self._queue_cycle.consume(len(self.active_queues))
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        raw = self._raw()
        if self._fetch_script is None:
            self._fetch_script = raw.register_script(FETCH_LUA)
        reply = self._fetch_script(
            keys=[self._key(self.unacked_key), self._key(self.unacked_index_key)]
            + [self._key(k) for k in keys],
            args=[want, time.time(), tag, value],
            client=raw,
        )
        prefix = len(self.global_keyprefix)
        for i in range(0, len(reply), 3):
            key = bytes_to_str(reply[i])[prefix:]
            queue = key.rsplit(self.sep, 1)[0]
            self._fetched.append((queue, reply[i + 1], int(reply[i + 2])))

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
            if flag == 1:
                self._prerecorded.add(payload["properties"]["delivery_tag"])
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                self._requeue_fetched()
                raise

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
                    self.qos.restore_by_tag(tag, leftmost=True)
