"""What a task may hold, and how it is stored: one set of rules for producer, worker
and transition store.

Payloads and results are JSON objects with string keys, integers in -2**63..2**64-1,
finite floats and at most ``MAX_JSON_DEPTH`` levels, within ``MAX_PAYLOAD_BYTES`` /
``MAX_RESULT_BYTES`` as stored; anything else is refused with the path of the first
value at fault. NUL, surrogates and U+E000 are stored escaped as U+E000 plus four hex
digits, undone by :func:`read_json` and :func:`read_text`. The rules and their reasons:
docs/design.md, "Values".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, overload

import orjson

from orchestration import constants as c
from orchestration.errors import (
    InputError,
    InvalidClientId,
    InvalidIdempotencyKey,
    InvalidPayload,
    InvalidTaskType,
    ResultRejected,
    short_repr,
)

__all__ = [
    "ESCAPE",
    "StoredJson",
    "check_client_id",
    "check_idempotency_key",
    "check_task_row",
    "check_task_type",
    "encode_payload",
    "encode_result",
    "escape_text",
    "read_json",
    "read_text",
    "storable_text",
]

ESCAPE = "\ue000"
_NEEDS_ESCAPE = re.compile("[\x00\ud800-\udfff\ue000]")
_ESCAPED = re.compile("\ue000([0-9a-f]{4})")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_INT_MIN, _INT_END = -(2**63), 2**64
_BIG_FLOAT = 1e16  # orjson writes floats this large with an exponent ("1e+16")

# orjson's output needs the Python walk when it holds a NUL, the escape character or a
# float with a positive exponent (the hint may also come from inside a string: then the
# walk finds nothing to change, at some cost).
_NUL_HINT, _ESCAPE_HINT, _EXPONENT_HINT = b"\\u0000", ESCAPE.encode(), b"e+"
# Subclasses, dataclasses and datetimes go to _refuse (and so to the Python walk).
_STRICT = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


@dataclass(frozen=True, slots=True)
class StoredJson:
    """A JSON value checked and encoded for storage: ``text`` goes to the column as it is."""

    text: str


# -- text ----------------------------------------------------------------------------


def _escape_char(match: re.Match[str]) -> str:
    return f"{ESCAPE}{ord(match.group()):04x}"


def escape_text(text: str) -> str:
    """``text`` with NUL, surrogates and U+E000 escaped (see the module's docstring)."""
    if text.isascii() and "\x00" not in text:
        return text
    return _NEEDS_ESCAPE.sub(_escape_char, text)


def _storable_as_is(text: str) -> bool:
    """No NUL and no surrogate: a text column takes ``text`` as it is."""
    return _UNSTORABLE.search(text) is None


def _unescape_char(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


@overload
def read_text(text: str) -> str: ...


@overload
def read_text(text: None) -> None: ...


def read_text(text: str | None) -> str | None:
    """Stored text as it was given: the escapes of :func:`escape_text` undone."""
    if text is None or ESCAPE not in text:
        return text
    return _ESCAPED.sub(_unescape_char, text)


def storable_text(text: object, max_chars: int = c.MAX_REASON_CHARS) -> str:
    """Free text (a reason, an error) as a text column can hold it: at most ``max_chars``
    characters of it (a longer text is cut and says so), escaped."""
    text = text if isinstance(text, str) else str(text)
    if len(text) > max_chars:
        text = f"{text[:max_chars]}… [cut: {len(text)} characters in all]"
    return escape_text(text)


def read_json(value: Any) -> Any:
    """A stored JSON value as it was given: the escapes in its strings and keys undone.

    Returns ``value`` itself when nothing in it is escaped.
    """
    if isinstance(value, str):
        return read_text(value)
    if isinstance(value, dict):
        out = {read_text(k): read_json(v) for k, v in value.items()}
        return out if _changed(out, value) else value
    if isinstance(value, list):
        items = [read_json(v) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value


def _changed(out: dict[Any, Any], value: dict[Any, Any]) -> bool:
    return any(
        k1 is not k2 or v1 is not v2
        for (k1, v1), (k2, v2) in zip(out.items(), value.items(), strict=True)
    )


# -- JSON ----------------------------------------------------------------------------


def _refuse(obj: Any) -> Any:
    raise TypeError(type(obj).__name__)


def _where(path: list[str | int]) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else _key_part(p) for p in path]
    if len(parts) > 12:
        parts = [*parts[:5], f"...({len(parts) - 10} more)...", *parts[-5:]]
    return "$" + "".join(parts)


def _key_part(key: str) -> str:
    if key.isidentifier() and key.isascii():
        return f".{key}"
    return f"[{short_repr(key)}]"


class _Walk:
    """The rules applied in Python: a clean copy of a value (strings escaped, big floats
    as fragments orjson writes as they are), or ``error(reason)`` for the first fault."""

    def __init__(self, error: Callable[[str], InputError], *, escape: bool = True) -> None:
        self.error = error
        self.escape = escape
        self.path: list[str | int] = []

    def refuse(self, what: str) -> InputError:
        return self.error(f"{what} at {_where(self.path)}")

    def text(self, value: str, what: str) -> str:
        value = value if type(value) is str else str.__str__(value)
        if self.escape:
            return escape_text(value)
        if not (value.isascii() or _storable_as_is(value.replace("\x00", ""))):
            raise self.refuse(f"a surrogate in {what}")  # stored text: none, unless SQLite's
        return value

    def clean(self, value: Any, depth: int = 0) -> Any:
        if value is None or value is True or value is False:
            return value
        if isinstance(value, str):
            return self.text(value, "a string")
        if isinstance(value, int):
            if not _INT_MIN <= value < _INT_END:
                raise self.refuse("an integer outside the 64-bit range")
            return int(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.refuse(f"{value!r}, not a finite number,")
            value = float(value)
            if abs(value) >= _BIG_FLOAT:
                return orjson.Fragment(f"{int(value)}.0")
            return value
        if isinstance(value, Mapping | list | tuple):
            if depth >= c.MAX_JSON_DEPTH:
                raise self.refuse(f"a value nested deeper than {c.MAX_JSON_DEPTH} levels")
            return self.container(value, depth + 1)
        raise self.refuse(f"a value of type {type(value).__name__}, not JSON,")

    def container(self, value: Mapping[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> Any:
        path = self.path
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise self.refuse(
                        f"key {short_repr(key)}, not a string (JSON object keys are strings),"
                    )
                path.append(key)
                out[self.text(key, "a key")] = self.clean(item, depth)
                path.pop()
            return out
        items = []
        for i, item in enumerate(value):
            path.append(i)
            items.append(self.clean(item, depth))
            path.pop()
        return items


def _same(data: bytes, value: Any) -> bool:
    """orjson's text reads back as ``value`` (not so for NaN, an Enum, a UUID, a tuple)."""
    try:
        return bool(orjson.loads(data) == value)
    except Exception:  # an __eq__ of the caller's that raises: the walk decides
        return False


def _encode(value: Any, limit: int, error: Callable[[str], InputError]) -> str:
    try:
        data: bytes | None = orjson.dumps(value, default=_refuse, option=_STRICT)
    except TypeError:  # orjson.JSONEncodeError too: depth, big integers, surrogates
        data = None
    if (
        data is None
        or _NUL_HINT in data
        or _ESCAPE_HINT in data
        or _EXPONENT_HINT in data
        or not _same(data, value)
    ):
        data = orjson.dumps(_Walk(error).clean(value))
    if len(data) > limit:
        raise error(f"larger than {limit} bytes as JSON ({len(data)} bytes)")
    return data.decode()


def encode_payload(payload: Any) -> StoredJson:
    """A task's payload as stored (None is ``{}``). Raises InvalidPayload with the reason."""
    if payload is None:
        return StoredJson("{}")
    if not isinstance(payload, Mapping):
        raise InvalidPayload(f"must be a JSON object, got {type(payload).__name__}")
    return StoredJson(_encode(payload, c.MAX_PAYLOAD_BYTES, InvalidPayload))


def encode_result(result: Any) -> StoredJson:
    """A handler's result as stored; a StoredJson is returned as it is.

    Raises ResultRejected with the reason (the path of the value at fault, or the size).
    """
    if isinstance(result, StoredJson):
        return result
    return StoredJson(_encode(result, c.MAX_RESULT_BYTES, ResultRejected))


# -- the other fields of a task --------------------------------------------------------


def check_client_id(client_id: Any) -> int:
    """A client id: an integer from 0 to 2**63-1 (not a bool). Raises InvalidClientId."""
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        raise InvalidClientId(client_id)
    if not 0 <= client_id <= c.MAX_CLIENT_ID:
        raise InvalidClientId(client_id)
    return int(client_id)


def check_task_type(task_type: Any) -> str:
    """A task type's form: a string of 1 to 64 characters, no NUL or surrogate.

    Whether an agent handles it is the registry's question. Raises InvalidTaskType.
    """
    if (
        not isinstance(task_type, str)
        or not 0 < len(task_type) <= c.MAX_TASK_TYPE_CHARS
        or not _storable_as_is(task_type)
    ):
        raise InvalidTaskType(task_type)
    return str(task_type)


def check_idempotency_key(key: Any) -> str | None:
    """None, or a string of 1 to 255 characters without NUL or surrogates.

    Raises InvalidIdempotencyKey.
    """
    if key is None:
        return None
    limit = c.MAX_IDEMPOTENCY_KEY_CHARS
    if not isinstance(key, str) or not 0 < len(key) <= limit:
        raise InvalidIdempotencyKey(
            f"must be a non-empty string of at most {limit} characters, got {short_repr(key)}"
        )
    if not _storable_as_is(key):
        raise InvalidIdempotencyKey("must not hold NUL or surrogate characters")
    return str(key)


def check_task_row(client_id: Any, task_type: Any, payload: Any) -> None:
    """Check a task row as a worker loaded it (the payload as stored), by the rules the
    producer applied: a row that fails could not have been accepted, and cannot run.

    Raises InvalidClientId, InvalidTaskType or InvalidPayload, with the reason.
    """
    check_client_id(client_id)
    check_task_type(task_type)
    if not isinstance(payload, Mapping):
        raise InvalidPayload(f"must be a JSON object, got {type(payload).__name__}")
    try:
        data = orjson.dumps(payload, default=_refuse, option=_STRICT)
    except TypeError:
        data = orjson.dumps(_Walk(InvalidPayload, escape=False).clean(payload))
    if len(data) > c.MAX_PAYLOAD_BYTES:
        raise InvalidPayload(f"larger than {c.MAX_PAYLOAD_BYTES} bytes as JSON ({len(data)} bytes)")
