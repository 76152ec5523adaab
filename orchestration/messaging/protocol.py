"""Celery task messages (protocol 2) for kombu's virtual transports, built directly.

``Celery.send_task`` spends most of a publish on routing, option merging, signals,
``saferepr`` of the arguments and kombu's entity copies, all of which are the same
for every hop. :func:`envelope` builds the same message
a worker receives from ``send_task`` (the headers, properties and body that
``celery.app.amqp.AMQP.as_task_v2`` makes, in kombu's virtual-transport envelope)
from the few things that vary: task name, arguments, queue, countdown, time limits.
:mod:`orchestration.messaging.redisbroker` pushes it onto the queue.

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
    argsrepr = _argsrepr(args)
    message: dict[str, Any] = {
        "body": _body(args),
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


def uuid4_strings(n: int) -> list[str]:
    """``n`` random version-4 UUIDs as strings, as ``str(uuid.uuid4())`` makes them.

    One ``os.urandom`` call for all of them instead of one per id.
    """
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
    hexed = raw.hex()
    out = []
    for i in range(0, 32 * n, 32):
        h = hexed[i : i + 32]
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


# Stand-ins for the values that differ between the messages of one batch; the
# template is the envelope encoded once with these in place.
_SLOTS = ("body", "id", "root", "argsrepr")
_MARK = "\u2063taskrail-slot-{}\u2063"


def encoded_envelopes(
    name: str,
    args_list: Sequence[Sequence[Any]],
    queue: str,
    *,
    lineage: tuple[str | None, str | None] | None = None,
) -> list[bytes]:
    """:func:`envelope` for each of ``args_list``, already encoded (JSON bytes).

    For a batch of messages that differ only in their arguments (``submit_many``'s
    first hops): the envelope is encoded once with stand-ins, and each message is that
    template with its body, ids and argument repr spliced in. Decoding one gives what
    ``envelope(name, args, queue, lineage=lineage)`` gives, but for the random id.

    Raises TypeError for arguments JSON cannot encode.
    """
    root_id, parent_id = lineage if lineage is not None else current_lineage()
    marks = {slot: _MARK.format(slot) for slot in _SLOTS}
    reference = envelope(name, [], queue, lineage=(marks["root"], parent_id))
    reference["body"] = marks["body"]
    reference["headers"]["id"] = marks["id"]
    reference["headers"]["argsrepr"] = marks["argsrepr"]
    reference["properties"]["correlation_id"] = marks["id"]
    reference["properties"]["delivery_tag"] = marks["id"]
    # The encoded reference, cut at each stand-in (quotes included): the pieces
    # between them and which value goes in each gap.
    text = orjson.dumps(reference).decode()
    quoted = {slot: f'"{mark}"' for slot, mark in marks.items()}
    gaps = sorted((at, slot) for slot, q in quoted.items() for at in _find_all(text, q))
    pieces, order, start = [], [], 0
    for at, slot in gaps:
        pieces.append(text[start:at])
        order.append(_SLOTS.index(slot))
        start = at + len(quoted[slot])
    pieces.append(text[start:])
    if len(order) != 6:  # the id three times, body, root and argsrepr once each
        raise AssertionError(f"unexpected envelope template: {len(order)} gaps")
    p0, p1, p2, p3, p4, p5, p6 = pieces
    o0, o1, o2, o3, o4, o5 = order
    out: list[bytes] = []
    for args, task_id in zip(args_list, uuid4_strings(len(args_list)), strict=True):
        if type(args) is not list:
            args = list(args)
        v = (
            '"' + _body(args) + '"',
            '"' + task_id + '"',
            '"' + (root_id or task_id) + '"',
            orjson.dumps(_argsrepr(args)).decode(),
        )
        out.append(
            "".join((p0, v[o0], p1, v[o1], p2, v[o2], p3, v[o3], p4, v[o4], p5, v[o5], p6)).encode()
        )
    return out


def _body(args: list[Any]) -> str:
    """The message body: Celery's (args, kwargs, embed), JSON, base64 as kombu sends it."""
    return base64.b64encode(orjson.dumps([args, {}, _EMBED])).decode()


def _argsrepr(args: list[Any]) -> str:
    """What Flower and the logs show of the arguments, cut as Celery cuts it."""
    text = repr(args)
    return text if len(text) <= ARGSREPR_MAX else text[: ARGSREPR_MAX - 3] + "..."


def _find_all(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at >= 0:
        found.append(at)
        at = text.find(needle, at + len(needle))
    return found
