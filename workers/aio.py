"""The async executor: ``async def`` handlers run on one event loop per worker process,
thousands at a time, the database lease as their claim.

::

    execute hop (a pool thread)             event loop (one thread)     outcome threads
    ---------------------------             -----------------------     ---------------
    breaker, lease taken (as for any run)
    a slot free? (else the hop waits:
      the worker takes no more messages)
    hand the call over, return ------------> task = handler(view)
    (the message is acknowledged)            time limit timer
                                             cancel: the lease keeper
                                               sets the run's stop ---->
                                             ended, or cancelled --------> breaker verdict
                                                                           outcome written
                                                                           lease let go,
                                                                           slot freed

The message is acknowledged once the call is handed over: from then on the **lease**
is the claim. The worker's lease keeper renews it while the call runs; if the process
dies the renewals stop, the lease expires and the sweeper re-drives the task, whose
next execute hop takes the dead run's lease over (docs/design.md, "Recovery"). So a
SIGKILL mid-call costs what it costs on any executor: the call runs again, once.

Turn it on with ``celery -A workers worker --async-calls N`` (or
``TASKRAIL_ASYNC_CALLS=N``): at most N calls in flight in the process. Off (0, the
default) an async handler runs in its hop's thread on a loop of its own
(:mod:`workers.calls`), as a sync handler does. ``--sync-calls M`` (or
``TASKRAIL_SYNC_CALLS``) hands sync handlers over too, to handler threads (at most M),
their end reported to the loop, which keeps their time limit and cancel (a thread cannot
be stopped: the run is settled at once and what it returns later is discarded). A worker
started with no pool flag (taskrail's default pool, solo) hands both over by default
(``PLAIN_WORKER_LIMITS``). A task that runs isolated (a process of its own) is called in
the hop's thread as before.

Time limit: at ``time_limit_s`` the run's outcome is a timeout at once (the attempt
counts) and its coroutine is cancelled (``CancelledError`` at its ``await``), again
after ``RECANCEL_AFTER_S`` if it swallows that, up to ``RECANCEL_TIMES``; whatever it
returns later is discarded. A cancelled task (``taskrail cancel``): the keeper's stop
reaches the loop at once (no polling per call), the coroutine is cancelled the same
way, nothing is written.

Shutdown (a warm stop, SIGTERM): the worker stops taking messages (a hop still waiting
for a slot gives its attempt back) and waits up to ``TASKRAIL_ASYNC_DRAIN_S`` for the
calls in flight; those still running then are
cancelled and their attempts given back unused (re-sent), so another worker runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import click
from celery import Celery, bootsteps, signals

from orchestration.agents import AgentSpec, TaskView
from orchestration.logging import get_logger
from orchestration.settings import Settings
from workers.calls import (
    CANCELLED_REASON,
    RECANCEL_AFTER_S,
    RECANCEL_TIMES,
    TIME_LIMIT,
    CallOutcome,
    Kind,
    classify,
    discarded,
    handler_thread_pool,
    not_awaited,
    time_limit_reason,
)
from workers.celery_app import pool_left_to_default

log = get_logger("taskrail.hop")

SHUTDOWN = "shutdown"
# How long a hop waits for a sync call it hands over before it does hand it over: one
# that ends by then is concluded in the hop (workers.aio.AsyncCalls.start).
QUICK_CALL_S = 0.002
# What a worker started with no pool flag hands over: (async calls, sync calls).
PLAIN_WORKER_LIMITS = (4000, 200)
# Threads that write outcomes (breaker verdict, compare-and-set, next hop): the
# database work of a finished call, kept off the event loop.
OUTCOME_THREADS = 4


class RunStop(threading.Event):
    """A run's stop event (``TaskView.cancelled``) that also tells the event loop at once
    when it is set (the lease keeper sets it from its own thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_set: Callable[[], None] | None = None

    def set(self) -> None:
        super().set()
        notify = self.on_set
        if notify is not None:
            notify()


Conclude = Callable[[CallOutcome, bool], None]
"""Writes a run's outcome (``stopped``: the run was cancelled meanwhile); called once,
on an outcome thread."""


class _Run:
    """One handed-over call: its coroutine's task on the loop, its timer, its outcome."""

    def __init__(
        self,
        owner: AsyncCalls,
        spec: AgentSpec,
        view: TaskView,
        stop: RunStop,
        conclude: Conclude,
        context: contextvars.Context,
        running: Future[Any] | None = None,
    ) -> None:
        self.owner, self.spec, self.view, self.stop = owner, spec, view, stop
        self.conclude, self.context = conclude, context
        self.running = running  # a sync call already on its handler thread
        self.deadline = time.monotonic() + spec.time_limit_s
        self.task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.why = ""  # set once the loop gave up on the coroutine
        self.cancels = 0
        self.concluded = False
        self._settled = threading.Lock()  # one conclusion, whoever comes first

    # -- on the loop ---------------------------------------------------------------

    def begin(self) -> None:
        loop = self.owner.loop
        if self.running is not None:  # a sync call that did not end at once: its end
            self.running.add_done_callback(  # is reported to the loop
                lambda done: self.owner.to_loop(self.thread_ended, done)
            )
        if self.why or self.concluded:  # settled before it began (a drain, a quick end)
            return
        if self.stop.is_set():  # cancelled before it started (or while it started)
            self.give_up(CANCELLED_REASON)
            return
        if self.running is None:  # a sync call is already on its handler thread (start)
            self.task = loop.create_task(_guarded(self.spec, self.view), context=self.context)
            self.task.add_done_callback(self.ended)
        left_s = max(0.0, self.deadline - time.monotonic())
        self.timer = loop.call_later(left_s, self.give_up, TIME_LIMIT)

    def give_up(self, why: str) -> None:
        """Stop waiting for the coroutine (``why``: the time limit, a cancel, a shutdown):
        its outcome is settled now, the coroutine cancelled."""
        if self.why or self.concluded:
            return
        self.why = why
        if self.timer is not None:
            self.timer.cancel()
        if why == TIME_LIMIT:
            outcome = CallOutcome(Kind.TIMEOUT, reason=time_limit_reason(self.spec))
        elif why == SHUTDOWN:
            outcome = CallOutcome(Kind.CANCELLED, reason=SHUTDOWN)
        else:
            outcome = CallOutcome(Kind.CANCELLED, reason=CANCELLED_REASON)
        self.recancel()
        self.finish(outcome)

    def recancel(self) -> None:
        task = self.task
        if task is None or task.done():
            return
        task.cancel()
        if self.cancels < RECANCEL_TIMES:
            self.cancels += 1
            self.owner.loop.call_later(RECANCEL_AFTER_S, self.recancel)
        else:
            log.warning("handler_ignores_cancel", task_id=self.view.id, reason=self.why)

    def ended(self, task: asyncio.Task[Any]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.why:  # given up on already: what it did now is thrown away
            if task.cancelled():
                handler = "cancelled"
            else:
                handler = "raised" if task.result()[0] is _RAISED else "returned"
            if self.why != SHUTDOWN:
                discarded(self.view.id, handler, self.why)
            return
        if task.cancelled():  # cancelled by the handler's own code, not by this loop
            outcome = CallOutcome(
                Kind.ERROR, reason="CancelledError: the handler was cancelled by its own code"
            )
        else:
            how, value = task.result()
            if how is _RAISED:
                outcome = classify(value)
            elif _is_awaitable(value):
                outcome = not_awaited(self.spec, value)
            else:
                outcome = CallOutcome(Kind.RESULT, result=value)
        self.finish(outcome)

    def thread_ended(self, done: Future[Any]) -> None:
        """A sync handler's thread ended (``done`` holds what it returned or raised)."""
        if self.timer is not None:
            self.timer.cancel()
        if self.why:  # given up on already (a thread cannot be cancelled): discarded
            if self.why != SHUTDOWN:
                handler = "raised" if done.exception() is not None else "returned"
                discarded(self.view.id, handler, self.why)
            return
        self.finish(thread_outcome(self.spec, done))

    def settle(self) -> bool:
        """True for the first caller only: it writes the run's outcome."""
        with self._settled:
            if self.concluded:
                return False
            self.concluded = True
            return True

    def finish(self, outcome: CallOutcome) -> None:
        if self.settle():
            self.owner.outcomes.submit(self.write, outcome)

    # -- on an outcome thread --------------------------------------------------------

    def write(self, outcome: CallOutcome) -> None:
        try:
            self.context.copy().run(self.conclude, outcome, self.stop.is_set())
        except Exception as err:  # the lease lapses; the sweeper re-drives the task
            log.error("outcome_not_written", task_id=self.view.id, error=str(err))
        finally:
            self.owner.done(self)


_RAISED = object()
_RETURNED = object()


def thread_outcome(spec: AgentSpec, done: Future[Any]) -> CallOutcome:
    """What a sync handler's ended call on a handler thread came to."""
    err = done.exception()
    if err is not None:
        return classify(err)
    value = done.result()
    if _is_awaitable(value):
        return not_awaited(spec, value)
    return CallOutcome(Kind.RESULT, result=value)


def _is_awaitable(value: Any) -> bool:
    return inspect.isawaitable(value)


async def _guarded(spec: AgentSpec, view: TaskView) -> tuple[object, Any]:
    """The handler's coroutine, its exceptions caught as values: a SystemExit or
    KeyboardInterrupt raised by a handler is its failure, and must not stop the loop
    (asyncio re-raises those out of ``run_forever``)."""
    try:
        coro: Coroutine[Any, Any, Any] = spec.handler(view)
        return _RETURNED, await coro
    except asyncio.CancelledError:
        raise
    except BaseException as err:
        return _RAISED, err


class AsyncCalls:
    """The event loop of this process, its thread, its slots and its outcome writers.

    ``limit``: async calls in flight at most (0: none are taken); ``sync_limit``: sync
    calls handed over to handler threads at most (0: sync handlers are not taken, they
    run in their hop's thread).
    """

    def __init__(
        self, limit: int, *, sync_limit: int = 0, outcome_threads: int = OUTCOME_THREADS
    ) -> None:
        self.limit = limit
        self.sync_limit = sync_limit
        self._slots = threading.BoundedSemaphore(max(limit, 1))
        self._sync_slots = threading.BoundedSemaphore(max(sync_limit, 1))
        self.loop = asyncio.new_event_loop()
        self.outcomes = ThreadPoolExecutor(outcome_threads, thread_name_prefix="taskrail-outcome")
        self._runs: set[_Run] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.closing = False
        self._thread = threading.Thread(
            target=self._serve, name="taskrail-async-calls", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        while True:
            try:
                self.loop.run_forever()
                return  # stopped by drain()
            except BaseException as err:
                # A SystemExit or KeyboardInterrupt raised in a task a handler started
                # (not the handler's own: _guarded catches those) comes out of
                # run_forever; the loop serves the other calls on.
                log.error("async_loop_error", error=f"{type(err).__name__}: {err}")

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._runs)

    def new_stop(self) -> RunStop:
        return RunStop()

    def takes(self, spec: AgentSpec) -> bool:
        """Whether ``spec``'s calls are handed over to this executor."""
        return (self.limit if spec.is_async else self.sync_limit) > 0

    def start(self, spec: AgentSpec, view: TaskView, stop: RunStop, conclude: Conclude) -> bool:
        """Hand ``spec``'s call on ``view`` to the loop, waiting for a free slot first.

        Returns False (nothing started) once the executor is shutting down. ``conclude``
        is called once with the outcome, on an outcome thread; for a sync call that ends
        within ``QUICK_CALL_S``, here, before this returns.
        """
        slots = self._slots_for(spec)
        while not slots.acquire(timeout=0.5):
            if self.closing:
                return False
        context = contextvars.copy_context()
        run = _Run(self, spec, view, stop, conclude, context)
        with self._lock:
            if self.closing:
                slots.release()
                return False
            self._runs.add(run)  # from here a drain waits for it, or gives it up
        if not spec.is_async:
            # A sync call that ends at once (a no-op, a cached answer) is concluded here,
            # in the hop, as the in-hop path would: no loop, no outcome thread.
            running = handler_thread_pool().submit(context.copy().run, spec.handler, view)
            futures.wait([running], timeout=QUICK_CALL_S)
            if running.done():
                if run.settle():
                    try:
                        conclude(thread_outcome(spec, running), stop.is_set())
                    finally:
                        self.done(run)
                return True
            run.running = running

        def cancelled() -> None:
            self.to_loop(run.give_up, CANCELLED_REASON)

        stop.on_set = cancelled
        self.to_loop(run.begin)
        return True

    def to_loop(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop, from any thread; nothing once the loop is
        closed (a drain ended: the run it concerns was settled then)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def _slots_for(self, spec: AgentSpec) -> threading.BoundedSemaphore:
        return self._slots if spec.is_async else self._sync_slots

    def done(self, run: _Run) -> None:
        with self._lock:
            self._runs.discard(run)
            if not self._runs:
                self._idle.notify_all()
        self._slots_for(run.spec).release()

    def drain(self, grace_s: float) -> int:
        """Stop taking calls; wait up to ``grace_s`` for those in flight to end, then give
        up on the rest (their outcome: ``shutdown``) and wait for their outcomes to be
        written. Returns how many were given up on."""
        with self._lock:
            self.closing = True
            deadline = time.monotonic() + grace_s
            while self._runs and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            left_over = list(self._runs)
        for run in left_over:
            self.loop.call_soon_threadsafe(run.give_up, SHUTDOWN)
        with self._lock:
            while self._runs:
                self._idle.wait(1.0)
        self.outcomes.shutdown(wait=True)
        # Coroutines given up on (or started by handlers) may still be ending: cancel what
        # is left and give it a moment, so the loop stops with no task pending.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self.loop).result(
                RECANCEL_AFTER_S * 2
            )
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()
        return len(left_over)


async def _cancel_the_rest() -> None:
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=RECANCEL_AFTER_S)


# -- this process's executor ---------------------------------------------------------

# From the worker's command line (`--async-calls`, `--sync-calls`); None: not given there.
_given: dict[str, int | None] = {"async_calls": None, "sync_calls": None}
# True in a worker started with no pool flag (workers.celery_app: taskrail's default
# pool): it hands over both kinds of call by default (PLAIN_WORKER_LIMITS).
_plain_worker = False
_calls: tuple[int, AsyncCalls] | None = None
_calls_lock = threading.Lock()


def set_limit(limit: int | None, *, sync: bool = False) -> None:
    _given["sync_calls" if sync else "async_calls"] = limit


def limits(settings: Settings) -> tuple[int, int]:
    """(async calls, sync calls) this process hands over: the command line's, else the
    ``TASKRAIL_ASYNC_CALLS`` / ``TASKRAIL_SYNC_CALLS`` settings when set, else the plain
    worker's defaults (a worker started with no pool flag), else none."""
    chosen = []
    for name, plain in zip(("async_calls", "sync_calls"), PLAIN_WORKER_LIMITS, strict=True):
        given = _given[name]
        if given is None:
            if name in settings.model_fields_set:
                given = int(getattr(settings, name))
            else:
                given = plain if _plain_worker else 0
        chosen.append(given)
    return chosen[0], chosen[1]


def executor(settings: Settings) -> AsyncCalls | None:
    """This process's executor of handed-over calls, built on first use; None when it
    takes none."""
    global _calls
    current = _calls
    if current is not None and current[0] == os.getpid():
        return current[1]
    async_limit, sync_limit = limits(settings)
    if async_limit <= 0 and sync_limit <= 0:
        return None
    with _calls_lock:
        if _calls is None or _calls[0] != os.getpid():  # a forked child builds its own
            _calls = (os.getpid(), AsyncCalls(async_limit, sync_limit=sync_limit))
            log.info("async_executor_started", limit=async_limit, sync_limit=sync_limit)
        return _calls[1]


def shutdown(grace_s: float) -> None:
    """Drain this process's executor, if it has one (the worker is stopping)."""
    global _calls
    with _calls_lock:
        current, _calls = _calls, None
    if current is None or current[0] != os.getpid():
        return
    calls = current[1]
    in_flight = calls.in_flight
    if in_flight:
        log.info("async_calls_draining", in_flight=in_flight, grace_s=grace_s)
    given_up = calls.drain(grace_s)
    if given_up:
        log.warning("async_calls_given_back", count=given_up)


# -- the worker's command line ---------------------------------------------------------


class AsyncCallsOption(bootsteps.Step):
    """Reads ``--async-calls`` and ``--sync-calls`` (the worker's command line) in the
    worker's main process, before a prefork pool forks its children."""

    def __init__(
        self,
        parent: Any,
        async_calls: int | None = None,
        sync_calls: int | None = None,
        **kwargs: Any,
    ) -> None:
        if async_calls is not None:
            set_limit(async_calls)
        if sync_calls is not None:
            set_limit(sync_calls, sync=True)
        super().__init__(parent, **kwargs)


def install(app: Celery) -> None:
    """Add ``--async-calls`` and ``--sync-calls`` to ``celery -A workers worker``."""
    app.user_options["worker"].add(
        click.Option(
            ["--async-calls"],
            type=click.IntRange(min=0),
            default=None,
            help=(
                "taskrail: run async def handlers on this process's event loop, at most "
                "this many at a time (0: off; default TASKRAIL_ASYNC_CALLS)."
            ),
        )
    )
    app.user_options["worker"].add(
        click.Option(
            ["--sync-calls"],
            type=click.IntRange(min=0),
            default=None,
            help=(
                "taskrail: run sync handlers on threads of their own, the execute hop "
                "returning at once, at most this many at a time (0: off, they run in "
                "the hop's thread; default TASKRAIL_SYNC_CALLS)."
            ),
        )
    )
    app.steps["worker"].add(AsyncCallsOption)


@signals.worker_init.connect
def _plain_worker_defaults(sender: Any = None, **_: object) -> None:
    # A worker started with no pool flag runs taskrail's default pool (solo, set by
    # workers.celery_app on this same signal): one process that reads the broker and
    # runs the hops, so it hands every handler's call over (both kinds) instead of
    # waiting for it in the hop.
    global _plain_worker
    if sender is not None and pool_left_to_default(sender.app):
        _plain_worker = True


@signals.worker_shutting_down.connect
def _stop_starting(**_: object) -> None:
    # A warm stop begins (in the signal handler): a hop waiting for a slot gives its
    # attempt back at once. Celery's pool waits for its hops before worker_shutdown, so
    # a full executor's stop would otherwise wait until a call in flight ended.
    current = _calls
    if current is not None and current[0] == os.getpid():
        current[1].closing = True


@signals.worker_shutdown.connect
def _drain_on_shutdown(**_: object) -> None:
    from workers.celery_app import worker_settings

    with contextlib.suppress(AssertionError):  # no app built: nothing ran
        shutdown(worker_settings().async_drain_s)
