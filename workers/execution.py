"""The execute hop's work: breaker, lease, handler call, and what follows from it.

::

    breaker open?      -> defer: not_before recorded, execute re-sent with a countdown,
                          no attempt consumed; escalate after the agent's max_deferral_s
    take the lease     -> the database decides (workers never trust a message's word):
                          the pre-claim the message names, the next attempt, or the
                          expired lease of a worker that died (then the handler runs in
                          a process of its own); a lease still held: wait for it to
                          end; anything else: a duplicate or stale message, dropped
    call the handler   -> result            complete
                          Escalate          escalate
                          PermanentError    fail
                          time limit        another attempt after a backoff, or fail
                          anything else     another attempt after a backoff, or fail
                                            after max_attempts; a failed half-open
                                            trial uses no attempt (a deferral)
                          cancelled         nothing: the task was cancelled (or the run
                                            taken over) while the handler ran; its
                                            result is discarded, no attempt counted,
                                            no verdict for the breaker

While the handler runs, the lease keeper watches its run (every ``cancel_poll_s``): once
the task is no longer in progress under this run's lease it sets the run's stop event,
which the handler reads as ``TaskView.cancelled`` and which ends the hop's wait
(:mod:`workers.calls`). An outcome write is a compare-and-set on the status and the
lease, so a result that comes back after a cancel is never written either.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from orchestration import constants as c
from orchestration import values
from orchestration.agents import (
    AgentSpec,
    Escalate,
    PermanentError,
    TaskView,
    ensure_json,
    registry,
)
from orchestration.breakers import BreakerOpen, Permit, SharedBreaker
from orchestration.errors import DatabaseUnavailable, ResultRejected, TaskrailError
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, utcnow
from orchestration.ops import metrics
from orchestration.redact import redact_text
from orchestration.store import leases
from orchestration.store.transitions import Move, Outcome
from workers import aio, calls
from workers.calls import CallOutcome, Kind
from workers.runtime import Runtime

log = get_logger("taskrail.hop")

MAX_ERROR_CHARS = 2000
# Pauses between tries of an outcome's write while the database is unreachable: the
# handler's work is done, so the write is tried until the database is back.
OUTCOME_RETRY_PAUSES_S = (0.5, 1.0, 2.0, 4.0)
OUTCOME_RETRY_MAX_PAUSE_S = 5.0
# How long a message for a task whose agent this worker lacks waits before it is
# offered again.
NO_AGENT_COUNTDOWN_S = 5.0

T = TypeVar("T")


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


def send_execute(
    rt: Runtime,
    task_id: int,
    attempts: int,
    agent: str | None,
    countdown: float | None = None,
    token: str | None = None,
) -> None:
    """Send the execute hop for the attempt after ``attempts``.

    ``token`` names the lease the hop takes: a pre-claim of that attempt (the start hop
    made it in its statement), or the expired run lease of a worker that died.
    """
    args: list[Any] = [task_id, attempts, agent]
    if token is not None:
        args.append(token)
    rt.dispatcher.send(c.HOP_EXECUTE, args, countdown=countdown)


def take_lease(
    rt: Runtime,
    task_id: int,
    attempts: int,
    token: str | None,
    spec: AgentSpec | None = None,
) -> leases.Claim | None:
    """The lease for attempt ``attempts + 1``, as the database grants it, or None.

    One statement in the common case (a pre-claim adopted, or the next attempt
    claimed), which also reads the payload. When that matches nothing the row says
    why: a lease still held makes the message wait for it (re-sent with a countdown),
    a lease that expired under a dead worker is taken over, anything else is a
    duplicate or stale message.

    A take-over isolates the task (its handler runs in a process of its own from then
    on), except for a call this process hands over (``spec``'s, workers.aio): that one
    shared its process with many others, so it is isolated only when the process of a
    run that had already taken over dies too (``leases.took_over``).
    """
    ttl_s = rt.settings.lease_ttl_s
    mine = leases.run_token(rt.worker)
    if token is None:
        claimed = leases.take(rt.db, task_id, attempts, mine, ttl_s)
    elif leases.is_run_token(token):
        claimed = take_over(rt, task_id, attempts, token, spec)
    else:
        claimed = leases.take(
            rt.db, task_id, attempts, mine, ttl_s, how=leases.Take.ADOPT, prior=token
        )
    if claimed is not None:
        return claimed
    row = leases.describe(rt.db, task_id)
    if row is None:
        log.warning("message_dropped", task_id=task_id, reason="no such task")
        return None
    owner = row["lease_owner"]
    # The row counts a run once it is leased: this message's run is counted as done + 1.
    same_attempt = row["status"] == TaskStatus.IN_PROGRESS and row["attempts"] == attempts + 1
    if same_attempt and owner is not None:
        expires = row["lease_expires_at"]
        remaining_s = (expires - utcnow()).total_seconds() if expires is not None else 0.0
        if leases.is_run_token(owner) and remaining_s > 0:
            # A handler holds this attempt: it finishes, or its lease runs out (a dead
            # worker) and the message, back then, takes the attempt over.
            log.info("hop_waiting", task_id=task_id, reason="lease held", wait_s=round(remaining_s))
            send_execute(
                rt, task_id, attempts, row["assigned_agent"], remaining_s + 1.0, token=owner
            )
            return None
        if leases.is_run_token(owner):
            taken = take_over(rt, task_id, attempts, owner, spec)
            if taken is not None:
                return taken
    explain_stale(rt, task_id, f"in_progress at attempt {attempts + 1}")
    return None


def take_over(
    rt: Runtime, task_id: int, attempts: int, dead: str, spec: AgentSpec | None
) -> leases.Claim | None:
    """Take over the run whose lease ``dead`` expired (its worker died), isolated unless
    the call is handed over here and ``dead`` had not itself taken over a run."""
    calls_here = aio.executor(rt.settings) if spec is not None else None
    handed_over = spec is not None and calls_here is not None and calls_here.takes(spec)
    isolate = not handed_over or leases.took_over(dead)
    mine = leases.run_token(rt.worker) if isolate else leases.taken_over_token(rt.worker)
    taken = leases.take(
        rt.db,
        task_id,
        attempts,
        mine,
        rt.settings.lease_ttl_s,
        how=leases.Take.TAKE_OVER,
        prior=dead,
        isolate=isolate,
    )
    if taken is not None:
        log.warning("lease_taken_over", task_id=task_id, dead_owner=dead, isolated=taken.isolated)
    return taken


def execute(
    rt: Runtime, task_id: int, attempts: int, agent: str | None, token: str | None = None
) -> None:
    """Run attempt ``attempts + 1`` of ``task_id``'s handler, if the database grants it."""
    spec = registry.find(agent) if agent else None
    breaker: SharedBreaker | None = rt.breaker_for(spec) if spec else None
    permit: Permit | None = None
    if spec is not None and breaker is not None:
        try:
            permit = breaker.before_call()
        except BreakerOpen as refused:
            defer(rt, task_id, attempts, spec, refused, token)
            return
    claimed = take_lease(rt, task_id, attempts, token, spec)
    if claimed is None:
        if breaker is not None and permit is not None:
            breaker.abandon(permit)
        return
    # Log lines name the attempt by its number, as the handler sees it (TaskView.attempt).
    structlog.contextvars.bind_contextvars(agent=claimed.agent, attempt=claimed.attempts + 1)
    if spec is None or spec.name != claimed.agent:
        # The message named no agent (or another one): the task's own agent decides.
        if breaker is not None and permit is not None:
            breaker.abandon(permit)
        spec = registry.find(claimed.agent) if claimed.agent else None
        if spec is None:
            # This worker lacks the agent's module: give the attempt back for one that
            # has it.
            log.error("no_agent_for_task", agent=claimed.agent)
            give_back(rt, claimed, countdown_s=NO_AGENT_COUNTDOWN_S)
            return
        breaker = rt.breaker_for(spec)
        try:
            permit = breaker.before_call()
        except BreakerOpen:
            give_back(rt, claimed, countdown_s=None)
            return
    assert breaker is not None and permit is not None
    run_claimed(rt, spec, breaker, permit, claimed)


def give_back(rt: Runtime, claimed: leases.Claim, countdown_s: float | None) -> None:
    """Release a claimed attempt unused and send it again (after ``countdown_s``)."""
    released = persist(
        "give_back",
        lambda: leases.release(
            rt.db, claimed.task_id, claimed.token, utcnow(), attempt_used=False, end_deferral=False
        ),
    )
    if released:
        send_execute(rt, claimed.task_id, claimed.attempts, claimed.agent, countdown_s)


def run_claimed(
    rt: Runtime, spec: AgentSpec, breaker: SharedBreaker, permit: Permit, claimed: leases.Claim
) -> None:
    if claimed.attempts >= spec.max_attempts:
        breaker.abandon(permit)
        finish(
            rt,
            claimed,
            "fail",
            reason=(
                f"gave up after {claimed.attempts} attempts; "
                "the worker running the last one was lost"
            ),
        )
        return
    # Handed over to the executor of this process's calls (workers.aio: async handlers
    # with --async-calls, sync ones with --sync-calls), or run in this thread.
    loop_calls = None if claimed.isolated else aio.executor(rt.settings)
    if loop_calls is not None and not loop_calls.takes(spec):
        loop_calls = None
    # Set by the lease keeper when the run is no longer wanted.
    stop = loop_calls.new_stop() if loop_calls is not None else threading.Event()
    try:
        # The producer's own rules: a row that breaks them was never accepted by them.
        values.check_task_row(claimed.client_id, claimed.task_type, claimed.payload)
        view = TaskView.build(
            claimed.task_id,
            claimed.client_id,
            claimed.task_type,
            claimed.payload,
            claimed.attempts + 1,  # the handler sees the number of its attempt
            stop=stop,
        )
    except (TaskrailError, ValueError, TypeError, RecursionError) as err:
        breaker.abandon(permit)
        finish(rt, claimed, "fail", reason=f"the task cannot run: {error_text(err)}")
        return
    if loop_calls is not None:
        assert isinstance(stop, aio.RunStop)
        hand_over(rt, loop_calls, spec, breaker, permit, claimed, view, stop)
        return
    with rt.leases.hold(claimed.task_id, claimed.token, claimed.expires_at, stop=stop):
        if claimed.isolated:
            outcome = calls.call_isolated(spec, view, tuple(rt.settings.agents))
        else:
            outcome = calls.call(spec, view)
    conclude(rt, spec, breaker, permit, claimed, outcome, stopped=stop.is_set())


def hand_over(
    rt: Runtime,
    loop_calls: aio.AsyncCalls,
    spec: AgentSpec,
    breaker: SharedBreaker,
    permit: Permit,
    claimed: leases.Claim,
    view: TaskView,
    stop: aio.RunStop,
) -> None:
    """Give the call to the async executor and return: the lease, kept alive by the lease
    keeper until the outcome is written, is the run's claim from now on."""
    held = contextlib.ExitStack()
    held.enter_context(
        rt.leases.hold(claimed.task_id, claimed.token, claimed.expires_at, stop=stop)
    )

    def written(outcome: CallOutcome, stopped: bool) -> None:
        with held:
            if outcome.kind is Kind.CANCELLED and outcome.reason == aio.SHUTDOWN and not stopped:
                # The worker is stopping: the attempt goes back unused, to another worker.
                breaker.abandon(permit)
                give_back(rt, claimed, countdown_s=None)
                return
            conclude(rt, spec, breaker, permit, claimed, outcome, stopped=stopped)

    try:
        started = loop_calls.start(spec, view, stop, written)
    except BaseException:
        held.close()
        raise
    if not started:  # shutting down: another worker runs it
        with held:
            breaker.abandon(permit)
            give_back(rt, claimed, countdown_s=None)


def conclude(
    rt: Runtime,
    spec: AgentSpec,
    breaker: SharedBreaker,
    permit: Permit,
    claimed: leases.Claim,
    outcome: CallOutcome,
    *,
    stopped: bool = False,
) -> None:
    """Tell the breaker how the call went and write what follows from it.

    ``stopped``: the lease keeper found the run no longer this worker's (the task was
    cancelled, or taken over) while it ran: nothing is written, whatever the outcome.
    """
    kind = outcome.kind
    if stopped or kind is Kind.CANCELLED:
        # Not the downstream's doing: no verdict; the attempt ends with the task.
        breaker.abandon(permit)
        metrics.attempt(spec.name, "cancelled")
        if kind is not Kind.CANCELLED:  # the handler ended: its outcome is dropped here
            handler = {Kind.RESULT: "returned", Kind.DIED: "died"}.get(kind, "raised")
            calls.discarded(claimed.task_id, handler, calls.CANCELLED_REASON)
        return
    if kind is Kind.RESULT:
        breaker.on_success(permit)
        metrics.attempt(spec.name, "succeeded")
        try:
            stored = ensure_json(outcome.result)
        except ResultRejected as err:
            finish(rt, claimed, "fail", reason=str(err))
            return
        except (TaskrailError, TypeError, ValueError, RecursionError) as err:
            finish(rt, claimed, "fail", reason=f"result cannot be stored: {error_text(err)}")
            return
        finish(rt, claimed, "complete", result=stored)
    elif kind is Kind.ESCALATE:
        breaker.on_failure(permit, outcome.error or Escalate(outcome.reason))
        metrics.attempt(spec.name, "escalated")
        finish(rt, claimed, "escalate", reason=outcome.reason)
    elif kind is Kind.PERMANENT:
        breaker.on_failure(permit, outcome.error or PermanentError(outcome.reason))
        metrics.attempt(spec.name, "permanent_error")
        finish(rt, claimed, "fail", reason=outcome.reason)
    elif kind is Kind.DIED:
        # The handler killed its own process: no verdict on the downstream.
        breaker.abandon(permit)
        metrics.attempt(spec.name, "died")
        transient(rt, spec, claimed, outcome.reason)
    else:
        error = outcome.error or (
            TimeoutError(outcome.reason) if kind is Kind.TIMEOUT else RuntimeError(outcome.reason)
        )
        breaker.on_failure(permit, error)
        metrics.attempt(spec.name, "timed_out" if kind is Kind.TIMEOUT else "transient_error")
        text = outcome.reason if kind is Kind.TIMEOUT else error_text(error)
        if permit.trial and breaker.circuit.is_system_error(error):
            trial_failed(rt, spec, claimed, text)
        else:
            transient(rt, spec, claimed, text)


def persist(what: str, write: Callable[[], T]) -> T:
    """``write()``, tried again until the database is back: the handler's work is done."""
    pauses = iter(OUTCOME_RETRY_PAUSES_S)
    while True:
        try:
            return write()
        except DatabaseUnavailable as err:
            pause_s = next(pauses, OUTCOME_RETRY_MAX_PAUSE_S)
            log.warning("outcome_write_retry", write=what, error=str(err), pause_s=pause_s)
            time.sleep(pause_s)


def finish(
    rt: Runtime, claimed: leases.Claim, event: str, *, reason: str | None = None, result: Any = None
) -> None:
    """Apply the final event of an execution (``complete`` with the ``result``, ``fail``
    or ``escalate`` with the ``reason``); the event's writes release the lease.

    The write is retried while the database is unreachable, the lease kept alive
    meanwhile; it applies only while this run still holds the lease.
    """
    move = Move(
        claimed.task_id,
        event,
        expected=TaskStatus.IN_PROGRESS,
        agent=claimed.agent,
        reason=reason,
        result=result,
        lease=claimed.token,
    )
    with rt.leases.hold(claimed.task_id, claimed.token):
        outcome = persist(event, lambda: rt.transitions.apply(move))
    if outcome.outcome is not Outcome.APPLIED:
        lost(rt, claimed.task_id, event)


def lost(rt: Runtime, task_id: int, transition: str) -> None:
    """Log why a run's write matched nothing: the task was cancelled meanwhile (its result
    is discarded), or another worker took the run over. Reads the row (a lost write is
    rare); a database that cannot say is the second case's line."""
    try:
        row = leases.describe(rt.db, task_id)
    except TaskrailError:
        row = None
    if row is not None and row["status"] == TaskStatus.CANCELLED:
        handler = "returned" if transition == "complete" else "raised"
        calls.discarded(task_id, handler, calls.CANCELLED_REASON)
    else:
        log.warning("lease_lost", transition=transition, reason="another worker took the task over")


def error_text(err: BaseException) -> str:
    return redact_text(f"{type(err).__name__}: {err}")[:MAX_ERROR_CHARS]


def backoff_s(rt: Runtime, attempts: int) -> float:
    """Exponential backoff with jitter before the attempt after ``attempts`` done."""
    base = rt.settings.retry_backoff_base_s * 2 ** (attempts - 1)
    return min(rt.settings.retry_backoff_max_s, base) * random.uniform(0.5, 1.0)


def transient(rt: Runtime, spec: AgentSpec, claimed: leases.Claim, error: str) -> None:
    """A failed attempt: try again after a backoff, or fail after the last attempt.

    A handler whose process died runs isolated from now on (the flag is on the row).
    """
    done = claimed.attempts + 1  # this one included
    if done >= spec.max_attempts:
        finish(rt, claimed, "fail", reason=f"gave up after {done} attempts: {error}")
        return
    delay = backoff_s(rt, done)
    retry_at = utcnow() + timedelta(seconds=delay)
    released = persist(
        "retry",
        lambda: leases.release(rt.db, claimed.task_id, claimed.token, retry_at, error=error),
    )
    if not released:
        lost(rt, claimed.task_id, "retry")
        return
    log.info(
        "attempt_failed", error=error, retry_in_s=round(delay, 2), max_attempts=spec.max_attempts
    )
    send_execute(rt, claimed.task_id, done, claimed.agent, countdown=delay)


def trial_failed(rt: Runtime, spec: AgentSpec, claimed: leases.Claim, error: str) -> None:
    """The breaker's half-open trial failed: the outage's, not the task's, so the attempt
    is given back and the task waits as deferred (bounded by ``max_deferral_s``)."""
    now = utcnow()
    delay = min(spec.reset_timeout_s, c.MAX_DEFER_COUNTDOWN_S) * random.uniform(1.0, 1.2)
    attempts = claimed.attempts
    since = persist(
        "trial_failed",
        lambda: leases.defer(
            rt.db, claimed.task_id, attempts, now + timedelta(seconds=delay), token=claimed.token
        ),
    )
    if since is None:
        lost(rt, claimed.task_id, "defer")
        return
    log.info("trial_failed", error=error)
    wait_or_escalate(rt, claimed.task_id, attempts, spec, since, delay, spec.breaker_name)


def defer(
    rt: Runtime,
    task_id: int,
    attempts: int,
    spec: AgentSpec,
    refused: BreakerOpen,
    token: str | None = None,
) -> None:
    """The agent's breaker is open: wait for its next trial without using an attempt.

    A pre-claimed attempt is given back; the deferred message claims it later. A
    message that takes over a dead worker's lease is only sent again later.
    """
    delay = min(max(refused.remaining_s, 0.2), c.MAX_DEFER_COUNTDOWN_S) * random.uniform(1.0, 1.2)
    if token is not None and leases.is_run_token(token):
        send_execute(rt, task_id, attempts, spec.name, countdown=delay, token=token)
        return
    retry_at = utcnow() + timedelta(seconds=delay)
    since = leases.defer(rt.db, task_id, attempts, retry_at, token=token)
    if since is None:
        explain_stale(rt, task_id, f"in_progress at attempt {attempts + 1}, not leased")
        return
    wait_or_escalate(
        rt, task_id, attempts, spec, since, delay, refused.name, refused.opened_at, refused.state
    )


def wait_or_escalate(
    rt: Runtime,
    task_id: int,
    attempts: int,
    spec: AgentSpec,
    since: datetime,
    delay_s: float,
    breaker: str,
    opened_at: datetime | None = None,
    breaker_state: str = "open",
) -> None:
    """A deferred task (recorded ``since``) waits ``delay_s`` more, or is escalated once
    it has waited longer than its agent's ``max_deferral_s``."""
    now = utcnow()
    if (now - since).total_seconds() > spec.max_deferral_s:
        opened = opened_at or since
        outcome = rt.transitions.apply(
            Move(
                task_id,
                "escalate",
                expected=TaskStatus.IN_PROGRESS,
                agent=spec.name,
                reason=f"breaker {breaker} open since {opened.isoformat(timespec='seconds')}",
                attempts=attempts,
            )
        )
        if outcome.outcome is not Outcome.APPLIED:
            explain_stale(rt, task_id, "in_progress")
        return
    metrics.deferral(spec.name)
    log.info(
        "hop_deferred",
        breaker=breaker,
        breaker_state=breaker_state,
        countdown_s=round(delay_s, 2),
        deferred_for_s=round((now - since).total_seconds(), 1),
    )
    send_execute(rt, task_id, attempts, spec.name, countdown=delay_s)
