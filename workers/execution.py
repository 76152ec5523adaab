"""The execute hop's work: breaker, lease, handler call, and what follows from it.

::

    breaker open?      -> defer: not_before recorded, execute re-sent with a countdown,
                          no attempt consumed; escalate after the agent's max_deferral_s
    claim the lease    -> nothing to claim: a duplicate or stale message, dropped
    call the handler   -> result            complete
                          Escalate          escalate
                          PermanentError    fail
                          anything else     another attempt after a backoff, or fail
                                            after max_attempts
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import timedelta
from typing import Any

import structlog
from celery.exceptions import SoftTimeLimitExceeded

from orchestration import constants as c
from orchestration import leases, metrics, redisbroker
from orchestration.agents import (
    AgentSpec,
    Escalate,
    PermanentError,
    TaskView,
    ensure_json,
    registry,
)
from orchestration.breakers import BreakerOpen, Permit, SharedBreaker
from orchestration.errors import DatabaseUnavailable
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, utcnow
from orchestration.redact import redact_text
from orchestration.transitions import Outcome, apply_transition
from workers.runtime import Runtime

log = get_logger("taskrail.hop")

MAX_ERROR_CHARS = 2000
# Pauses between tries of a handler's final write while the database is unreachable:
# about 8 s in all, well inside the lease's TTL.
FINISH_RETRY_PAUSES_S = (0.5, 1.0, 2.0, 4.0)


def explain_stale(rt: Runtime, task_id: int, expected: str) -> None:
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


def new_token(rt: Runtime) -> str:
    """A lease token: this worker and a random part (one per execution)."""
    return f"{rt.worker}/{uuid.uuid4().hex[:12]}"


def send_execute(
    rt: Runtime,
    task_id: int,
    attempts: int,
    agent: str | None,
    countdown: float | None = None,
    lease: leases.Lease | None = None,
) -> None:
    """Send the execute hop for the attempt after ``attempts``, with the agent's time limits.

    With a ``lease`` the attempt is pre-claimed (the start hop did it in its statement).
    """
    spec = registry.find(agent) if agent else None
    limits = spec.time_limits() if spec is not None else {}
    args: list[Any] = [task_id, attempts, agent]
    options: dict[str, Any] = dict(limits)
    if lease is not None:
        args.append(lease.to_message())
        # taskrail's Redis transport delivers the message once (redisbroker.ONCE_HEADER).
        options["headers"] = {redisbroker.ONCE_HEADER: lease.token}
    rt.dispatcher.send(c.HOP_EXECUTE, args, countdown=countdown, **options)


def first_copy(rt: Runtime, lease: leases.Lease, delivered_first: bool | None) -> bool | None:
    """Whether this copy of a pre-claimed execute message is the first to arrive.

    taskrail's Redis transport tells (``delivered_first``); otherwise the run guard
    does. None: nobody can tell, the database decides.
    """
    if delivered_first is not None:
        return delivered_first
    return rt.run_guard.first(lease.token)


def take_lease(
    rt: Runtime,
    task_id: int,
    attempts: int,
    agent: str | None,
    lease: leases.Lease | None,
    delivered_first: bool | None = None,
) -> leases.Claim | None:
    """The lease for attempt ``attempts + 1``: the pre-claim if this copy of the message
    is the first to run it and still fresh (no database write), else a claim."""
    ttl_s = rt.settings.lease_ttl_s
    if lease is None:
        return leases.claim(rt.db, task_id, attempts, new_token(rt), ttl_s)
    first = first_copy(rt, lease, delivered_first)
    if first is False:
        log.info("hop_skipped", task_id=task_id, reason="duplicate message: already run")
        return None
    if first and lease.fresh(ttl_s, time.time()):
        return leases.Claim(
            task_id=task_id,
            token=lease.token,
            attempt=attempts + 1,
            client_id=lease.client_id,
            task_type=lease.task_type,
            payload=lease.payload,
            agent=agent,
            expires_at=lease.until,
        )
    # Stale, or no shared guard: the database decides (a new token lets one copy win).
    token = lease.token if first else new_token(rt)
    return leases.adopt(rt.db, task_id, attempts + 1, lease.token, token, ttl_s)


def execute(
    rt: Runtime,
    task_id: int,
    attempts: int,
    agent: str | None,
    lease: leases.Lease | None = None,
    delivered_first: bool | None = None,
) -> None:
    """Run attempt ``attempts + 1`` of ``task_id``'s handler, if nothing else has.

    ``delivered_first``: the broker's word on whether this copy of a pre-claimed
    message is the first delivered (None: it cannot tell).
    """
    spec = registry.find(agent) if agent else None
    breaker: SharedBreaker | None = rt.breaker_for(spec) if spec else None
    permit: Permit | None = None
    if spec is not None and breaker is not None:
        try:
            permit = breaker.before_call()
        except BreakerOpen as refused:
            defer(rt, task_id, attempts, spec, refused, lease, delivered_first)
            return
    claimed = take_lease(rt, task_id, attempts, agent, lease, delivered_first)
    if claimed is None:
        if breaker is not None and permit is not None:
            breaker.abandon(permit)
        if lease is None:
            explain_stale(rt, task_id, f"in_progress at attempt {attempts + 1}, not leased")
        return
    token = claimed.token
    structlog.contextvars.bind_contextvars(agent=claimed.agent, attempt=claimed.attempt)
    if spec is None or spec.name != claimed.agent:
        # The message named no agent (or another one): the task's own agent decides.
        if breaker is not None and permit is not None:
            breaker.abandon(permit)
        spec = registry.find(claimed.agent) if claimed.agent else None
        if spec is None:
            finish(rt, claimed, "escalate", reason=f"agent {claimed.agent!r} is not registered")
            return
        breaker = rt.breaker_for(spec)
        try:
            permit = breaker.before_call()
        except BreakerOpen:
            leases.release(rt.db, task_id, token, utcnow(), attempt_used=False, end_deferral=False)
            send_execute(rt, task_id, claimed.attempt - 1, spec.name)
            return
    assert breaker is not None and permit is not None
    run_claimed(rt, spec, breaker, permit, claimed)


def run_claimed(
    rt: Runtime, spec: AgentSpec, breaker: SharedBreaker, permit: Permit, claimed: leases.Claim
) -> None:
    if claimed.attempt > spec.max_attempts:
        breaker.abandon(permit)
        finish(
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
        with rt.leases.hold(claimed.task_id, claimed.token, claimed.expires_at):
            result = spec.handler(view)
    except BaseException as err:
        # The breaker judges: Escalate and PermanentError are business outcomes, not
        # failures of the downstream; KeyboardInterrupt/SystemExit are no verdict.
        breaker.on_failure(permit, err)
        if isinstance(err, Escalate):
            metrics.attempt(spec.name, "escalated")
            finish(rt, claimed, "escalate", reason=err.reason)
        elif isinstance(err, PermanentError):
            metrics.attempt(spec.name, "permanent_error")
            finish(rt, claimed, "fail", reason=err.reason)
        elif isinstance(err, SoftTimeLimitExceeded):
            metrics.attempt(spec.name, "timed_out")
            limit = f"time limit of {spec.time_limit_s:g}s exceeded"
            transient(rt, spec, claimed, limit, trial=permit.trial)
        elif isinstance(err, Exception):
            metrics.attempt(spec.name, "transient_error")
            transient(rt, spec, claimed, error_text(err), trial=permit.trial)
        else:
            raise
        return
    breaker.on_success(permit)
    metrics.attempt(spec.name, "succeeded")
    try:
        ensure_json(result)
    except (TypeError, ValueError) as err:
        finish(rt, claimed, "fail", reason=f"result is not JSON-serialisable: {err}")
        return
    finish(rt, claimed, "complete", result=result)


def finish(
    rt: Runtime, claimed: leases.Claim, event: str, *, reason: str | None = None, result: Any = None
) -> None:
    """Apply the final event of an execution, releasing its lease in the same write."""
    values: dict[str, Any] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "not_before": None,
        "deferred_since": None,
    }
    if event == "complete":
        values["result"] = result
    else:
        values["last_error"] = reason
    # The handler's work is done: a short database outage should not throw it away. Keep
    # the lease alive and try the write again for a while before giving up (the hop is
    # then retried, and the sweeper re-drives the task once the lease expires).
    with rt.leases.hold(claimed.task_id, claimed.token):
        for pause_s in (*FINISH_RETRY_PAUSES_S, None):
            try:
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
                break
            except DatabaseUnavailable as err:
                if pause_s is None:
                    raise
                log.warning("finish_retry", transition=event, error=str(err), pause_s=pause_s)
                time.sleep(pause_s)
    if outcome.outcome is not Outcome.APPLIED:
        log.warning("lease_lost", transition=event, reason="another worker took the task over")


def error_text(err: BaseException) -> str:
    return redact_text(f"{type(err).__name__}: {err}")[:MAX_ERROR_CHARS]


def backoff_s(rt: Runtime, attempt: int) -> float:
    """Exponential backoff with jitter before the attempt after ``attempt``."""
    base = rt.settings.retry_backoff_base_s * 2 ** (attempt - 1)
    return min(rt.settings.retry_backoff_max_s, base) * random.uniform(0.5, 1.0)


def transient(
    rt: Runtime, spec: AgentSpec, claimed: leases.Claim, error: str, *, trial: bool = False
) -> None:
    """A failed attempt: try again after a backoff, or fail after the last attempt."""
    if claimed.attempt >= spec.max_attempts:
        finish(rt, claimed, "fail", reason=f"gave up after {claimed.attempt} attempts: {error}")
        return
    delay = backoff_s(rt, claimed.attempt)
    retry_at = utcnow() + timedelta(seconds=delay)
    released = leases.release(
        rt.db, claimed.task_id, claimed.token, retry_at, error=error, end_deferral=not trial
    )
    if not released:
        log.warning("lease_lost", transition="retry", reason="another worker took the task over")
        return
    log.info(
        "attempt_failed", error=error, retry_in_s=round(delay, 2), max_attempts=spec.max_attempts
    )
    send_execute(rt, claimed.task_id, claimed.attempt, claimed.agent, countdown=delay)


def defer(
    rt: Runtime,
    task_id: int,
    attempts: int,
    spec: AgentSpec,
    refused: BreakerOpen,
    lease: leases.Lease | None = None,
    delivered_first: bool | None = None,
) -> None:
    """The agent's breaker is open: wait for its next trial without using an attempt.

    A pre-claimed attempt is given back; the deferred message claims it later.
    """
    if lease is not None and first_copy(rt, lease, delivered_first) is False:
        log.info("hop_skipped", task_id=task_id, reason="duplicate message: already run")
        return
    now = utcnow()
    delay = min(max(refused.remaining_s, 0.2), c.MAX_DEFER_COUNTDOWN_S) * random.uniform(1.0, 1.2)
    since = leases.defer(
        rt.db,
        task_id,
        attempts,
        now + timedelta(seconds=delay),
        token=lease.token if lease is not None else None,
    )
    if since is None:
        explain_stale(rt, task_id, f"in_progress at attempt {attempts + 1}, not leased")
        return
    if (now - since).total_seconds() > spec.max_deferral_s:
        opened = refused.opened_at or since
        outcome = apply_transition(
            rt.db,
            task_id,
            "escalate",
            expected=TaskStatus.IN_PROGRESS,
            agent=spec.name,
            reason=f"breaker {refused.name} open since {opened.isoformat(timespec='seconds')}",
            worker=rt.worker,
            set_={"not_before": None, "deferred_since": None},
            guard={"attempts": attempts},
        )
        if outcome.outcome is not Outcome.APPLIED:
            explain_stale(rt, task_id, "in_progress")
        return
    metrics.deferral(spec.name)
    log.info(
        "hop_deferred",
        breaker=refused.name,
        breaker_state=refused.state,
        countdown_s=round(delay, 2),
        deferred_for_s=round((now - since).total_seconds(), 1),
    )
    send_execute(rt, task_id, attempts, spec.name, countdown=delay)
