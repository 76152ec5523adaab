"""Dead letters: bytes on a taskrail queue that are not a valid hop, kept for an operator.

Such bytes are logged (queue, a short redacted excerpt, the reason) and kept by the
store :func:`store_for` picks: the list ``<broker key prefix>taskrail.dead`` on a Redis
broker, JSON files under the data directory otherwise; at most
``DEAD_LETTER_MAX_ENTRIES`` entries of at most ``DEAD_LETTER_MAX_RAW_BYTES`` each. An
entry is a JSON object with ``at``, ``queue``, ``reason``, ``worker``, ``raw``,
``encoding`` (``text`` or ``base64``), ``size`` and ``truncated``. ``taskrail dead``
lists and purges them. Why: docs/design.md, "Dead letters".
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis

from orchestration import constants as c
from orchestration.errors import BrokerUnavailable, NotAHop
from orchestration.logging import get_logger
from orchestration.messaging.codec import loads
from orchestration.redact import redact_text, redact_url
from orchestration.settings import Settings

__all__ = [
    "DeadLetterStore",
    "FileDeadLetters",
    "RedisDeadLetters",
    "dead_letter",
    "decode_envelope",
    "excerpt",
    "make_entry",
    "printable",
    "store_for",
]

log = get_logger("taskrail.deadletters")

_REDIS_SCHEMES = ("redis:", "rediss:")
# Client timeouts of a store's own Redis connection (the CLI's, a hop's).
_SOCKET_TIMEOUT_S = 5.0
_CONNECT_TIMEOUT_S = 2.0


# -- what a valid envelope is ----------------------------------------------------------------


def decode_envelope(item: bytes | str) -> dict[str, Any]:
    """The kombu envelope in ``item`` (bytes popped from a queue), checked.

    The checks are what kombu's virtual transports and taskrail's Redis transport
    rely on before a message reaches Celery: a JSON object whose ``properties`` hold
    a string ``delivery_tag`` and a ``delivery_info`` with the exchange and routing
    key, ``headers`` an object, a string body in ``utf-8`` or strict ``base64``
    encoding, no compression (taskrail sends none). What the message asks of Celery
    (content type, task name, arguments) is checked by the worker's consumer.

    Raises NotAHop with the reason.
    """
    try:
        text = item.decode("utf-8") if isinstance(item, bytes | bytearray) else item
    except UnicodeDecodeError:
        raise NotAHop("not JSON (not UTF-8 text)") from None
    try:
        payload = loads(text)
    except Exception:  # kombu's decoder raises more than ValueError for odd objects
        raise NotAHop("not JSON") from None
    if not isinstance(payload, dict):
        raise NotAHop(f"JSON {type(payload).__name__}, not a message envelope (an object)")
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        raise NotAHop("not a message envelope: no properties object")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise NotAHop("not a message envelope: no delivery tag")
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        raise NotAHop("not a message envelope: no delivery_info object")
    if not isinstance(info.get("exchange"), str) or not isinstance(info.get("routing_key"), str):
        raise NotAHop("not a message envelope: delivery_info without exchange and routing key")
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise NotAHop("not a message envelope: headers are not an object")
    if headers and headers.get("compression") is not None:
        raise NotAHop("compressed body (taskrail accepts none)")
    for field in ("content-type", "content-encoding"):
        if not isinstance(payload.get(field), str | None):
            raise NotAHop(f"not a message envelope: {field} is not a string")
    body = payload.get("body")
    if body is None or body == "":
        return payload
    if not isinstance(body, str):
        raise NotAHop("not a message envelope: the body is not a string")
    encoding = properties.get("body_encoding")
    if encoding is None or (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        return payload
    if encoding != "base64":
        raise NotAHop(f"unknown body encoding {str(encoding)[:40]!r}")
    try:
        base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise NotAHop("body is not base64") from None
    return payload


# -- entries -----------------------------------------------------------------------------------


def worker_name() -> str:
    """``host:pid``, as the worker records itself on task events."""
    return f"{socket.gethostname()}:{os.getpid()}"


def make_entry(
    queue: str,
    reason: str,
    raw: bytes | str,
    worker: str | None = None,
    *,
    at: datetime | None = None,
) -> dict[str, Any]:
    """A dead-letter entry (see the module's docstring) for message ``raw``."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    size = len(data)
    kept = data[: c.DEAD_LETTER_MAX_RAW_BYTES]
    truncated = size > len(kept)
    text = _utf8(kept, truncated)
    entry: dict[str, Any] = {
        "at": (at or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "queue": str(queue),
        "reason": redact_text(str(reason))[: c.DEAD_LETTER_MAX_REASON_CHARS],
        "worker": worker or worker_name(),
    }
    if text is not None:
        entry.update(raw=redact_text(text), encoding="text")
    else:
        entry.update(raw=base64.b64encode(kept).decode("ascii"), encoding="base64")
    entry.update(size=size, truncated=truncated)
    return entry


def _utf8(data: bytes, truncated: bool) -> str | None:
    """``data`` as text, or None if it is not UTF-8 (a cut multi-byte character is dropped)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if truncated and err.start >= len(data) - 3 and err.reason == "unexpected end of data":
            return data[: err.start].decode("utf-8")
        return None


def printable(text: str, limit: int) -> str:
    """``text`` for a log line or a table: URL passwords masked, control characters
    written as escapes, at most ``limit`` characters (and "…" when there was more)."""
    text = redact_text(text)
    shown = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        for ch in text[:limit]
    )
    if len(text) > limit or len(shown) > limit:
        return shown[:limit] + "…"
    return shown


def excerpt(entry: Mapping[str, Any], limit: int = c.DEAD_LETTER_EXCERPT_CHARS) -> str:
    """The start of an entry's message, :func:`printable` (``base64:`` before bytes)."""
    raw = entry.get("raw")
    text = raw if isinstance(raw, str) else ""
    if entry.get("encoding") == "base64":
        text = "base64:" + text
    shown = printable(text, limit)
    if entry.get("truncated") and not shown.endswith("…"):
        shown += "…"
    return shown


def parse_entry(raw: bytes | str) -> dict[str, Any]:
    """A stored entry; one that is not (someone else's bytes) is shown as such."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        entry = None
    if isinstance(entry, dict):
        return entry
    return make_entry("?", "not a dead-letter entry", raw, worker="?")


# -- stores ------------------------------------------------------------------------------------


class DeadLetterStore(Protocol):
    """Where dead letters are kept. ``where`` names it for an operator."""

    where: str

    def add(self, entry: Mapping[str, Any]) -> None: ...

    def list(self, limit: int | None = None) -> list[dict[str, Any]]: ...

    def purge(self) -> int: ...


class RedisDeadLetters:
    """Dead letters in one Redis list, newest first, capped at ``max_entries``.

    Raises BrokerUnavailable when Redis cannot be reached.
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        *,
        max_entries: int = c.DEAD_LETTER_MAX_ENTRIES,
        where: str = "",
    ) -> None:
        self.client = client
        self.key = key
        self.max_entries = max_entries
        self.where = where or key

    @contextlib.contextmanager
    def _reaching(self) -> Any:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            raise BrokerUnavailable(self.where, redact_text(str(err))) from err

    def add(self, entry: Mapping[str, Any]) -> None:
        with self._reaching(), self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(self.key, orjson.dumps(dict(entry)))
            pipe.ltrim(self.key, 0, self.max_entries - 1)
            pipe.execute()

    def list(self, limit: int | None = None) -> list[dict[str, Any]]:
        stop = (limit if limit is not None else self.max_entries) - 1
        if stop < 0:
            return []
        with self._reaching():
            items = self.client.lrange(self.key, 0, stop)
        return [parse_entry(item) for item in items]

    def purge(self) -> int:
        with self._reaching(), self.client.pipeline(transaction=True) as pipe:
            pipe.llen(self.key)
            pipe.delete(self.key)
            count, _ = pipe.execute()
        return int(count)


class FileDeadLetters:
    """Dead letters as files in one folder (``<time>_<uuid>.json``), capped at ``max_entries``.

    Each is written to a temporary name and renamed, so a reader never sees half of one.
    """

    SUFFIX = ".json"

    def __init__(self, folder: Path | str, *, max_entries: int = c.DEAD_LETTER_MAX_ENTRIES) -> None:
        self.folder = Path(folder)
        self.max_entries = max_entries
        self.where = str(self.folder)

    def _names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.folder) if n.endswith(self.SUFFIX))
        except FileNotFoundError:
            return []

    def add(self, entry: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns() // 1000:020d}_{uuid.uuid4().hex}{self.SUFFIX}"
        partial = self.folder / (name + ".part")
        partial.write_bytes(orjson.dumps(dict(entry)))
        os.replace(partial, self.folder / name)
        names = self._names()
        for old in names[: max(0, len(names) - self.max_entries)]:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / old).unlink()

    def list(self, limit: int | None = None) -> list[dict[str, Any]]:
        names = self._names()[::-1]
        entries: list[dict[str, Any]] = []
        for name in names[: limit if limit is not None else self.max_entries]:
            try:
                entries.append(parse_entry((self.folder / name).read_bytes()))
            except FileNotFoundError:  # purged meanwhile
                continue
        return entries

    def purge(self) -> int:
        removed = 0
        for name in self._names():
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
                removed += 1
        return removed


