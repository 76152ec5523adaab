"""The Celery app that ``celery -A workers`` finds (``workers.app``).

Configuration comes from :func:`orchestration.messaging.dispatch.celery_config`, the same the
producers use, from the ``TASKRAIL_*`` environment read once when the app is built
(:func:`worker_settings` hands them to the rest of the worker).

Its consumer (:class:`Consumer`) keeps every message that is not a valid hop as a dead
letter (:mod:`orchestration.messaging.deadletters`) and goes on consuming; the transports do the
same for bytes that are not a message envelope at all.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from typing import Any

import click
import orjson
from celery import Celery, concurrency, signals
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import DecodeError
from kombu.utils import json as kombu_json
from vine import promise

from orchestration import constants as c
from orchestration.errors import NotAHop
from orchestration.logging import configure_logging
from orchestration.messaging import deadletters
from orchestration.messaging.dispatch import make_celery
from orchestration.settings import Settings, get_settings

_logger = logging.getLogger("taskrail.consumer")

JSON = "application/json"
# The third part of a task body: a hop carries no callbacks, chain or chord.
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
_OPTIONAL_TEXT_HEADERS = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr")


def hop_problem(message: Any) -> str | None:
    """Why ``message`` is not a hop message Celery can run, or None.

    Checked before Celery looks at the message: its content type first (JSON only, so
    nothing else is ever decoded), then the headers Celery reads without checking, then
    the body (``[args, kwargs, embed]``). An unregistered task name is Celery's to find
    (:meth:`Consumer.on_unknown_task`). Raises DecodeError for a body that is not JSON.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return "headers are not an object"
    if message.content_type != JSON:
        return f"content type {str(message.content_type)[:60]!r} is not accepted (JSON only)"
    name = headers.get("task")
    if not isinstance(name, str) or not name:
        return "no task name in the headers (not a Celery task message)"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "no task id in the headers"
    for key in _OPTIONAL_TEXT_HEADERS:
        if not isinstance(headers.get(key), str | None):
            return f"header {key} is not a string"
    retries = headers.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        return "header retries is not a count"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(v is None or (type(v) in (int, float) and v >= 0) for v in limits)
    ):
        return "header timelimit is not [hard, soft]"
    body = message.decode()
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "body is not [args, kwargs, embed]"
    if embed is not None and (
        not isinstance(embed, dict)
        or not embed.keys() <= _EMBED_KEYS
        or any(v is not None for v in embed.values())
    ):
        return "a hop carries no callbacks, errbacks, chain or chord"
    return None


def message_bytes(message: Any) -> bytes:
    """What arrived, as near to its bytes as the consumer can tell: the kombu envelope
    of a virtual transport (Redis, file system), else headers, properties and body."""
    raw = getattr(message, "_raw", None)
    if not isinstance(raw, dict):
        body = message.body
        if isinstance(body, bytes | bytearray | memoryview):
            body = bytes(body)
            try:
                body = {"text": body.decode("utf-8")}
            except UnicodeDecodeError:
                body = {"base64": base64.b64encode(body).decode("ascii")}
        raw = {
            "headers": message.headers,
            "properties": message.properties,
            "content-type": message.content_type,
            "content-encoding": message.content_encoding,
            "body": body,
        }
    return _json_bytes(raw)


def _json_bytes(value: Any) -> bytes:
    """``value`` as JSON: orjson, else kombu's encoder (integers beyond 64 bits), else repr."""
    try:
        return orjson.dumps(value, default=repr, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        pass
    try:
        return kombu_json.dumps(value).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return repr(value).encode("utf-8", "backslashreplace")


_store_lock = threading.Lock()
_store: tuple[int, deadletters.DeadLetterStore] | None = None


def process_store() -> deadletters.DeadLetterStore:
    """This process's dead-letter store, from its settings (built on first use)."""
    global _store
    with _store_lock:
        if _store is None or _store[0] != os.getpid():
            _store = (os.getpid(), deadletters.store_for(worker_settings()))
        return _store[1]


def dead_letter_message(message: Any, reason: str) -> None:
    """Keep ``message`` as a dead letter: in its broker's store, else the process's."""
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    queue = info.get("routing_key") or info.get("exchange") or "?"
    channel_store = getattr(message.channel, "dead_letters", None)
    try:
        store = channel_store() if callable(channel_store) else process_store()
    except Exception:  # a channel that is gone: the process's own store
        store = process_store()
    deadletters.dead_letter(store, str(queue), reason, message_bytes(message))


def dead_letter_hop(task: Any, reason: str) -> None:
    """Keep a hop whose arguments do not parse as a dead letter (it is acked, never run).

    The message itself is no longer at hand: the entry holds its task name, id and
    arguments as Celery decoded them.
    """
    request = task.request
    info = request.delivery_info if isinstance(request.delivery_info, dict) else {}
    raw = {"task": task.name, "id": request.id, "args": request.args, "kwargs": request.kwargs}
    data = _json_bytes(raw)
    deadletters.dead_letter(process_store(), str(info.get("routing_key") or "?"), reason, data)


class Consumer(CeleryConsumer):
    """Celery's consumer, with every message that is not a valid hop kept as a dead letter.

    Celery's own hooks for a message it cannot use (``on_decode_error``,
    ``on_unknown_message``, ``on_unknown_task``, ``on_invalid_task``) log it and drop
    it; here each also keeps it as a dead letter and rejects it (never requeued). Before
    Celery sees a message, :func:`hop_problem` checks what Celery would read without
    checking (a header of the wrong type, a body that is not ``[args, kwargs,
    embed]``), where an exception would escape the event loop and stop the worker.
    """

    def _drop(self, message: Any, reason: str) -> None:
        dead_letter_message(message, reason)
        if not message.acknowledged:
            message.reject_log_error(_logger, self.connection_errors)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._drop(message, f"body is not JSON: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._drop(message, "not a task message")
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name, task_id = headers.get("task"), headers.get("id")
        self._drop(message, f"unregistered task {str(name)[:100]!r}")
        signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=task_id)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, NotAHop) else f"invalid task message: {exc}"
        self._drop(message, reason)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)
        recoverable = tuple(self.connection_errors or ()) + tuple(self.channel_errors or ())

        def on_task_received(message: Any) -> Any:
            try:
                problem = hop_problem(message)
            except DecodeError as exc:
                return self.on_decode_error(message, exc)
            if problem is not None:
                return self.on_invalid_task(None, message, NotAHop(problem))
            try:
                return handle(message)
            except recoverable:
                raise
            except Exception as exc:
                # Celery could not turn the message into a request (it catches only
                # some errors of a malformed message): it is not a hop this worker
                # can run. One it had already acknowledged ran; that error is Celery's.
                if message.acknowledged:
                    raise
                return self.on_invalid_task(None, message, exc)

        return on_task_received


