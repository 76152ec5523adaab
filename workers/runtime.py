"""Per-process resources of a worker: settings, database pool, publisher, identity.

Built lazily on the first hop in each process (after a prefork child is forked), so
no connection is opened at import time and none is shared across a fork.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

from celery import Celery, signals

from orchestration.agents import AgentSpec, Escalate, PermanentError, load_agent_modules
from orchestration.breakers import BreakerBoard, SharedBreaker
from orchestration.errors import TaskrailError
from orchestration.logging import get_logger
from orchestration.messaging.dispatch import Dispatcher, flush_deferred_pushes
from orchestration.ops import metrics
from orchestration.redact import redact_text
from orchestration.settings import Settings
from orchestration.store.db import ConnectionTimeouts, Database
from orchestration.store.keeper import LeaseKeeper
from orchestration.store.transitions import DEFAULT_LISTENERS, TransitionResult, TransitionStore
from workers.celery_app import worker_settings

log = get_logger("taskrail.worker")


@dataclass
class Runtime:
    settings: Settings
    db: Database
    dispatcher: Dispatcher
    worker: str  # host:pid, recorded on every event this process writes
    leases: LeaseKeeper
    breakers: BreakerBoard
    transitions: TransitionStore  # writes as ``worker``; logs and counts each transition

    def breaker_for(self, spec: AgentSpec) -> SharedBreaker:
        """The shared breaker guarding calls to ``spec``'s handler."""
        return self.breakers.breaker(
            spec.breaker_name,
            fail_max=spec.fail_max,
            reset_timeout_s=spec.reset_timeout_s,
            exclude=(Escalate, PermanentError, *spec.breaker_excludes),
            trial_lease_s=spec.time_limit_s + 10,
        )


_lock = threading.Lock()
_runtime: Runtime | None = None
_pid: int | None = None


def runtime(app: Celery) -> Runtime:
    """This process's runtime, built on first use."""
    global _runtime, _pid
    if _runtime is not None and _pid == os.getpid():
        return _runtime
    with _lock:
        if _runtime is None or _pid != os.getpid():
            settings = worker_settings()
            load_agent_modules(settings.agents)
            db = Database(
                settings.effective_database_url,
                pool_size=settings.db_pool_size,
                timeouts=ConnectionTimeouts.from_settings(settings, worker=True),
            )
            worker = f"{socket.gethostname()}:{os.getpid()}"
            _runtime = Runtime(
                settings=settings,
                db=db,
                dispatcher=Dispatcher(app),
                worker=worker,
                leases=LeaseKeeper(db, settings.lease_ttl_s, cancel_poll_s=settings.cancel_poll_s),
                breakers=BreakerBoard(
                    settings.redis_url,
                    namespace=settings.breaker_namespace,
                    on_state_change=lambda change: metrics.breaker_changed(change.name, change.new),
                ),
                transitions=TransitionStore(
                    db, worker=worker, listeners=(*DEFAULT_LISTENERS, count_transition)
                ),
            )
            _pid = os.getpid()
            freeze_heap()
    return _runtime


def count_transition(result: TransitionResult) -> None:
    """The transition store's listener for ``taskrail_transitions_total``."""
    metrics.transition(result.event, result.agent)


def freeze_heap() -> None:
    """Move everything alive now out of the garbage collector's sight.

    A worker's long-lived objects (Celery, kombu, SQLAlchemy, psycopg, the state
    machine classes) would otherwise be walked by every full collection, a pause that
    shows in a hop's tail latency (docs/design.md). Frozen, they are never collected
    (they live as long as the process anyway); what hops allocate is collected as
    before.
    """
    gc.collect()
    gc.freeze()


# Pools whose hops run in the worker's main process.
_IN_PROCESS_POOLS = ("celery.concurrency.solo", "celery.concurrency.thread")


@signals.worker_ready.connect
def _warm_up_and_freeze(sender: Any = None, **_: object) -> None:
    pool = getattr(sender, "pool", None)
    if type(pool).__module__ in _IN_PROCESS_POOLS and getattr(sender, "app", None):
        warm_up(sender.app)  # building the runtime freezes the heap
    else:
        freeze_heap()


def warm_up(app: Celery) -> None:
    """Build the runtime and check the schema before the first message, not in it.

    The first hop would otherwise import Alembic and connect (~0.5 s of CPU). Only in
    the process that runs the hops: a prefork parent must not hold connections its
    children would inherit. A database that is down now is only logged; the hops
    check again and retry.
    """
    try:
        runtime(app).db.ensure_schema()
    except Exception as err:
        log.warning("worker_warm_up_failed", error=str(err))


@signals.worker_process_init.connect
def _forget_parent_runtime(**_: object) -> None:
    # A forked child must not reuse its parent's pooled connections.
    global _runtime, _pid
    _runtime, _pid = None, None


@signals.worker_shutdown.connect
def _flush_held_pushes(**_: object) -> None:
    # Hop messages held for a loop turn that will not come (orchestration.messaging.redisbroker).
    flush_deferred_pushes()


def check_can_work(settings: Settings) -> None:
    """Raise what would keep this process from doing any hop: an agent module that cannot
    be imported (ConfigurationError), a database that cannot be reached
    (DatabaseUnavailable) or has no current schema (SchemaNotReady).

    Connects once and lets go: a prefork parent must not keep connections.
    """
    load_agent_modules(settings.agents)
    db = Database(
        settings.effective_database_url,
        pool_size=1,
        timeouts=ConnectionTimeouts.from_settings(settings),
    )
    try:
        db.ensure_schema()
    finally:
        db.dispose()


def refuse_to_start(process: str, err: BaseException) -> NoReturn:
    """Exit non-zero with one line saying why (Celery logs and swallows a signal
    handler's exceptions, and the process would run on unable to work)."""
    reason = redact_text(str(err)).strip().splitlines()
    line = reason[0] if reason else type(err).__name__
    if not isinstance(err, TaskrailError):
        line = f"{type(err).__name__}: {line}"
    sys.stderr.write(f"taskrail {process} cannot start: {line}\n")
    sys.stderr.flush()
    raise SystemExit(1)


@signals.worker_init.connect
def _load_agents_early(**_: object) -> None:
    # Fail at start-up, not on the first message: a worker that cannot work would take
    # messages and use them up.
    try:
        check_can_work(worker_settings())
    except Exception as err:
        refuse_to_start("worker", err)


@signals.beat_init.connect
def _check_beat_can_work(**_: object) -> None:
    try:
        check_can_work(worker_settings())
    except Exception as err:
        refuse_to_start("beat", err)
