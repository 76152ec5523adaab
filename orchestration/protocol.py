"""Celery task messages (protocol 2) for kombu's virtual transports, built directly.

``Celery.send_task`` spends several hundred microseconds per message on routing,
option merging, signals, ``saferepr`` of the arguments and kombu's entity copies,
all of which are the same for every hop. :func:`envelope` builds the same message
a worker receives from ``send_task`` (the headers, properties and body that
``celery.app.amqp.AMQP.as_task_v2`` makes, in kombu's virtual-transport envelope)
from the few things that vary: task name, arguments, queue, countdown, time limits.
:mod:`orchestration.redisbroker` pushes it onto the queue.

The message format is Celery's documented protocol 2; the hop arguments are JSON
(the only serializer the workers accept). Messages sent from inside a hop carry
its ``root_id`` and ``parent_id``, as Celery's own would, so Flower shows a task's
hops as one tree.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from celery._state import get_current_worker_task

__all__ = ["current_lineage", "envelope"]

# Celery's default argsrepr_maxsize: what Flower and the logs show of the arguments.
ARGSREPR_MAX = 1024
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_origin: tuple[int, str] | None = None


def origin() -> str:
    """``gen<pid>@<host>``, the origin Celery writes for a client that is not a worker."""
    global _origin
    pid = os.getpid()
    if _origin is None or _origin[0] != pid:
        _origin = (pid, f"gen{pid}@{socket.gethostname()}")
    return _origin[1]


def current_lineage() -> tuple[str | None, str | None]:
    """(root_id, parent_id) for a message sent now: the running hop's, or none."""
    current = get_current_worker_task()
    if current is not None and current.request.id:
        return current.request.root_id or current.request.id, current.request.id
    return None, None


def envelope(
    name: str,
    args: Sequence[Any],
    queue: str,
    *,
    countdown: float | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    headers: dict[str, Any] | None = None,
    lineage: tuple[str | None, str | None] | None = None,
) -> dict[str, Any]:
    """The kombu envelope of one task message for ``queue`` (default exchange).

    ``headers`` are added to Celery's (a worker sees them on ``task.request``).
    ``lineage`` is :func:`current_lineage`, for a caller that builds many messages.

    Raises TypeError for arguments JSON cannot encode.
    """
    task_id = str(uuid.uuid4())
    eta = None
    if countdown:
        eta = (datetime.now(UTC) + timedelta(seconds=countdown)).isoformat()
    root_id, parent_id = lineage if lineage is not None else current_lineage()
    root_id = root_id or task_id
    args = list(args)
    body = orjson.dumps([args, {}, _EMBED])
    argsrepr = repr(args)
    if len(argsrepr) > ARGSREPR_MAX:
        argsrepr = argsrepr[: ARGSREPR_MAX - 3] + "..."
    message: dict[str, Any] = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": name,
            "id": task_id,
            "shadow": None,
            "eta": eta,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [time_limit, soft_time_limit],
            "root_id": root_id,
            "parent_id": parent_id,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": origin(),
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            # Unique per message as kombu's own uuid4 is; a restored copy keeps it.
            "delivery_tag": task_id,
        },
    }
    if headers:
        message["headers"] = {**message["headers"], **headers}
    return message
