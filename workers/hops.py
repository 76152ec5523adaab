"""The hops: one Celery job per lifecycle step, each enqueueing the next.

::

    taskrail.assign(task_id, task_type)   pending -> assigned      then start
    taskrail.start(task_id)               assigned -> in_progress  then execute
    taskrail.execute(task_id, attempts)   in_progress -> completed | failed | escalated,
                                          or another attempt later

Each hop follows DESIGN.md "One hop": a message for a task that is not in the state
the hop expects is a duplicate or stale and is dropped with an info line; the write
is the transition store's compare-and-set plus audit event; the next hop is sent
only after that commit. A crash between commit and send leaves a task with nothing
in flight, which the sweeper re-drives.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import structlog
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from orchestration import constants as c
from orchestration import leases
from orchestration.agents import (
    AgentSpec,
    Escalate,
    PermanentError,
    TaskView,
    ensure_json,
    registry,
)
from orchestration.errors import InfrastructureError, UnknownTaskType
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, utcnow
from orchestration.redact import redact_text
from orchestration.transitions import Outcome, apply_transition
from workers import messages
from workers.celery_app import app
from workers.runtime import Runtime, runtime

log = get_logger("taskrail.hop")

MAX_ERROR_CHARS = 2000


class HopTask(Task):
    """Settings shared by every hop: at-least-once delivery, no results stored."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    typing = False  # arguments are checked by workers.messages, which drops bad ones
    max_retries = None


@contextlib.contextmanager
def hop_scope(task: Task, hop: str) -> Iterator[Runtime]:
    """Bind the hop's log context; drop malformed messages; retry on infrastructure errors."""
    rt = runtime(app)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(hop=hop, worker=rt.worker)
    try:
        yield rt
    except messages.MalformedMessage as err:
        log.warning("message_dropped", reason=err.reason, message_id=task.request.id)
    except InfrastructureError as err:
        delay = min(30.0, 1.0 * 2 ** min(task.request.retries, 5)) * random.uniform(0.5, 1.0)
        log.warning("hop_retry_later", error=str(err), countdown_s=round(delay, 2))
        raise task.retry(countdown=delay, exc=err) from None
    finally:
        structlog.contextvars.clear_contextvars()


def _explain_stale(rt: Runtime, task_id: int, expected: str) -> None:
    """Log why a hop found nothing to do (duplicate, stale, or unknown task)."""
    row = leases.describe(rt.db, task_id)
    if row is None:
        log.warning("message_dropped", task_id=task_id, reason="no such task")
    else:
        log.info(
            "hop_skipped",
            task_id=task_id,
            reason="duplicate or stale message",
            expected=expected,
            status=str(row["status"]),
            attempts=row["attempts"],
            leased_by=row["lease_owner"],
        )


_round_robin = itertools.count()


def choose_agent(specs: list[AgentSpec]) -> AgentSpec:
    """Spread tasks of one type over the agents that handle it."""
    if len(specs) == 1:
        return specs[0]
    return specs[next(_round_robin) % len(specs)]


@app.task(name=c.HOP_ASSIGN, base=HopTask, bind=True)
def assign(self: Task, *args: Any, **kwargs: Any) -> None:
    """pending -> assigned: pick an agent registered for the task type."""
    with hop_scope(self, "assign") as rt:
        raw_id, raw_type = messages.parse("assign", args, kwargs, ("task_id", "task_type"), 2)
        task_id = messages.task_id("assign", raw_id)
        task_type = messages.task_type("assign", raw_type)
        structlog.contextvars.bind_contextvars(task_id=task_id)
        try:
            spec = choose_agent(registry.for_task_type(task_type))
        except UnknownTaskType as err:
            # This worker lacks the agent module; leave the task for one that has it.
            log.error("no_agent_for_task_type", task_type=task_type, error=str(err))
            return
        result = apply_transition(
            rt.db,
            task_id,
            "assign",
            expected=TaskStatus.PENDING,
            agent=spec.name,
            worker=rt.worker,
            guard={"task_type": task_type},
        )
        if result.outcome is not Outcome.APPLIED:
            _explain_stale(rt, task_id, "pending")
            return
        rt.dispatcher.send(c.HOP_START, [task_id])


@app.task(name=c.HOP_START, base=HopTask, bind=True)
def start(self: Task, *args: Any, **kwargs: Any) -> None:
    """assigned -> in_progress, then send the first execution."""
    with hop_scope(self, "start") as rt:
        (raw_id,) = messages.parse("start", args, kwargs, ("task_id",), 1)
        task_id = messages.task_id("start", raw_id)
        structlog.contextvars.bind_contextvars(task_id=task_id)
        result = apply_transition(
            rt.db,
            task_id,
            "start",
            expected=TaskStatus.ASSIGNED,
            worker=rt.worker,
            returning=("attempts", "assigned_agent"),
        )
        if result.outcome is not Outcome.APPLIED:
            _explain_stale(rt, task_id, "assigned")
            return
        send_execute(rt, task_id, result.row["attempts"], result.row["assigned_agent"])


