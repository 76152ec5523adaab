"""Sending hops: the Celery app configuration and the publisher producers use.

Producers send the first hop by its task name (``taskrail.assign``), so they never
import the hop code in ``workers``. The workers build their app from the same
:func:`celery_config`, so both sides agree on serializer, queues and routing.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError as KombuOperationalError

from orchestration import constants as c
from orchestration.errors import BrokerUnavailable
from orchestration.messaging import (
    codec,
    localbroker,  # noqa: F401  (registers the embedded transport)
    protocol,
    redisbroker,
)
from orchestration.redact import redact_text, redact_url
from orchestration.settings import Settings

HOP_QUEUES = {
    c.HOP_ASSIGN: c.QUEUE_HOPS,
    c.HOP_START: c.QUEUE_HOPS,
    c.HOP_EXECUTE: c.QUEUE_EXECUTE,
    c.SWEEP_TASK: c.QUEUE_CONTROL,
}


def _queue(name: str) -> Queue:
    """A hop queue: a direct exchange of the same name, routed by its name."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a real deployment; see docs/operations.md for each choice."""
    transport_options: dict[str, Any] = {}
    if settings.embedded:
        folder = settings.broker_folder()
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.05,
        }
    else:
        # A message unacknowledged for this long is redelivered: longer than any handler.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
        if settings.effective_broker_url.startswith("redis"):
            transport_options.update(redis_transport_options(settings))
            # Messages a dead worker held come back soon after the visibility timeout:
            # kombu looks for them every interval x throttle seconds (100 s by default).
            transport_options.update(
                unacked_restore_throttle=1,
                unacked_restore_interval=min(
                    c.UNACKED_RESTORE_INTERVAL_S, max(1, settings.visibility_timeout_s // 4)
                ),
            )
        if settings.broker_key_prefix and settings.effective_broker_url.startswith("redis"):
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    url = settings.effective_broker_url
    return {
        "broker_url": url,
        # Redis: kombu's transport with fewer round trips per message (redisbroker).
        "broker_transport": redisbroker.TRANSPORT if url.startswith(redisbroker.SCHEMES) else None,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # JSON only: a serializer that can build arbitrary objects turns the queue into
        # remote code execution.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Task events for Flower: JSON too, encoded by orjson (orchestration.messaging.codec).
        "event_serializer": codec.EVENTS_SERIALIZER,
        "result_backend": None,
        "task_ignore_result": True,
        # At-least-once: ack after the hop ran; a killed worker's message goes back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        # Flower sees every hop.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "task_queues": [_queue(name) for name in (c.QUEUE_HOPS, c.QUEUE_EXECUTE, c.QUEUE_CONTROL)],
        "task_default_exchange": c.QUEUE_HOPS,
        "task_default_routing_key": c.QUEUE_HOPS,
        "task_default_queue": c.QUEUE_HOPS,
        "task_routes": {name: {"queue": queue} for name, queue in HOP_QUEUES.items()},
        # A publish waits about publish_max_wait_s for a broker that is down, then fails
        # (a producer's task stays pending for the sweeper; a hop is retried).
        "task_publish_retry_policy": publish_retry_policy(settings.publish_max_wait_s),
        "broker_connection_timeout": c.BROKER_CONNECT_TIMEOUT_S,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def redis_keepalive_options() -> dict[int, int]:
    """TCP keepalive for a Redis connection (redis-py's ``socket_keepalive_options``)."""
    return {
        socket.TCP_KEEPIDLE: c.REDIS_KEEPALIVE_IDLE_S,
        socket.TCP_KEEPINTVL: c.REDIS_KEEPALIVE_INTERVAL_S,
        socket.TCP_KEEPCNT: c.REDIS_KEEPALIVE_COUNT,
    }


def redis_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport options that bound every wait on the broker.

    A blocking read (a publish, an ack) waits at most ``broker_socket_timeout_s``; the
    consumer's BRPOP asks the server for an answer within ``brpop_timeout`` (shorter), and
    kombu drops a BRPOP connection whose answer is ``health_check_interval`` overdue. An
    idle connection to a host that vanished is found by TCP keepalive. Getting a
    connection to a broker that is down is given up after ``publish_max_wait_s``.
    """
    return {
        "socket_timeout": settings.broker_socket_timeout_s,
        "socket_connect_timeout": c.BROKER_CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "socket_keepalive_options": redis_keepalive_options(),
        "health_check_interval": c.BROKER_HEALTH_CHECK_INTERVAL_S,
        "brpop_timeout": c.BROKER_BRPOP_TIMEOUT_S,
        # Connection.default_channel: how long to keep trying to connect, and how.
        "connect_retries_timeout": settings.publish_max_wait_s,
        "max_retries": 2,
        "interval_start": 0.0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    }


def publish_retry_policy(max_wait_s: float) -> dict[str, Any]:
    """Celery's retry policy of a publish that fails to connect: about ``max_wait_s``."""
    return {
        "max_retries": 2 if max_wait_s > 0 else 0,
        "interval_start": 0.0,
        "interval_step": max_wait_s / 4,
        "interval_max": max_wait_s / 2,
    }


def flush_deferred_pushes() -> None:
    """Send the hop messages this process holds for its event loop's next turn (a worker
    calls this when it shuts down: that turn will not come). Never raises: a message
    that cannot be sent is logged, and the sweeper re-drives its task."""
    redisbroker.flush_deferred_pushes()


def make_celery(settings: Settings, main: str = "taskrail") -> Celery:
    codec.install()
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


# What a broker that cannot be reached raises, on either path.
_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    KombuOperationalError,
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
# Options the direct Redis path understands; anything else goes through send_task.
_DIRECT_OPTIONS = frozenset({"time_limit", "soft_time_limit", "headers"})
PUBLISH_BATCH = 1000


def hop_batches(hop: str, args_list: Iterable[Sequence[Any]]) -> Iterator[tuple[str, list[bytes]]]:
    """``hop``'s messages for each of ``args_list``, encoded as the Redis transport puts
    them on their queue list: (queue, up to PUBLISH_BATCH envelopes), batch by batch.

    Raises TypeError for arguments JSON cannot encode.
    """
    queue = HOP_QUEUES.get(hop, c.QUEUE_HOPS)
    items = iter(args_list)
    lineage = protocol.current_lineage()
    while chunk := list(itertools.islice(items, PUBLISH_BATCH)):
        yield queue, protocol.encoded_envelopes(hop, chunk, queue, lineage=lineage)


class Dispatcher:
    """Publishes hop messages by task name.

    On taskrail's Redis transport a hop message is built by :mod:`orchestration.messaging.protocol`
    and pushed straight onto its queue (one LPUSH, or one pipeline for many); on any
    other broker it goes through ``Celery.send_task``. Both produce the same message.
    Safe to share between threads.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: redisbroker.Channel | None = None
        self._direct = str(app.conf.broker_transport or "") == redisbroker.TRANSPORT

    @property
    def where(self) -> str:
        return redact_url(str(self.app.conf.broker_url))

    def _redis_channel(self) -> redisbroker.Channel | None:
        """The channel of the direct path, connected on first use; None off Redis."""
        if not self._direct:
            return None
        channel = self._channel
        if channel is None:
            with self._lock:
                if self._channel is None:
                    try:
                        connection = self.app.connection_for_write()
                        self._channel = connection.default_channel
                        self._connection = connection
                    except _BROKER_ERRORS as err:
                        raise BrokerUnavailable(self.where, redact_text(str(err))) from err
                channel = self._channel
        return channel

    def send(
        self,
        hop: str,
        args: Sequence[Any],
        *,
        countdown: float | None = None,
        producer: Any = None,
        **options: Any,
    ) -> None:
        """Publish one hop message. Raises BrokerUnavailable."""
        queue = HOP_QUEUES.get(hop, c.QUEUE_HOPS)
        if producer is None and options.keys() <= _DIRECT_OPTIONS:
            channel = self._redis_channel()
            if channel is not None:
                message = protocol.envelope(hop, args, queue, countdown=countdown, **options)
                self._push(channel, [(queue, message)])
                return
        try:
            self.app.send_task(
                hop,
                args=list(args),
                queue=queue,
                routing_key=queue,
                countdown=countdown,
                producer=producer,
                ignore_result=True,
                **options,
            )
        except (KombuOperationalError, OSError) as err:
            raise BrokerUnavailable(self.where, redact_text(str(err))) from err

    def _push(self, channel: redisbroker.Channel, messages: Iterable[tuple[str, Any]]) -> None:
        try:
            channel.push(messages)
        except _BROKER_ERRORS as err:
            raise BrokerUnavailable(self.where, redact_text(str(err))) from err

    @property
    def direct(self) -> bool:
        """True on taskrail's Redis transport: hops are pushed onto their queue lists."""
        return self._direct

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (not those held by workers), or None if unknown."""
        # Declaring the queue as the workers do (idempotent) answers with its depth on
        # every transport; a passive declare fails on Redis for an empty (absent) list.
        try:
            with self.app.connection_for_read() as conn:
                declared = _queue(queue)(conn.default_channel).queue_declare()
            return int(declared.message_count)
        except Exception:  # a transport that cannot tell, or a broker that is down
            return None

    def send_many(self, hop: str, args_list: Iterable[Sequence[Any]]) -> int:
        """Publish many messages, pipelined where the transport can.

        On Redis up to 1,000 messages go in one round trip; other transports publish
        through one producer. Raises BrokerUnavailable.
        """
        channel = self._redis_channel()
        sent = 0
        if channel is not None:
            for queue, encoded in hop_batches(hop, args_list):
                self._push(channel, ((queue, message) for message in encoded))
                sent += len(encoded)
            return sent
        try:
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=1000):
                for args in args_list:
                    self.send(hop, args, producer=producer)
                    sent += 1
        except (KombuOperationalError, OSError) as err:
            raise BrokerUnavailable(self.where, redact_text(str(err))) from err
        return sent

    def close(self) -> None:
        """Release the direct path's connection (a new one is made on the next send)."""
        with self._lock:
            connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            connection.release()
