"""Keep secrets out of anything printed or logged."""

from __future__ import annotations

import functools
import re
from collections.abc import MutableMapping
from typing import Any

# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?=@)")
_SECRET_KEYS = frozenset({"password", "passwd", "secret", "token", "api_key", "authorization"})
MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, url)


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it masked."""
    if "://" not in text:  # no URL, nothing to mask (most log fields)
        return text
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


@functools.lru_cache(maxsize=4096)
def names_secret(key: str) -> bool:
    """Whether a field called ``key`` holds a secret (a log line's keys are few and repeat)."""
    return key.lower() in _SECRET_KEYS


# Values that can never carry a secret of their own (their key still can).
_PLAIN = (int, float, bool, type(None))


def redact_value(key: str, value: Any) -> Any:
    """A log field's value, masked when its key names a secret or it holds a URL."""
    if names_secret(key) and value is not None:
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, BaseException):
        return redact_text(str(value))
    return value


def redact_fields(fields: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """:func:`redact_value` applied to every field of ``fields``, in place."""
    for key, value in fields.items():
        if names_secret(key) and value is not None:
            fields[key] = MASK
        elif type(value) is str:
            if "://" in value:
                fields[key] = redact_text(value)
        elif not isinstance(value, _PLAIN):
            fields[key] = redact_value(key, value)
    return fields