def file_store_beside(queue_folder: Path | str) -> FileDeadLetters:
    """The embedded broker's store: ``dead/`` beside its ``queue/`` folder."""
    return FileDeadLetters(Path(queue_folder).parent / c.DEAD_LETTER_FOLDER)


def store_for(settings: Settings) -> DeadLetterStore:
    """The store of the broker ``settings`` name (see the module's docstring).

    Opens no connection until the store is used.
    """
    if settings.embedded:
        return file_store_beside(settings.broker_folder() / "queue")
    url = settings.effective_broker_url
    if url.startswith(_REDIS_SCHEMES):
        client = redis.Redis.from_url(
            url, socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=_CONNECT_TIMEOUT_S
        )
        key = settings.broker_key_prefix + c.DEAD_LETTER_KEY
        return RedisDeadLetters(client, key, where=f"{redact_url(url)} {key}")
    return FileDeadLetters(settings.data_dir / c.DEAD_LETTER_FOLDER)


def close_store(store: DeadLetterStore) -> None:
    """Release a store's connections (those :func:`store_for` opened)."""
    if isinstance(store, RedisDeadLetters):
        store.client.close()


# -- recording ---------------------------------------------------------------------------------


def dead_letter(
    store: DeadLetterStore | None,
    queue: str,
    reason: str,
    raw: bytes | str,
    *,
    worker: str | None = None,
) -> dict[str, Any]:
    """Log message ``raw`` from ``queue`` as a dead letter and keep it in ``store``.

    Never raises: a store that cannot be written is logged (the message is gone
    either way; the log line has its excerpt). Returns the entry.
    """
    entry = make_entry(queue, reason, raw, worker)
    log.warning(
        "dead_letter",
        queue=entry["queue"],
        reason=entry["reason"],
        excerpt=excerpt(entry),
        size=entry["size"],
    )
    if store is None:
        return entry
    try:
        store.add(entry)
    except Exception as err:  # a full disk, a broker gone: logged, the worker goes on
        log.error("dead_letter_not_kept", queue=entry["queue"], where=store.where, error=str(err))
    return entry
