"""Keep secrets out of anything printed or logged.

A secret can sit in text in three forms, and each is masked wherever it appears (a
URL on its own, or inside an error message or a rendered log line):

- the password of a URL's user information, ``scheme://user:password@host``, even
  when the password holds an unescaped ``@`` (the host is after the *last* ``@``);
- a query parameter or keyword with a secret-looking name, ``?password=...``,
  ``&token=...``, or a libpq keyword string ``host=h password=...``;
- a log field whose key names a secret (``password``, ``db_password``, ...).
"""

from __future__ import annotations

import functools
import re
from collections.abc import MutableMapping
from typing import Any

MASK = "***"

# Characters that end a URL embedded in text: whitespace, quotes and brackets (not valid in
# a URL unescaped, and the delimiters of JSON log lines and reprs).
_URL_END = r"\s\"'<>`\\"
# scheme://userinfo@host...: the userinfo runs to the last "@" before the URL ends.
_URL_USERINFO = re.compile(rf"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^{_URL_END}]*)@")
_SECRET_WORDS = (
    "password", "passwd", "pass", "pwd", "secret", "token", "api_key", "apikey",
    "access_key", "secret_key", "access_token", "auth", "authorization", "credentials",
    "private_key", "sslpassword", "client_secret",
)  # fmt: skip
# name=value where the name is a secret word (or ends in one: db_password, x-api-key);
# the value is a quoted string or runs to the next "&" (a URL's query) or the end of the
# URL or word; a password's own ",", ";" or "#" stays masked.
_KEY_VALUE = re.compile(
    r"(?P<head>(?<![\w.\-])(?:[\w.\-]*[_\-.])?(?:"
    + "|".join(re.escape(w) for w in _SECRET_WORDS)
    + rf")\s*=\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^&{_URL_END}]+)",
    re.IGNORECASE,
)
_SECRET_KEYS = frozenset(_SECRET_WORDS)
_SECRET_SUFFIXES = tuple(f"_{w}" for w in _SECRET_WORDS)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    user, colon, _password = userinfo.partition(":")
    if not colon:  # a user name alone is no secret
        return match.group(0)
    return f"{match.group('head')}{user}:{MASK}@"


def _mask_value(match: re.Match[str]) -> str:
    value = match.group("value")
    if value == MASK or value.startswith(("*", "'*", '"*')):  # masked already
        return match.group(0)
    return match.group("head") + MASK


def redact_text(text: str) -> str:
    """``text`` with every secret in it masked: URL passwords and ``name=secret`` pairs.

    Never raises; text with nothing secret comes back unchanged.
    """
    if "://" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _KEY_VALUE.sub(_mask_value, text)
    return text


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (user information or query)."""
    return redact_text(url)


@functools.lru_cache(maxsize=4096)
def names_secret(key: str) -> bool:
    """Whether a field called ``key`` holds a secret (a log line's keys are few and repeat)."""
    lowered = key.lower().replace("-", "_")
    return lowered in _SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


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
            if "://" in value or "=" in value:
                fields[key] = redact_text(value)
        elif not isinstance(value, _PLAIN):
            fields[key] = redact_value(key, value)
    return fields
