"""Who may use the console and how a page's forms prove they came from it.

- :class:`BasicAuthGuard`: HTTP basic auth on every request (pages, static files, the
  JSON API and unknown paths alike): 401 with ``WWW-Authenticate`` unless the request
  carries the ``TASKRAIL_WEB_AUTH`` credentials, compared in constant time. The user
  name is the person acting (``request.state.user``). It also adds the security
  headers to every response (a CSP that allows this origin's scripts and styles only).
- :class:`CsrfTokens`: each page's forms carry a token bound to the user and signed
  with a key derived from the credentials (so it survives a restart and holds in every
  process serving the same console); every POST must bring it back (a form field, or
  the ``X-CSRF-Token`` header htmx sends), and its Origin (or Referer) must be this
  host: :func:`same_origin`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from orchestration.errors import ConfigurationError, InputError
from orchestration.filters import check_actor

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
Asgi = Callable[[Scope, Receive, Send], Any]

REALM = "taskrail console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
CSRF_MAX_AGE_S = 12 * 3600
# A token dated this far ahead of the clock is refused (clock steps between processes).
_CSRF_SKEW_S = 300

SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)


@dataclass(frozen=True)
class Credentials:
    """The one ``user:password`` the console accepts; the user is who acts."""

    user: str
    password: str = field(repr=False)

    @property
    def expected(self) -> bytes:
        return f"{self.user}:{self.password}".encode()


def parse_credentials(value: str) -> Credentials:
    """``user:password`` (``TASKRAIL_WEB_AUTH``) as :class:`Credentials`.

    The user name is recorded as the actor of every move made in the console, so it
    must be one (printable, at most MAX_ACTOR_CHARS). Raises ConfigurationError (never
    echoing the value: it holds a password).
    """
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigurationError("TASKRAIL_WEB_AUTH must look like user:password")
    try:
        if check_actor(user) != user:
            raise ConfigurationError("TASKRAIL_WEB_AUTH: the user name has surrounding spaces")
    except InputError as err:
        raise ConfigurationError(f"TASKRAIL_WEB_AUTH: the user name is not usable: {err}") from None
    return Credentials(user, password)


def _given(scope: Scope) -> bytes | None:
    """The ``user:password`` bytes of the request's basic-auth header, if it has one."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, encoded = value.partition(b" ")
            if scheme.lower() != b"basic":
                return None
            try:
                return base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
    return None


async def _send_401(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode()),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"authentication required\n"})


class BasicAuthGuard:
    """ASGI middleware: every HTTP request authenticated, every response hardened."""

    def __init__(self, app: Asgi, credentials: Credentials) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _given(scope)
        if given is None or not secrets.compare_digest(given, self.credentials.expected):
            await _send_401(send)
            return
        scope.setdefault("state", {})["user"] = self.credentials.user

        async def hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"cache-control"]
                message["headers"] = [*headers, *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, hardened)


class CsrfTokens:
    """Tokens for a user's forms: ``<issued at>.<HMAC(user, issued at)>``."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        max_age_s: float = CSRF_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = hmac.digest(b"taskrail web csrf", credentials.expected, hashlib.sha256)
        self.max_age_s = max_age_s
        self.clock = clock

    def _sign(self, user: str, issued: int) -> str:
        mac = hmac.digest(self._key, f"{user}\n{issued}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self, user: str) -> str:
        issued = int(self.clock())
        return f"{issued}.{self._sign(user, issued)}"

    def valid(self, user: str, token: object) -> bool:
        """Whether ``token`` was issued to ``user`` by this console, and is recent."""
        if not isinstance(token, str) or len(token) > 100:
            return False
        issued_text, dot, mac = token.partition(".")
        if not dot or not issued_text.isascii() or not issued_text.isdigit():
            return False
        issued = int(issued_text)
        age = self.clock() - issued
        if not -_CSRF_SKEW_S <= age <= self.max_age_s:
            return False
        return secrets.compare_digest(mac.encode(), self._sign(user, issued).encode())


def _netloc(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts.netloc.lower() or None


def same_origin(headers: Any, host: str) -> bool:
    """Whether a POST comes from a page of this host (``host``: its Host header).

    A browser sends Origin with a POST (and Sec-Fetch-Site): a cross-site or opaque
    (``null``) origin is refused, and so is a Referer of another host. A request with
    neither header (not a browser's) is left to the CSRF token. The scheme is not
    compared: a proxy in front may terminate TLS.
    """
    if headers.get("sec-fetch-site", "") == "cross-site":
        return False
    wanted = host.lower()
    origin = headers.get("origin")
    if origin is not None:
        return _netloc(origin) == wanted
    referer = headers.get("referer")
    if referer is not None:
        return _netloc(referer) == wanted
    return True
