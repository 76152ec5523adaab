"""``taskrail web``: the web console (:mod:`orchestration.ops.web`), served by uvicorn."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from orchestration.errors import ConfigurationError
from orchestration.ops.cli.app import app, command, current_client, current_settings, err

DEFAULT_WEB_HOST = "127.0.0.1"
DEFAULT_WEB_PORT = 8080


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``. Raises ConfigurationError if it cannot."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except (OSError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigurationError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


@app.command()
@command
def web(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (0.0.0.0: every interface).")
    ] = DEFAULT_WEB_HOST,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = (
        DEFAULT_WEB_PORT
    ),
) -> None:
    """Serve the web console: tasks, their timelines, the escalation inbox.

    Basic auth with TASKRAIL_WEB_AUTH=user:password (required); the user name is
    recorded as who made each move.
    """
    import uvicorn

    from orchestration.logging import configure_logging
    from orchestration.ops.web import create_app, parse_credentials

    settings = current_settings(ctx)
    if settings.web_auth is None:
        raise ConfigurationError(
            "TASKRAIL_WEB_AUTH is not set: give it as user:password "
            "(the console has no other access control)"
        )
    credentials = parse_credentials(settings.web_auth.get_secret_value())
    sock = listen(host, port)
    configure_logging(settings.log_format, settings.log_level)
    console = create_app(current_client(ctx), credentials)
    config = uvicorn.Config(
        console,
        host=host,
        port=port,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=10,
        log_level=settings.log_level.lower(),
    )
    err.print(
        f"serving the console on http://{host}:{port}/ (basic auth as {credentials.user})",
        markup=False,
        highlight=False,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
