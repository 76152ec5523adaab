"""The hops: one Celery job per lifecycle step, each enqueueing the next.

::

    taskrail.assign(task_id, task_type)   pending -> assigned      then start
    taskrail.start(task_id)               assigned -> in_progress  then execute, with
                                          the first attempt pre-claimed
    taskrail.execute(task_id, attempts, agent[, token])
                                          in_progress -> completed | failed | escalated,
                                          or another attempt later

Each hop follows docs/design.md "One hop": a message for a task that is not in the state
the hop expects is a duplicate or stale and is dropped with an info line; the write
is the transition store's compare-and-set plus audit event; the next hop is sent
only after that commit. A crash between commit and send leaves a task with nothing
in flight, which the sweeper re-drives.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import structlog
from celery import Task

from orchestration import constants as c
from orchestration.agents import AgentSpec, registry
from orchestration.errors import InfrastructureError, UnknownTaskType
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, utcnow
from orchestration.ops import metrics
from orchestration.store.leases import preclaim_token
from orchestration.store.transitions import Move, Outcome
from workers import execution, messages
from workers.celery_app import app, dead_letter_hop
from workers.runtime import Runtime, runtime

log = get_logger("taskrail.hop")


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
    started = time.perf_counter()
    rt = runtime(app)
    structlog.contextvars.clear_contextvars()
    # hop_clock: log lines of this hop carry duration_ms (orchestration.logging).
    structlog.contextvars.bind_contextvars(hop=hop, worker=rt.worker, hop_clock=started)
    try:
        yield rt
    except messages.MalformedMessage as err:
        log.warning("message_dropped", reason=err.reason, message_id=task.request.id)
        dead_letter_hop(task, str(err))
    except InfrastructureError as err:
        delay = min(30.0, 1.0 * 2 ** min(task.request.retries, 5)) * random.uniform(0.5, 1.0)
        log.warning("hop_retry_later", error=str(err), countdown_s=round(delay, 2))
        raise task.retry(countdown=delay, exc=err) from None
    finally:
        metrics.hop_duration(hop, time.perf_counter() - started)
        structlog.contextvars.clear_contextvars()


_round_robin = itertools.count()


def choose_agent(rt: Runtime, specs: list[AgentSpec]) -> AgentSpec:
    """Spread tasks of one type over its agents, preferring those whose breaker is closed."""
    if len(specs) == 1:
        return specs[0]
    healthy = [spec for spec in specs if _breaker_closed(rt, spec)]
    pool = healthy or specs
    return pool[next(_round_robin) % len(pool)]


def _breaker_closed(rt: Runtime, spec: AgentSpec) -> bool:
    try:
        return rt.breaker_for(spec).state == "closed"
    except InfrastructureError:
        return True  # unknown: do not rule the agent out; execute will check again


@app.task(name=c.HOP_ASSIGN, base=HopTask, bind=True)
def assign(self: Task, *args: Any, **kwargs: Any) -> None:
    """pending -> assigned: pick an agent registered for the task type."""
    with hop_scope(self, "assign") as rt:
        raw_id, raw_type = messages.parse("assign", args, kwargs, ("task_id", "task_type"), 2)
        task_id = messages.task_id("assign", raw_id)
        task_type = messages.task_type("assign", raw_type)
        structlog.contextvars.bind_contextvars(task_id=task_id)
        try:
            spec = choose_agent(rt, registry.for_task_type(task_type))
        except UnknownTaskType as err:
            # This worker lacks the agent module: put the hop back on the queue for a
            # worker that has it (dropping it would leave the task pending for good).
            # The jitter keeps the retry from landing in step with this worker's own
            # wait on the queue, cycle after cycle.
            delay = c.NO_AGENT_RETRY_COUNTDOWN_S * random.uniform(0.5, 1.5)
            log.warning(
                "no_agent_for_task_type",
                task_type=task_type,
                error=str(err),
                countdown_s=round(delay, 2),
            )
            raise self.retry(countdown=delay) from None
        result = rt.transitions.apply(
            Move(
                task_id, "assign", expected=TaskStatus.PENDING, agent=spec.name, task_type=task_type
            )
        )
        if result.outcome is not Outcome.APPLIED:
            execution.explain_stale(rt, task_id, "pending")
            return
        rt.dispatcher.send(c.HOP_START, [task_id])


@app.task(name=c.HOP_START, base=HopTask, bind=True)
def start(self: Task, *args: Any, **kwargs: Any) -> None:
    """assigned -> in_progress, then send the first execution."""
    with hop_scope(self, "start") as rt:
        (raw_id,) = messages.parse("start", args, kwargs, ("task_id",), 1)
        task_id = messages.task_id("start", raw_id)
        structlog.contextvars.bind_contextvars(task_id=task_id)
        # The same statement pre-claims the first attempt for the execute hop; the
        # message carries only the pre-claim's token, the payload stays in the row.
        token = preclaim_token(rt.worker)
        until = utcnow() + timedelta(seconds=rt.settings.lease_ttl_s)
        result = rt.transitions.apply(
            Move(
                task_id,
                "start",
                expected=TaskStatus.ASSIGNED,
                preclaim=token,
                preclaim_until=until,
                returning=("attempts", "assigned_agent"),
            )
        )
        if result.outcome is not Outcome.APPLIED:
            execution.explain_stale(rt, task_id, "assigned")
            return
        row = result.row
        # The row counts the pre-claimed run; the message carries the attempts before it.
        done = row["attempts"] - 1
        execution.send_execute(rt, task_id, done, row["assigned_agent"], token=token)


@app.task(name=c.HOP_EXECUTE, base=HopTask, bind=True)
def execute(self: Task, *args: Any, **kwargs: Any) -> None:
    """Call the agent's handler through its breaker, under a lease (workers.execution)."""
    with hop_scope(self, "execute") as rt:
        raw_id, raw_attempts, raw_agent, raw_token = messages.parse(
            "execute", args, kwargs, ("task_id", "attempts", "agent", "lease"), 2
        )
        task_id = messages.task_id("execute", raw_id)
        attempts = messages.attempts("execute", raw_attempts)
        agent = messages.agent_name("execute", raw_agent)
        token = messages.lease_token("execute", raw_token)
        structlog.contextvars.bind_contextvars(task_id=task_id, agent=agent)
        execution.execute(rt, task_id, attempts, agent, token)
