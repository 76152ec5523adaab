"""The metrics endpoint behind ``taskrail metrics``: Prometheus text over HTTP, basic auth.

At each scrape it adds up the samples every worker process wrote to
``PROMETHEUS_MULTIPROC_DIR`` (:mod:`orchestration.ops.metrics`) and reads from the database:

- ``taskrail_tasks{state}``: tasks in each state (every state, cancelled included, zeros
  too);
- ``taskrail_tasks_stuck``: active tasks with nothing in flight (what the sweeper
  re-drives), ``taskrail_tasks_stuck_preclaimed`` those of them whose execute message
  is still queued or lost, ``taskrail_tasks_over_time_limit`` (in_progress under a live
  lease for longer than the agent's time limit) and ``taskrail_tasks_deferred`` (an open
  breaker or a retry backoff): :mod:`orchestration.ops.status`;
- ``taskrail_sweeper_last_run_timestamp_seconds``, ``..._age_seconds``,
  ``..._redriven`` and ``..._duration_seconds``: the sweeper's last pass (absent if it
  never ran), and ``taskrail_sweeper_late``: 1 when it has not run for
  ``SWEEPER_LATE_INTERVALS`` sweep intervals;
- ``taskrail_database_up``: 1 when those queries worked, else 0 (and no task gauges).

prometheus-client's own ``start_http_server`` has no authentication, so the registry's
WSGI app is served by wsgiref behind a basic-auth check. ``/healthz`` answers ``ok``
without credentials, for container health checks; it reveals nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from orchestration import constants as c
from orchestration.errors import ConfigurationError
from orchestration.logging import get_logger
from orchestration.ops.metrics import multiprocess_dir
from orchestration.ops.status import categories, counts_by_state, sweeper_status
from orchestration.store.db import Database

log = get_logger("taskrail.metrics")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
REALM = "taskrail metrics"


class DatabaseCollector:
    """Task gauges computed from the database when Prometheus scrapes."""

    def __init__(
        self,
        db: Database,
        *,
        redrive_after_s: float,
        sweep_interval_s: float = c.DEFAULT_SWEEP_INTERVAL_S,
    ) -> None:
        self.db = db
        self.redrive_after_s = redrive_after_s
        self.sweep_interval_s = sweep_interval_s

    def describe(self) -> list[Any]:
        return []  # nothing to check for duplicates; keeps register() from querying

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "taskrail_database_up", "1 when the task gauges could be read from the database."
        )
        try:
            counts = counts_by_state(self.db)
            found = categories(self.db, redrive_after_s=self.redrive_after_s)
            sweeper = sweeper_status(self.db, interval_s=self.sweep_interval_s)
        except Exception as err:
            log.warning("metrics_database_unavailable", error=f"{type(err).__name__}: {err}")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        tasks = GaugeMetricFamily(
            "taskrail_tasks", "Tasks in each state, read from the database.", labels=["state"]
        )
        for state, n in counts.items():
            tasks.add_metric([state], n)
        yield tasks
        for name, doc, value in (
            (
                "taskrail_tasks_stuck",
                "Active tasks with nothing in flight: what the sweeper re-drives.",
                found.stuck.count,
            ),
            (
                "taskrail_tasks_stuck_preclaimed",
                "Stuck tasks whose pre-claimed execute message is still queued, or lost.",
                found.stuck.preclaimed,
            ),
            (
                "taskrail_tasks_over_time_limit",
                "in_progress tasks under a live lease for longer than their agent's time limit.",
                found.over_time_limit.count,
            ),
            (
                "taskrail_tasks_deferred",
                "Active tasks waiting on an open breaker or a retry backoff.",
                found.deferred.count,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield from self._sweeper(sweeper)

    def _sweeper(self, sweeper: Any) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "taskrail_sweeper_late",
            f"1 when the sweeper has not run for {c.SWEEPER_LATE_INTERVALS} sweep intervals.",
            value=int(sweeper.late),
        )
        last = sweeper.last
        if last is None:
            return
        for name, doc, value in (
            (
                "taskrail_sweeper_last_run_timestamp_seconds",
                "When the sweeper's last pass ended (Unix time).",
                last.last_run_at.timestamp(),
            ),
            (
                "taskrail_sweeper_last_run_age_seconds",
                "Seconds since the sweeper's last pass ended.",
                sweeper.age_s,
            ),
            (
                "taskrail_sweeper_last_run_redriven",
                "Tasks the sweeper's last pass re-drove.",
                last.redriven,
            ),
            (
                "taskrail_sweeper_last_run_duration_seconds",
                "How long the sweeper's last pass took.",
                last.duration_s,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class _Forward:
    """Serves another registry's samples without registering anything in it."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from self.source.collect()


def build_registry(
    db: Database,
    *,
    redrive_after_s: float,
    folder: str | None,
    sweep_interval_s: float = c.DEFAULT_SWEEP_INTERVAL_S,
) -> Any:
    """The registry to serve: the database gauges, and every process's samples in ``folder``.

    Without ``folder`` (no multiprocess mode) the samples are this process's own.
    """
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    if folder:
        os.makedirs(folder, exist_ok=True)
        multiprocess.MultiProcessCollector(registry, path=folder)
    else:
        registry.register(_Forward(REGISTRY))  # this process's own samples
    registry.register(
        DatabaseCollector(db, redrive_after_s=redrive_after_s, sweep_interval_s=sweep_interval_s)
    )
    return registry


def parse_credentials(value: str) -> tuple[str, str]:
    """``user:password`` as a pair; raises ConfigurationError when it is not one."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigurationError("metrics credentials must look like user:password")
    return user, password


def _authorized(header: str, expected: bytes) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected)


def protect(app: WsgiApp, credentials: tuple[str, str] | None) -> WsgiApp:
    """``app`` behind HTTP basic auth (none when ``credentials`` is None); adds /healthz."""
    expected = f"{credentials[0]}:{credentials[1]}".encode() if credentials else None

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if expected is not None and not _authorized(
            environ.get("HTTP_AUTHORIZATION", ""), expected
        ):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", f'Basic realm="{REALM}"')],
            )
            return [b"authentication required\n"]
        if path not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; metrics are at /metrics\n"]
        return app(environ, start_response)

    return guarded


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_metrics_server(
    db: Database,
    *,
    host: str,
    port: int,
    credentials: tuple[str, str] | None,
    redrive_after_s: float,
    folder: str | None = None,
    sweep_interval_s: float = c.DEFAULT_SWEEP_INTERVAL_S,
) -> WSGIServer:
    """A server ready for ``serve_forever()``; raises ConfigurationError if it cannot listen.

    ``folder``: the multiprocess sample directory; default ``PROMETHEUS_MULTIPROC_DIR``.
    The over-time-limit gauge uses the time limits of the agents registered in this
    process (load TASKRAIL_AGENTS first).
    """
    from prometheus_client import make_wsgi_app

    folder = folder if folder is not None else multiprocess_dir()
    registry = build_registry(
        db, redrive_after_s=redrive_after_s, folder=folder, sweep_interval_s=sweep_interval_s
    )
    app = protect(make_wsgi_app(registry), credentials)
    try:
        return make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as err:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {err.strerror}") from err