_settings: Settings | None = None


def worker_settings() -> Settings:
    """The settings this process's app was built with (read once, by :func:`create_app`)."""
    assert _settings is not None, "importing workers builds the app (create_app)"
    return _settings


def create_app(settings: Settings | None = None) -> Celery:
    """The worker's Celery app; ``settings`` default to the ``TASKRAIL_*`` environment,
    read here once for the process (:func:`worker_settings`)."""
    global _settings
    settings = _settings = settings or get_settings()
    app = make_celery(settings, main="taskrail")
    app.conf.update(
        include=["workers.hops", "workers.sweeper"],
        # Keeps what is not a valid hop as a dead letter instead of stopping.
        worker_consumer=f"{__name__}:Consumer",
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        beat_schedule={
            "taskrail-sweep": {
                "task": "taskrail.sweep",
                "schedule": settings.sweep_interval_s,
                "options": {"expires": settings.sweep_interval_s * 2},
            }
        },
    )
    from workers.events import BatchedEvents

    app.steps["consumer"].add(BatchedEvents)
    return app


@signals.setup_logging.connect
def _setup_logging(**_: object) -> None:
    # taskrail's structlog set-up replaces Celery's own logging configuration.
    settings = worker_settings()
    configure_logging(settings.log_format, settings.log_level)


@signals.import_modules.connect
def _make_data_dir(**_: object) -> None:
    # Beat keeps its schedule file in TASKRAIL_DATA_DIR and does not create the folder.
    worker_settings().data_dir.mkdir(parents=True, exist_ok=True)


def pool_left_to_default(app: Celery) -> bool:
    """True when this ``celery worker`` command was given no pool: no ``--pool`` / ``-P``
    on its command line, no ``CELERY_WORKER_POOL`` in its environment and no
    ``worker_pool`` in the app's configuration. False for a worker built without the
    command line (``app.Worker(...)``, Celery's test worker): its caller chose."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or "worker_pool" in app.conf.changes:
        return False
    return ctx.get_parameter_source("pool") is click.core.ParameterSource.DEFAULT


def pool_name(pool_cls: Any) -> str:
    """Celery's short name of a pool class (``solo``, ``prefork``, ``threads``, ...)."""
    if isinstance(pool_cls, str):
        return pool_cls
    target = f"{pool_cls.__module__}:{pool_cls.__qualname__}"
    names = [name for name, path in concurrency.ALIASES.items() if path == target]
    return sorted(names, key=lambda name: name == "processes")[0] if names else target


@signals.worker_init.connect
def _default_pool(sender: Any = None, **_: object) -> None:
    # `celery -A workers worker` with no --pool runs taskrail's default pool instead of
    # Celery's prefork (constants.DEFAULT_WORKER_POOL); the worker turns the name into
    # the pool class just after this signal.
    if sender is not None and pool_left_to_default(sender.app):
        sender.pool_cls = c.DEFAULT_WORKER_POOL


@signals.worker_ready.connect
def _announce_ready(sender: Any = None, **_: object) -> None:
    from orchestration.logging import get_logger

    controller = getattr(sender, "controller", None)
    pool_cls = getattr(controller, "pool_cls", None)
    get_logger("taskrail.worker").info(
        "worker_ready",
        node=getattr(sender, "hostname", None),
        pool=pool_name(pool_cls) if pool_cls is not None else None,
    )


app = create_app()
