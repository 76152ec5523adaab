"""Sending hops: the Celery app configuration and the publisher producers use.

Producers send the first hop by its task name (``taskrail.assign``), so they never
import the hop code in ``workers``. The workers build their app from the same
:func:`celery_config`, so both sides agree on serializer, queues and routing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError as KombuOperationalError

from orchestration import constants as c
from orchestration import localbroker  # noqa: F401  (registers the embedded transport)
from orchestration.errors import BrokerUnavailable
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
        if settings.broker_key_prefix and settings.effective_broker_url.startswith("redis"):
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # JSON only: a serializer that can build arbitrary objects turns the queue into
        # remote code execution.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
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
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def make_celery(settings: Settings, main: str = "taskrail") -> Celery:
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class Dispatcher:
    """Publishes hop messages by task name."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @property
    def where(self) -> str:
        return redact_url(str(self.app.conf.broker_url))

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
        try:
            self.app.send_task(
                hop,
                args=list(args),
                queue=HOP_QUEUES.get(hop, c.QUEUE_HOPS),
                routing_key=HOP_QUEUES.get(hop, c.QUEUE_HOPS),
                countdown=countdown,
                producer=producer,
                ignore_result=True,
                **options,
            )
        except (KombuOperationalError, OSError) as err:
            raise BrokerUnavailable(self.where, redact_text(str(err))) from err

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
        """Publish many messages over one connection, pipelined where the transport can.

        On Redis, kombu's publish batch sends up to 1,000 messages per round trip; other
        transports publish one by one. Raises BrokerUnavailable.
        """
        sent = 0
        try:
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=1000):
                for args in args_list:
                    self.send(hop, args, producer=producer)
                    sent += 1
        except (KombuOperationalError, OSError) as err:
            raise BrokerUnavailable(self.where, redact_text(str(err))) from err
        return sent