def send_execute(
    rt: Runtime, task_id: int, attempts: int, agent: str | None, countdown: float | None = None
) -> None:
    """Send the execute hop with the agent's time limits."""
    spec = registry.find(agent) if agent else None
    limits = spec.time_limits() if spec is not None else {}
    rt.dispatcher.send(c.HOP_EXECUTE, [task_id, attempts], countdown=countdown, **limits)


@app.task(name=c.HOP_EXECUTE, base=HopTask, bind=True)
def execute(self: Task, *args: Any, **kwargs: Any) -> None:
    """Call the agent's handler under a lease; finish the task or schedule another attempt."""
    with hop_scope(self, "execute") as rt:
        raw_id, raw_attempts = messages.parse("execute", args, kwargs, ("task_id", "attempts"), 2)
        task_id = messages.task_id("execute", raw_id)
        attempts = messages.attempts("execute", raw_attempts)
        structlog.contextvars.bind_contextvars(task_id=task_id)
        token = f"{rt.worker}/{uuid.uuid4().hex[:12]}"
        claimed = leases.claim(rt.db, task_id, attempts, token, rt.settings.lease_ttl_s)
        if claimed is None:
            _explain_stale(rt, task_id, f"in_progress at attempt {attempts + 1}, not leased")
            return
        structlog.contextvars.bind_contextvars(agent=claimed.agent, attempt=claimed.attempt)
        _run_claimed(rt, claimed)


def _finish(
    rt: Runtime, claimed: leases.Claim, event: str, *, reason: str | None = None, result: Any = None
) -> None:
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "not_before": None}
    if event == "complete":
        values["result"] = result
    else:
        values["last_error"] = reason
    outcome = apply_transition(
        rt.db,
        claimed.task_id,
        event,
        expected=TaskStatus.IN_PROGRESS,
        agent=claimed.agent,
        reason=reason,
        worker=rt.worker,
        set_=values,
        guard={"lease_owner": claimed.token},
    )
    if outcome.outcome is not Outcome.APPLIED:
        log.warning("lease_lost", event=event, reason="another worker took the task over")


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return redact_text(text)[:MAX_ERROR_CHARS]


def backoff_s(rt: Runtime, attempt: int) -> float:
    """Exponential backoff with jitter before attempt ``attempt + 1``."""
    cap = min(
        rt.settings.retry_backoff_max_s, rt.settings.retry_backoff_base_s * 2 ** (attempt - 1)
    )
    return cap * random.uniform(0.5, 1.0)


def _run_claimed(rt: Runtime, claimed: leases.Claim) -> None:
    spec = registry.find(claimed.agent) if claimed.agent else None
    if spec is None:
        _finish(
            rt,
            claimed,
            "escalate",
            reason=f"agent {claimed.agent!r} is not registered on any worker that took the task",
        )
        return
    if claimed.attempt > spec.max_attempts:
        _finish(
            rt,
            claimed,
            "fail",
            reason=(
                f"gave up after {claimed.attempt - 1} attempts; "
                "the worker running the last one was lost"
            ),
        )
        return
    view = TaskView.build(
        claimed.task_id, claimed.client_id, claimed.task_type, claimed.payload, claimed.attempt
    )
    try:
        with rt.leases.hold(claimed.task_id, claimed.token):
            result = spec.handler(view)
    except Escalate as signal:
        _finish(rt, claimed, "escalate", reason=signal.reason)
    except PermanentError as signal:
        _finish(rt, claimed, "fail", reason=signal.reason)
    except SoftTimeLimitExceeded:
        _transient(rt, spec, claimed, f"time limit of {spec.time_limit_s:g}s exceeded")
    except Exception as err:  # any other exception is transient by contract
        _transient(rt, spec, claimed, _error_text(err))
    else:
        try:
            ensure_json(result)
        except (TypeError, ValueError) as err:
            _finish(rt, claimed, "fail", reason=f"result is not JSON-serialisable: {err}")
            return
        _finish(rt, claimed, "complete", result=result)


def _transient(rt: Runtime, spec: AgentSpec, claimed: leases.Claim, error: str) -> None:
    if claimed.attempt >= spec.max_attempts:
        _finish(rt, claimed, "fail", reason=f"gave up after {claimed.attempt} attempts: {error}")
        return
    delay = backoff_s(rt, claimed.attempt)
    retry_at = utcnow() + timedelta(seconds=delay)
    if not leases.release_for_retry(rt.db, claimed.task_id, claimed.token, error, retry_at):
        log.warning("lease_lost", event="retry", reason="another worker took the task over")
        return
    log.info(
        "attempt_failed", error=error, retry_in_s=round(delay, 2), max_attempts=spec.max_attempts
    )
    send_execute(rt, claimed.task_id, claimed.attempt, claimed.agent, countdown=delay)
