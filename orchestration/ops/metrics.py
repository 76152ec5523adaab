"""Prometheus metrics: the metric objects and the one-line functions that record them.

::

    metrics.transition("complete", "payroll_agent")      # workers.runtime, per transition
    metrics.hop_duration("execute", 0.012)               # workers.hops.hop_scope, per hop
    metrics.attempt("payroll_agent", "succeeded")         # the execute hop, per handler call
    metrics.deferral("payroll_agent")                     # the execute hop, per deferral
    metrics.breaker_changed("agent:payroll_agent", "open")  # gauge and counter, per change
    metrics.breaker_state("agent:payroll_agent", "open")  # the gauge alone

Prefork workers run each hop in a child process, so the counters live in
prometheus-client's multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set (before
the process starts), every process writes its samples to files in that directory and
``taskrail metrics`` (:mod:`orchestration.ops.exposition`) adds them up at scrape time. The
files are named by host and pid, so worker containers sharing one volume never
collide. Without the variable the samples stay in the process that made them.

prometheus-client is imported on the first recording, not when this module is
imported: producers that only submit never pay for it. Recording never raises: a
metric that cannot be written (the directory was removed, the disk is full) is logged
once per process and the hop goes on.
"""

from __future__ import annotations

import os
import socket
import threading

from orchestration.logging import get_logger

log = get_logger("taskrail.metrics")

__all__ = [
    "BREAKER_STATE_VALUES",
    "HOP_DURATION_BUCKETS_S",
    "attempt",
    "breaker_changed",
    "breaker_state",
    "deferral",
    "hop_duration",
    "multiprocess_dir",
    "transition",
]

# Hops take milliseconds; an execute hop lasts as long as its agent's handler.
_BUCKETS_MS = (2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
HOP_DURATION_BUCKETS_S = tuple(ms / 1000 for ms in _BUCKETS_MS)
# taskrail_breaker_state's value for each breaker state; -1 for anything else.
BREAKER_STATE_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The shared sample directory (``PROMETHEUS_MULTIPROC_DIR``), or None."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


class _Metrics:
    """The metric objects, built once per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        folder = multiprocess_dir()
        if folder:
            os.makedirs(folder, exist_ok=True)
            # Files are named "<kind>_<identity>.db"; pids alone repeat across containers.
            host = socket.gethostname().replace("_", "-") or "host"
            values.ValueClass = values.MultiProcessValue(lambda: f"{host}-{os.getpid()}")
        self.transitions = Counter(
            "taskrail_transitions",
            "Task transitions written, by event and agent.",
            ["event", "agent"],
        )
        self.hop_duration = Histogram(
            "taskrail_hop_duration_seconds",
            "Wall time of one hop, from message to done, by hop.",
            ["hop"],
            buckets=HOP_DURATION_BUCKETS_S,
        )
        self.attempts = Counter(
            "taskrail_attempts",
            "Handler calls, by agent and outcome.",
            ["agent", "outcome"],
        )
        self.deferrals = Counter(
            "taskrail_deferrals",
            "Execute hops put off because the agent's breaker was open, by agent.",
            ["agent"],
        )
        self.breaker_state = Gauge(
            "taskrail_breaker_state",
            "Breaker state by name as last seen: 0 closed, 1 half-open, 2 open.",
            ["name"],
            multiprocess_mode="mostrecent",
        )
        self.breaker_changes = Counter(
            "taskrail_breaker_changes",
            "Breaker state changes, by name and the state entered.",
            ["name", "state"],
        )


_metrics: _Metrics | None = None
_lock = threading.Lock()
_broken = False


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def _failed(what: str, err: Exception) -> None:
    global _broken
    if not _broken:
        _broken = True
        log.warning("metrics_unavailable", metric=what, error=f"{type(err).__name__}: {err}")


def transition(event: str, agent: object) -> None:
    """Count one transition written (``agent`` may be None); the worker runtime registers
    it as a listener of its transition store."""
    try:
        _get().transitions.labels(event, agent or "").inc()
    except Exception as err:
        _failed("transitions", err)


def hop_duration(hop: str, seconds: float) -> None:
    """Observe how long one hop took."""
    try:
        _get().hop_duration.labels(hop).observe(seconds)
    except Exception as err:
        _failed("hop_duration", err)


def attempt(agent: str, outcome: str) -> None:
    """Count one handler call of ``agent`` and how it ended.

    ``outcome``: ``succeeded``, ``escalated``, ``permanent_error``, ``transient_error``,
    ``timed_out``, ``died`` (the handler's process) or ``cancelled`` (the task was
    cancelled while the handler ran: its outcome was discarded).
    """
    try:
        _get().attempts.labels(agent, outcome).inc()
    except Exception as err:
        _failed("attempts", err)


def deferral(agent: str) -> None:
    """Count one execute hop deferred because ``agent``'s breaker refused the call."""
    try:
        _get().deferrals.labels(agent).inc()
    except Exception as err:
        _failed("deferrals", err)


def breaker_state(name: str, state: str) -> None:
    """Set breaker ``name``'s gauge to ``state`` (closed, half-open, open). Idempotent."""
    try:
        _get().breaker_state.labels(name).set(BREAKER_STATE_VALUES.get(state, -1.0))
    except Exception as err:
        _failed("breaker_state", err)


def breaker_changed(name: str, state: str) -> None:
    """Record that breaker ``name`` entered ``state``: sets the gauge, counts the change.

    Call it once per change, where the change is made (the breaker board's
    ``on_state_change``, in the process that made it).
    """
    breaker_state(name, state)
    try:
        _get().breaker_changes.labels(name, state).inc()
    except Exception as err:
        _failed("breaker_changes", err)
