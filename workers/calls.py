"""Calling a handler: in the worker's process under a deadline, or in a process of its own.

:func:`call` runs the handler on a thread of its own while the hop waits, at most
until the agent's ``time_limit_s``: past it the hop stops waiting, the attempt ends
as timed out, and whatever the handler returns later is discarded (a thread cannot be
stopped: a hung call keeps its thread, never the hop's).

:func:`call_isolated` runs it in a new Python process (``python -m workers.isolated``)
that the hop kills at the time limit. A task runs isolated once a worker died while
its handler ran: if the handler is what kills its process, only that task pays.
Requests and replies are JSON on the child's stdin and stdout.

A run whose view is cancelled (``TaskView.cancelled``: the lease keeper found its task
cancelled, or its lease lost) ends the wait as well, within ``STOP_CHECK_S``: the hop
gets a ``cancelled`` outcome, a thread's late result is discarded, a child process is
killed.

An ``async def`` handler (``AgentSpec.is_async``) runs the same way, on an event loop of
its own in its call thread (:func:`_run_async`), which also cancels the coroutine at the
time limit and once the run is cancelled: the handler sees ``asyncio.CancelledError`` at
its ``await``. A coroutine that swallows the cancel is cancelled again after
``RECANCEL_AFTER_S``; one that goes on regardless is left like a hung sync handler
(its thread kept, its result discarded).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from orchestration.agents import AgentSpec, Escalate, PermanentError, TaskView
from orchestration.logging import get_logger

log = get_logger("taskrail.hop")

# Handler threads: reused when idle, a new one when all are busy (a hung call keeps
# its thread for good, so there is no small upper bound).
MAX_HANDLER_THREADS = 4096
# How long a child process gets to start and report before its time limit counts.
ISOLATED_START_GRACE_S = 10.0
# How often a hop waiting for a handler looks whether the run was cancelled (the lease
# keeper sets the flag; this only bounds how long the hop goes on waiting after that).
STOP_CHECK_S = 0.25
# How often an async handler's event loop looks whether its run was cancelled.
ASYNC_STOP_CHECK_S = 0.05
# A coroutine still running this long after it was cancelled is cancelled again (a
# cancel can be swallowed: asyncio.wait_for on Python 3.11, some clients), at most
# RECANCEL_TIMES times; after that it is left to end by itself.
RECANCEL_AFTER_S = 1.0
RECANCEL_TIMES = 3


class Kind(enum.StrEnum):
    RESULT = "result"
    ESCALATE = "escalate"
    PERMANENT = "permanent"
    ERROR = "error"  # a transient exception
    TIMEOUT = "timeout"  # past the agent's time limit
    DIED = "died"  # the handler's own process died
    CANCELLED = "cancelled"  # the run was cancelled: the hop stopped waiting for it


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What a handler call came to. ``error`` is the exception raised in this process."""

    kind: Kind
    result: Any = None
    reason: str = ""
    error: BaseException | None = None


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def handler_thread_pool() -> ThreadPoolExecutor:
    """This process's handler threads (a forked child builds its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():  # a forked child builds its own
            _pool = (
                os.getpid(),
                ThreadPoolExecutor(MAX_HANDLER_THREADS, thread_name_prefix="taskrail-handler"),
            )
        return _pool[1]


def classify(err: BaseException) -> CallOutcome:
    if isinstance(err, Escalate):
        return CallOutcome(Kind.ESCALATE, reason=err.reason, error=err)
    if isinstance(err, PermanentError):
        return CallOutcome(Kind.PERMANENT, reason=err.reason, error=err)
    return CallOutcome(Kind.ERROR, reason=f"{type(err).__name__}: {err}", error=err)


CANCELLED_REASON = "cancelled"
TIME_LIMIT = "time limit"


def discarded(task_id: int, handler: str, reason: str) -> None:
    """Log that a run's result (``handler``: returned, raised, killed) is thrown away
    because of ``reason``: ``cancelled`` (expected: an operator asked) or the time limit."""
    if reason == CANCELLED_REASON:
        log.info("late_result_discarded", task_id=task_id, handler=handler, reason=reason)
    else:
        log.warning("late_result_discarded", task_id=task_id, handler=handler, reason=reason)


def _discard_late(future: Future[Any], task_id: int, reason: str) -> None:
    err = future.exception()
    if isinstance(err, _Abandoned):  # an async handler, cancelled by its loop
        outcome = err.handler
    else:
        outcome = "raised" if err is not None else "returned"
    discarded(task_id, outcome, reason)


class _Stopped(Exception):
    """The run was cancelled while the hop waited for it."""


class _Abandoned(Exception):
    """An async handler's coroutine was cancelled by its event loop: ``why`` is
    CANCELLED_REASON or TIME_LIMIT; ``handler`` what the coroutine then did (``cancelled``:
    it ended with CancelledError; ``returned`` or ``raised``: it swallowed the cancel)."""

    def __init__(self, why: str, handler: str) -> None:
        self.why = why
        self.handler = handler
        super().__init__(why, handler)


def _run_async(spec: AgentSpec, view: TaskView, deadline: float) -> Any:
    """Run ``spec``'s async handler on a new event loop in this thread; its result, or
    what it raised. Raises _Abandoned once the loop cancelled it (``deadline`` on the
    monotonic clock passed, or ``view`` was cancelled)."""
    return asyncio.run(_supervise(spec, view, deadline))


async def _supervise(spec: AgentSpec, view: TaskView, deadline: float) -> Any:
    """Await the handler's coroutine as a task, looking every ASYNC_STOP_CHECK_S whether
    ``view`` was cancelled, and cancelling it then or at ``deadline`` (again, up to
    RECANCEL_TIMES, while it goes on)."""
    running = asyncio.ensure_future(spec.handler(view))
    why = ""
    cancels = 0
    recancel_at = 0.0
    while not running.done():
        now = time.monotonic()
        if not why:
            if view.cancelled:
                why = CANCELLED_REASON
            elif now >= deadline:
                why = TIME_LIMIT
            if why:
                running.cancel()
                recancel_at = now + RECANCEL_AFTER_S
        elif now >= recancel_at and cancels < RECANCEL_TIMES:
            cancels += 1
            recancel_at = now + RECANCEL_AFTER_S
            running.cancel()
            if cancels == RECANCEL_TIMES:
                log.warning("handler_ignores_cancel", task_id=view.id, reason=why)
        pause_s = ASYNC_STOP_CHECK_S if why else min(ASYNC_STOP_CHECK_S, deadline - now)
        await asyncio.wait({running}, timeout=max(0.0, pause_s))
    if not why:
        return running.result()
    if running.cancelled():
        raise _Abandoned(why, "cancelled")
    raise _Abandoned(why, "raised" if running.exception() is not None else "returned")


def not_awaited(spec: AgentSpec, result: Any) -> CallOutcome:
    """The outcome of a sync handler that returned ``result``, an awaitable: refused (it
    would never run), closed so that Python does not warn about it."""
    close = getattr(result, "close", None)
    if inspect.iscoroutine(result) and callable(close):
        close()
    return CallOutcome(
        Kind.PERMANENT,
        reason=(
            f"the handler of agent {spec.name!r} returned {type(result).__name__} "
            "(an awaitable), not a result: make it an async def, or await it inside"
        ),
    )


def _wait(future: Future[Any], view: TaskView, time_limit_s: float) -> Any:
    """The handler's result, waiting at most ``time_limit_s``; raises what it raised,
    FutureTimeout past the limit, _Stopped once ``view`` is cancelled."""
    try:  # a short handler: the one wait it takes
        return future.result(timeout=min(time_limit_s, STOP_CHECK_S))
    except FutureTimeout:
        if future.done():  # the handler's own TimeoutError
            raise
    deadline = time.monotonic() + time_limit_s - STOP_CHECK_S
    while True:
        if view.cancelled:
            raise _Stopped
        left_s = deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, min(left_s, STOP_CHECK_S)))
        except FutureTimeout:
            if future.done() or left_s <= STOP_CHECK_S:
                raise


def call(spec: AgentSpec, view: TaskView) -> CallOutcome:
    """Run ``spec``'s handler on ``view`` in this process, waiting at most its time limit,
    or until ``view`` is cancelled.

    Whatever the handler raises is its outcome; what interrupts the wait itself (the
    worker shutting down) propagates. An async handler is run by :func:`_run_async`; a
    sync handler that returns an awaitable fails permanently with the reason.
    """
    context = contextvars.copy_context()
    if spec.is_async:
        deadline = time.monotonic() + spec.time_limit_s
        future = handler_thread_pool().submit(context.run, _run_async, spec, view, deadline)
    else:
        future = handler_thread_pool().submit(context.run, spec.handler, view)
    try:
        result = _wait(future, view, spec.time_limit_s)
    except _Abandoned as err:  # the loop cancelled it before the hop stopped waiting
        if err.why == TIME_LIMIT:
            discarded(view.id, err.handler, TIME_LIMIT)
            return CallOutcome(Kind.TIMEOUT, reason=time_limit_reason(spec))
        discarded(view.id, err.handler, CANCELLED_REASON)
        return CallOutcome(Kind.CANCELLED, reason=CANCELLED_REASON)
    except _Stopped:
        future.add_done_callback(lambda f: _discard_late(f, view.id, CANCELLED_REASON))
        return CallOutcome(Kind.CANCELLED, reason=CANCELLED_REASON)
    except BaseException as err:
        if not future.done():
            if isinstance(err, FutureTimeout):  # the limit passed, the handler runs on
                future.add_done_callback(lambda f: _discard_late(f, view.id, TIME_LIMIT))
                return CallOutcome(Kind.TIMEOUT, reason=time_limit_reason(spec))
            raise  # raised in this thread (a worker shutting down): not ours
        # The handler raised it: SystemExit or KeyboardInterrupt from a handler are its
        # failures too, not this worker's; its own TimeoutError is a transient error.
        return classify(err)
    if inspect.isawaitable(result):
        return not_awaited(spec, result)
    return CallOutcome(Kind.RESULT, result=result)


def time_limit_reason(spec: AgentSpec) -> str:
    return f"time limit of {spec.time_limit_s:g} s exceeded"


def call_isolated(spec: AgentSpec, view: TaskView, agent_modules: tuple[str, ...]) -> CallOutcome:
    """Run ``spec``'s handler on ``view`` in a new process; kill it at the time limit."""
    request = {
        "modules": list(agent_modules),
        "agent": spec.name,
        "task": {
            "id": view.id,
            "client_id": view.client_id,
            "task_type": view.task_type,
            "payload": _thaw(view.payload),
            "attempt": view.attempt,
        },
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.isolated"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=os.getcwd(),
    )
    deadline = time.monotonic() + spec.time_limit_s + ISOLATED_START_GRACE_S
    request_bytes: bytes | None = json.dumps(request).encode()
    while True:
        left_s = deadline - time.monotonic()
        try:
            # Called again after a timeout it goes on where it stopped (the request is
            # given once), output included.
            out, _ = proc.communicate(request_bytes, timeout=max(0.0, min(left_s, STOP_CHECK_S)))
            break
        except subprocess.TimeoutExpired:
            request_bytes = None
            if view.cancelled:
                proc.kill()
                proc.communicate()
                discarded(view.id, "killed", CANCELLED_REASON)
                return CallOutcome(Kind.CANCELLED, reason=CANCELLED_REASON)
            if left_s <= STOP_CHECK_S:
                proc.kill()
                proc.communicate()
                return CallOutcome(Kind.TIMEOUT, reason=time_limit_reason(spec))
    reply = _reply(out)
    if reply is None:
        return CallOutcome(Kind.DIED, reason=died_reason(proc.returncode))
    kind = Kind(reply["kind"])
    if kind is Kind.RESULT:
        return CallOutcome(Kind.RESULT, result=reply.get("result"))
    return CallOutcome(kind, reason=str(reply.get("reason", "")))


def _reply(out: bytes) -> dict[str, Any] | None:
    lines = out.strip().splitlines()
    if not lines:
        return None
    try:
        reply = json.loads(lines[-1])
    except ValueError:
        return None
    if not isinstance(reply, dict) or reply.get("kind") not in set(Kind):
        return None
    return reply


def died_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    return f"the handler's process died ({how})"


def _thaw(value: Any) -> Any:
    """A TaskView's read-only payload as plain JSON values."""
    if hasattr(value, "items"):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    return value
