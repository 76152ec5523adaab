"""The edge of the ``taskrail`` command: strict input parsing, one-line errors, literal output.

- Numbers an operator types (task ids, client ids) are ASCII digits in 0..2**63-1 (the
  range of the database's ``BIGINT``); anything else is an :class:`InvalidNumber`.
- Settings that do not validate become one :class:`ConfigurationError` line naming the
  ``TASKRAIL_*`` variable, never echoing its value (it may be a password).
- Every error becomes one line on stderr and an exit code: 2 for input and configuration,
  1 for a server that is down (or anything else).
- Stored text is printed literally: never read as Rich markup, control characters shown
  escaped, and never cut when the output is not a terminal.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

from orchestration.errors import (
    MAX_ID,
    ConfigurationError,
    InputError,
    InvalidNumber,
    TaskrailError,
)
from orchestration.redact import redact_text

# Width of output that is not a terminal: wide enough that no id, name or timestamp is
# cut; a terminal's own width is used (and long cells fold onto the next line).
PIPE_WIDTH = 100_000
MAX_ERROR_CHARS = 500
DEBUG_HINT = "set TASKRAIL_LOG_LEVEL=DEBUG for details"


_ASCII_DIGITS = re.compile(r"[0-9]+")


def parse_number(text: str, what: str) -> int:
    """``text`` (surrounding spaces allowed) as an id in 0..2**63-1.

    Raises InvalidNumber for anything else: signs, ``1_000``, non-ASCII digits, floats,
    empty text, or a number out of range.
    """
    stripped = text.strip(" \t")
    if not _ASCII_DIGITS.fullmatch(stripped) or len(stripped) > 19:
        raise InvalidNumber(what, text)
    value = int(stripped)
    if value > MAX_ID:
        raise InvalidNumber(what, text)
    return value


def settings_error(exc: Any) -> ConfigurationError:
    """A pydantic ``ValidationError`` of :class:`Settings` as one line naming each variable.

    Only the variable names and pydantic's messages are used, never the input values.
    """
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        name = "TASKRAIL_" + "_".join(str(p) for p in error.get("loc", ())).upper()
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{name}: {message}")
    return ConfigurationError("invalid setting " + "; ".join(parts or ["(unknown)"]))


def exit_code(exc: TaskrailError) -> int:
    """2 for bad input or configuration, 1 for a server that is down (and the rest)."""
    return 2 if isinstance(exc, InputError | ConfigurationError) else 1


# Surrogates too (text from PDFs may hold them): no terminal encoding can print them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def one_line(text: str) -> str:
    """``text`` redacted, on one line, control characters escaped, cut to a sane length."""
    flat = " ".join(redact_text(text).split())
    flat = _CONTROL.sub(lambda m: repr(m.group())[1:-1], flat)
    if len(flat) > MAX_ERROR_CHARS:
        flat = flat[:MAX_ERROR_CHARS] + "..."
    return flat


def print_error(console: Console, message: str) -> None:
    """``error: <message>`` on one line, printed literally."""
    console.print(f"error: {one_line(message)}", markup=False, highlight=False, soft_wrap=True)


def unexpected_error_line(exc: BaseException) -> str:
    """The one line shown for an exception taskrail did not expect."""
    detail = one_line(str(exc))
    name = type(exc).__name__
    return (
        f"unexpected {name}: {detail} ({DEBUG_HINT})"
        if detail
        else f"unexpected {name} ({DEBUG_HINT})"
    )


def debug_requested() -> bool:
    """Whether the operator asked for details (read from the environment: the settings
    themselves may be what failed)."""
    return os.environ.get("TASKRAIL_LOG_LEVEL", "").strip().upper() == "DEBUG"


def make_console(*, stderr: bool = False) -> Console:
    """A console that prints whole lines when its stream is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(stderr=stderr, soft_wrap=True, width=None if tty else PIPE_WIDTH)


def literal(value: object, style: str = "") -> Text:
    """Stored text as a table cell: shown as stored, never read as markup.

    Control characters (an escape sequence in a stored reason could rewrite the
    operator's terminal) are shown escaped, as Python writes them.
    """
    text = "" if value is None else str(value)
    return Text(_CONTROL.sub(lambda m: repr(m.group())[1:-1], text), style=style)
