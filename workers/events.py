"""Task events for Flower, sent in batches on a timer instead of on every loop turn.

This consumer step keeps every event and its order but flushes at most every
``FLUSH_INTERVAL_S`` (or when ``BUFFER_LIMIT`` events are waiting), as one
``task.multi`` message that Flower and ``celery events`` unpack as usual. Events reach
Flower up to that much later. Why: docs/design.md, "Performance choices".
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.worker.consumer.events import Events

FLUSH_INTERVAL_S = 0.1
BUFFER_LIMIT = 500


class BatchedEvents(bootsteps.StartStopStep):
    """Replaces the event dispatcher's flush-on-every-turn with a short timer."""

    requires = (Events,)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self._scheduled = False
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None or c.hub is None or not dispatcher.enabled:
            return
        hub = c.hub
        dispatcher.buffer_limit = BUFFER_LIMIT
        self._scheduled = False

        def flush() -> None:
            self._scheduled = False
            current = c.event_dispatcher
            if current is not None:
                current.flush()

        def schedule() -> None:
            if not self._scheduled:
                self._scheduled = True
                hub.call_later(FLUSH_INTERVAL_S, flush)

        dispatcher.on_send_buffered = schedule

    def stop(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is not None:
            dispatcher.flush()
