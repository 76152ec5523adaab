"""The console's Starlette app: routes, templates, and how an error becomes a page.

:func:`create_app` builds it around one :class:`~orchestration.api.Taskrail` (the
database and broker every move goes through) and the console's credentials. The
pages are in :mod:`.pages`, the moves (POSTs) in :mod:`.actions`, the JSON mirrors in
:mod:`.jsonapi`. Every request passes :class:`~.guard.BasicAuthGuard` first.

A TaskrailError becomes its one-line message on the page, with 404 (no such task),
409 (the task's state does not allow the move), 400 (other bad input), or 503 (a
server is down); anything unexpected a 500 page that says only that (the details go
to the log, redacted).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from orchestration.api import Taskrail
from orchestration.errors import (
    AlreadyClaimed,
    InfrastructureError,
    InputError,
    NotClaimed,
    TaskNotFound,
    TaskrailError,
    WrongState,
)
from orchestration.logging import get_logger
from orchestration.models import TaskStatus
from orchestration.ops.breaker_views import Breakers
from orchestration.ops.cli_edge import one_line
from orchestration.ops.web.guard import BasicAuthGuard, Credentials, CsrfTokens

log = get_logger("taskrail.web")

PACKAGE = "orchestration.ops.web"
STATE_COLOURS = tuple(s.value for s in TaskStatus)


def status_for(err: BaseException) -> int:
    """The HTTP status a TaskrailError answers with."""
    if isinstance(err, TaskNotFound):
        return 404
    if isinstance(err, WrongState | AlreadyClaimed | NotClaimed):
        return 409
    if isinstance(err, InputError):
        return 400
    if isinstance(err, InfrastructureError):
        return 503
    return 500


def error_line(err: BaseException) -> str:
    """The one line a page shows for ``err``: redacted, flat, cut short."""
    if isinstance(err, TaskrailError):
        return one_line(str(err))
    return f"unexpected {type(err).__name__}; the console's log has the details"


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime | None) -> str:
    if value is None:
        return ""
    seconds = max(0, int((datetime.now(UTC) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def make_templates() -> jinja2.Environment:
    """The templates, autoescaped (every stored text is escaped; no ``|safe`` anywhere)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(PACKAGE, "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, ago=_ago, pretty=_pretty)
    env.globals.update(states=STATE_COLOURS)
    return env


@dataclass
class Console:
    """What every handler shares: the producer API, the templates, the guards."""

    trail: Taskrail
    credentials: Credentials
    csrf: CsrfTokens
    breakers: Breakers
    templates: jinja2.Environment

    @property
    def database(self) -> str:
        """Where the database is, any password masked."""
        return self.trail.settings.describe()["database_url"] or ""

    def render(
        self,
        request: Request,
        name: str,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        user = getattr(request.state, "user", "")
        context.setdefault("flash", None)
        context.setdefault("error", None)
        html = self.templates.get_template(name).render(
            user=user,
            csrf=self.csrf.issue(user),
            path=request.url.path,
            database=self.database,
            **context,
        )
        # A stored lone surrogate cannot be UTF-8: shown escaped, never a failed page.
        body = html.encode("utf-8", "backslashreplace")
        return HTMLResponse(body, status_code=status_code, headers=headers)

    def error_page(self, request: Request, err: BaseException, status_code: int) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": error_line(err)}, status_code=status_code)
        if request.headers.get("hx-request") == "true":
            return self.render(
                request,
                "_flash.html",
                status_code,
                headers={"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"},
                error=error_line(err),
            )
        return self.render(request, "error.html", status_code, error=error_line(err))


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def _taskrail_error(request: Request, exc: Exception) -> Response:
    status = status_for(exc)
    if status >= 500:
        log.warning("web_error", path=request.url.path, error=str(exc), kind=type(exc).__name__)
    return console_of(request).error_page(request, exc, status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "no such page", 405: "method not allowed here"}
    message = messages.get(exc.status_code, str(exc.detail))
    response = console_of(request).error_page(
        request, InputError(message), exc.status_code if exc.status_code < 600 else 400
    )
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("web_unexpected_error", path=request.url.path, error=repr(exc), exc_info=exc)
    return console_of(request).error_page(request, exc, 500)


def create_app(
    trail: Taskrail,
    credentials: Credentials,
    *,
    breakers: Breakers | None = None,
    csrf: CsrfTokens | None = None,
) -> Starlette:
    """The console as an ASGI app. ``trail``'s settings say where the breakers are
    (``breakers`` replaces that, for tests). The app closes what it opened on shutdown,
    not ``trail``."""
    from orchestration.ops.web import actions, jsonapi, pages

    console = Console(
        trail=trail,
        credentials=credentials,
        csrf=csrf or CsrfTokens(credentials),
        breakers=breakers or Breakers(trail.settings),
        templates=make_templates(),
    )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        console.breakers.close()

    routes = [
        *pages.routes(),
        *actions.routes(),
        *jsonapi.routes(),
        Mount("/static", StaticFiles(packages=[(PACKAGE, "static")]), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BasicAuthGuard, credentials=credentials)],
        exception_handlers={
            TaskrailError: _taskrail_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    console.templates.globals["moves_for"] = pages.moves_for
    app.state.console = console
    return app
