"""Loaded into worker processes by tests (via TASKRAIL_AGENTS): publishes every hop twice.

After each hop message a worker sends, the same hop with the same arguments is sent
again as a second, independent message: what at-least-once delivery can do.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import signals

_local = threading.local()


@signals.after_task_publish.connect
def _publish_again(
    sender: str | None = None, body: Any = None, headers: Any = None, **_: Any
) -> None:
    if not sender or not sender.startswith("taskrail.") or getattr(_local, "busy", False):
        return
    from workers import app

    args, kwargs = (body[0], body[1]) if isinstance(body, list | tuple) else ([], {})
    _local.busy = True
    try:
        app.send_task(sender, args=args, kwargs=kwargs, eta=(headers or {}).get("eta"))
    finally:
        _local.busy = False
