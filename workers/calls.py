"""Calling a handler: in the worker's process under a deadline, or in a process of its own.

:func:`call` runs the handler on a thread of its own while the hop waits, at most
until the agent's ``time_limit_s``: past it the hop stops waiting, the attempt ends
as timed out, and whatever the handler returns later is discarded (a thread cannot be
stopped: a hung call keeps its thread, never the hop's).

:func:`call_isolated` runs it in a new Python process (``python -m workers.isolated``)
that the hop kills at the time limit. A task runs isolated once a worker died while
its handler ran: if the handler is what kills its process, only that task pays.
Requests and replies are JSON on the child's stdin and stdout.
"""

from __future__ import annotations

import contextvars
import enum
import json
import os
import signal
import subprocess
import sys
import threading
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


class Kind(enum.StrEnum):
    RESULT = "result"
    ESCALATE = "escalate"
    PERMANENT = "permanent"
    ERROR = "error"  # a transient exception
    TIMEOUT = "timeout"  # past the agent's time limit
    DIED = "died"  # the handler's own process died


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What a handler call came to. ``error`` is the exception raised in this process."""

    kind: Kind
    result: Any = None
    reason: str = ""
    error: BaseException | None = None


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _handler_pool() -> ThreadPoolExecutor:
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


def _discard_late(future: Future[Any], task_id: int) -> None:
    outcome = "raised" if future.exception() is not None else "returned"
    log.warning("late_result_discarded", task_id=task_id, handler=outcome)


def call(spec: AgentSpec, view: TaskView) -> CallOutcome:
    """Run ``spec``'s handler on ``view`` in this process, waiting at most its time limit.

    Whatever the handler raises is its outcome; what interrupts the wait itself (the
    worker shutting down) propagates.
    """
    context = contextvars.copy_context()
    future = _handler_pool().submit(context.run, spec.handler, view)
    try:
        result = future.result(timeout=spec.time_limit_s)
    except FutureTimeout:
        future.add_done_callback(lambda f: _discard_late(f, view.id))
        return CallOutcome(Kind.TIMEOUT, reason=time_limit_reason(spec))
    except BaseException as err:
        if not future.done():  # raised in this thread (a worker shutting down): not ours
            raise
        # The handler raised it: SystemExit or KeyboardInterrupt from a handler are its
        # failures too, not this worker's.
        return classify(err)
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
    try:
        out, _ = proc.communicate(
            json.dumps(request).encode(), timeout=spec.time_limit_s + ISOLATED_START_GRACE_S
        )
    except subprocess.TimeoutExpired:
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
