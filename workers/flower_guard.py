"""Flower behind authentication: ``celery -A workers flower`` refuses to serve without it.

Flower shows every hop with its arguments and can shut workers down; out of the box it
serves all of that on every interface to anyone, and its ``/metrics`` answers without
credentials even when basic auth is on. When the Celery app loads for the ``flower``
sub-command, :func:`guard_flower_command` makes Flower:

- refuse to start, with one line on stderr and exit code 2, unless ``FLOWER_BASIC_AUTH``
  (``user:password``, comma-separated for several) or Flower's OAuth (``--auth``) is set,
  or the operator says ``TASKRAIL_FLOWER_NO_AUTH=1`` (a trusted network only);
- listen on 127.0.0.1 unless ``--address``/``FLOWER_ADDRESS`` names another address;
- ask for credentials on ``/metrics`` like on every other page (``/healthcheck``, which
  answers ``OK`` and nothing else, and the static files stay open for health checks);
- keep its own Prometheus metrics in its process: with ``PROMETHEUS_MULTIPROC_DIR`` set
  they would land in the directory ``taskrail metrics`` serves.
"""

from __future__ import annotations

import os
import sys
from typing import Any

NO_AUTH_ENV = "TASKRAIL_FLOWER_NO_AUTH"
DEFAULT_ADDRESS = "127.0.0.1"
REFUSAL = (
    "error: Flower needs authentication: set FLOWER_BASIC_AUTH=user:password "
    f"(or {NO_AUTH_ENV}=1 to serve without it, on a trusted network only)"
)
BAD_CREDENTIALS = "error: FLOWER_BASIC_AUTH must be user:password (comma-separated for several)"


def guard_flower_command() -> None:
    """Install the guard when this process runs ``celery ... flower``; otherwise nothing.

    Celery loads the app (``-A workers``) inside its command group, whose click context
    already names the sub-command about to run.
    """
    try:
        import click
    except ImportError:  # pragma: no cover - celery depends on click
        return
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.invoked_subcommand != "flower":
        return
    try:
        import flower.command  # noqa: F401
    except ImportError:  # Flower is not installed: celery will say so itself
        return
    install()


def _refuse(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise SystemExit(2)


def check_options(options: Any) -> None:
    """Refuse (one line on stderr, exit 2) a Flower without authentication; default the
    address to 127.0.0.1. ``options`` are Flower's parsed tornado options."""
    basic = [entry for entry in (options.basic_auth or []) if entry is not None]
    if basic:
        for entry in basic:
            user, colon, password = str(entry).partition(":")
            if not (user and colon and password):
                _refuse(BAD_CREDENTIALS)
    elif not options.auth and os.environ.get(NO_AUTH_ENV, "").strip() != "1":
        _refuse(REFUSAL)
    if not options.address and not options.unix_socket:
        options.address = DEFAULT_ADDRESS


def install() -> None:
    """Make Flower's command build a guarded app, and ``/metrics`` ask for credentials."""
    import flower.command
    import flower.urls
    import prometheus_client.values
    from flower.app import Flower
    from flower.views.monitor import Metrics
    from tornado import web

    class AuthenticatedMetrics(Metrics):
        """Flower's ``/metrics``, behind the same authentication as its pages."""

        @web.authenticated
        async def get(self) -> None:
            await super().get()

    class GuardedFlower(Flower):
        def __init__(self, options: Any = None, capp: Any = None, **kwargs: Any) -> None:
            if options is not None:
                check_options(options)
            # Flower's metrics are made with the app (flower.events); made in-process they
            # stay out of PROMETHEUS_MULTIPROC_DIR, which `taskrail metrics` serves.
            prometheus_client.values.ValueClass = prometheus_client.values.MutexValue
            super().__init__(options=options, capp=capp, **kwargs)

    handlers = flower.urls.handlers
    for i, handler in enumerate(handlers):
        if isinstance(handler, tuple) and handler[1] is Metrics:
            handlers[i] = (handler[0], AuthenticatedMetrics, *handler[2:])
    flower.command.Flower = GuardedFlower
