"""structlog set-up: JSON lines in production, a console renderer on a terminal.

Every event passes through :func:`_redact`, so no database or Redis password reaches a
log line even when an exception message or a URL carries one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

from orchestration.redact import redact_fields, redact_text


def _redact(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return redact_fields(event_dict)  # structlog hands each event its own dict


def _hop_duration(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A hop binds ``hop_clock`` (perf_counter at its start); its lines show ``duration_ms``."""
    started = event_dict.pop("hop_clock", None)
    if started is not None:
        event_dict["duration_ms"] = round((time.perf_counter() - started) * 1000.0, 2)
    return event_dict


def _redact_rendered(_logger: Any, _name: str, line: Any) -> Any:
    """URLs inside a container or an object's repr only show once the line is rendered."""
    return redact_text(line) if isinstance(line, str) else line


class _RedactingFormatter(logging.Formatter):
    """Masks passwords in stdlib records (Celery's, kombu's, SQLAlchemy's)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def configure_logging(fmt: str = "auto", level: str = "INFO", stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a terminal).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _hop_duration,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
            _redact_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line: print() writes the newline apart, and prefork children
        # sharing stdout would interleave their JSON lines.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_taskrail", False):
            root.removeHandler(old)
    handler._taskrail = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
