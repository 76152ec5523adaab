"""JSON for kombu messages through orjson, wherever that gives kombu's own result.

Every message a worker takes is JSON twice: the transport's envelope and the task's
body, both decoded by ``kombu.utils.json.loads``, whose ``object_hook`` runs in Python
for every object in the text. :func:`loads` decodes the same text with orjson and
returns exactly what kombu's would:

- text that could hold one of kombu's typed values (``{"__type__": ...}``, or any
  ``\\u`` escape, which could spell that key) takes kombu's path;
- so does anything orjson refuses (``NaN``, integers beyond 64 bits, lone surrogates,
  bad UTF-8, malformed text), and kombu's path raises its own error for what is not
  JSON at all.

:func:`install` makes it the decoder for ``application/json`` in kombu's registry (the
encoder stays kombu's: what producers send is unchanged) and registers
``taskrail-json``, the encoder the workers' event dispatcher uses for Flower's task
events: orjson for plain values, kombu's encoder for anything else.
"""

from __future__ import annotations

from typing import Any

import orjson
from kombu import serialization
from kombu.utils import json as kombu_json

EVENTS_SERIALIZER = "taskrail-json"
CONTENT_TYPE = "application/json"

# Values kombu's encoder writes as typed objects (and orjson would write otherwise)
# go to kombu's encoder; so do subclasses of str/int/dict/list, and non-str keys.
# (orjson raises TypeError for those: _refuse is its ``default``.)
_STRICT = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)


def loads(s: str | bytes | bytearray | memoryview) -> Any:
    """``kombu.utils.json.loads``, through orjson where that gives the same result."""
    if isinstance(s, memoryview | bytearray):
        s = bytes(s)
    if isinstance(s, str):
        plain = "__type__" not in s and "\\u" not in s
    else:
        plain = b"__type__" not in s and b"\\u" not in s
    if plain:
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError:
            pass  # kombu's path decides: NaN, big integers, or an error of its own
    return kombu_json.loads(s)


def _refuse(obj: Any) -> Any:
    raise TypeError(type(obj).__name__)


def dumps(obj: Any) -> str:
    """Task events as JSON: orjson for plain values, kombu's encoder for the rest.

    For the workers' event dispatcher only, whose fields are Celery's own (strings,
    numbers, None, lists and dicts of them). Where orjson and kombu would differ
    (datetimes, subclasses of str/int/dict/list, non-str keys, integers beyond 64
    bits) kombu's encoder runs; a NaN would be written as null and a UUID as its
    string, which Celery's events never hold.
    """
    try:
        return orjson.dumps(obj, default=_refuse, option=_STRICT).decode()
    except TypeError:
        return kombu_json.dumps(obj)


def install() -> None:
    """Decode ``application/json`` with :func:`loads`; register :data:`EVENTS_SERIALIZER`.

    Safe to call more than once. kombu maps a content type to the name registered
    last, so ``json`` is registered again after ``taskrail-json``.
    """
    registry = serialization.registry
    registry.register(EVENTS_SERIALIZER, dumps, loads, CONTENT_TYPE, "utf-8")
    registry.register("json", kombu_json.dumps, loads, CONTENT_TYPE, "utf-8")
