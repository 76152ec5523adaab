"""The execute hop's decisions (``workers.execution.execute``), without servers.

Each test sets a task's row, hands ``execute`` a message, and reads what it decided:
the row it wrote, the hops it would send, the breaker verdicts and handler calls it
made (fakes in conftest.py). The lease is always the database's to grant: a message
only names the one it asks for.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from structlog.testing import capture_logs

from orchestration import constants as c
from orchestration.agents import Escalate, TaskView
from orchestration.breakers import BreakerOpen, Permit
from orchestration.models import TaskStatus, utcnow
from orchestration.store import leases
from tests.unit.workers.conftest import AGENT, OTHER, World
from workers import aio
from workers.calls import CallOutcome, Kind
from workers.execution import execute

PRECLAIM = f"{c.PRECLAIM_TOKEN_PREFIX}other-host:1/aaaaaaaaaaaa"
DEAD_RUN = f"{c.RUN_TOKEN_PREFIX}dead-host:9/bbbbbbbbbbbb"
LIVE_RUN = f"{c.RUN_TOKEN_PREFIX}busy-host:3/cccccccccccc"


def _aware(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite gives it back naive)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _events(log: list[dict[str, Any]]) -> list[str]:
    return [entry["event"] for entry in log]


def _backoff_bounds(world: World, attempt: int) -> tuple[float, float]:
    s = world.settings
    base = min(s.retry_backoff_max_s, s.retry_backoff_base_s * 2 ** (attempt - 1))
    return 0.5 * base, base


def _breaker_open(remaining_s: float = 4.0) -> BreakerOpen:
    return BreakerOpen(f"agent:{AGENT}", remaining_s, datetime(2024, 5, 1, 12, 0, tzinfo=UTC))


# -- taking the lease -----------------------------------------------------------------------


def test_a_preclaim_is_adopted_and_its_attempt_run_to_completion(world: World) -> None:
    # Given a task the start hop pre-claimed (attempt 1 counted, leased to a q: token)
    task_id = world.task(attempts=1, owner=PRECLAIM)
    # When its execute message, naming that pre-claim, is taken
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then the handler ran once, on attempt 1, with the row's payload, under a kept lease
    [call] = world.handler.calls
    assert (call.isolated, call.agent, call.view.attempt) == (False, AGENT, 1)
    assert dict(call.view.payload) == {"n": 1} and call.lease_held
    # And the lease it ran under was a run token of this worker, not the pre-claim
    [(held_id, token)] = world.keeper.held[:1]
    assert held_id == task_id and token.startswith(f"{c.RUN_TOKEN_PREFIX}{world.rt.worker}/")
    # And the task completed with the result, its lease released; nothing was sent
    row = world.row(task_id)
    assert row["status"] == TaskStatus.COMPLETED and row["result"] == {"ok": True}
    assert (row["attempts"], row["lease_owner"], row["lease_expires_at"]) == (1, None, None)
    assert world.dispatcher.sent == []
    assert world.breaker().verdicts() == ["on_success"]
    # And the audit trail names this worker
    last = world.events(task_id)[-1]
    assert (last["event"], last["agent"], last["worker"]) == ("complete", AGENT, world.rt.worker)


def test_the_next_attempt_is_claimed_when_no_lease_holds_the_task(world: World) -> None:
    # Given a task whose attempt 1 failed and whose retry is due (no lease)
    task_id = world.task(attempts=1, last_error="boom")
    # When the retry's message (one attempt done, no token) is taken
    execute(world.rt, task_id, 1, AGENT)
    # Then attempt 2 is counted and run
    assert [call.view.attempt for call in world.handler.calls] == [2]
    row = world.row(task_id)
    assert (row["status"], row["attempts"]) == (TaskStatus.COMPLETED, 2)


def test_an_expired_run_lease_named_by_the_message_is_taken_over_isolated(world: World) -> None:
    # Given a task whose handler's worker died: its r: lease expired
    task_id = world.task(attempts=1, owner=DEAD_RUN, expires_in_s=-5)
    # When the sweeper's message naming that lease is taken
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT, DEAD_RUN)
    # Then the same attempt runs again, in a process of its own, and the row says so
    [call] = world.handler.calls
    assert (call.isolated, call.view.attempt) == (True, 1)
    row = world.row(task_id)
    assert row["isolated"] is True or row["isolated"] == 1
    assert (row["status"], row["attempts"]) == (TaskStatus.COMPLETED, 1)
    assert "lease_taken_over" in _events(log)


def test_an_expired_run_lease_found_on_the_row_is_taken_over(world: World) -> None:
    # Given the same dead worker's lease, and a message that does not name it
    task_id = world.task(attempts=1, owner=DEAD_RUN, expires_in_s=-5)
    # When the message for that attempt is taken
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT)
    # Then the row's expired lease is taken over and the attempt runs isolated
    assert [(call.isolated, call.view.attempt) for call in world.handler.calls] == [(True, 1)]
    assert "lease_taken_over" in _events(log)
    assert world.row(task_id)["status"] == TaskStatus.COMPLETED


def test_a_live_run_lease_makes_the_message_wait_for_it(world: World) -> None:
    # Given a task whose attempt 1 a live handler holds for 30 s more
    task_id = world.task(attempts=1, owner=LIVE_RUN, expires_in_s=30)
    before = world.row(task_id)
    # When a message for that attempt arrives (a redelivered copy)
    execute(world.rt, task_id, 0, AGENT)
    # Then nothing runs and nothing is written: the message is sent again for when the
    # lease ends, naming it, so it can take the attempt over if the holder died
    assert world.handler.calls == []
    assert world.row(task_id) == before
    [sent] = world.dispatcher.sent
    assert sent.hop == c.HOP_EXECUTE and sent.args == [task_id, 0, AGENT, LIVE_RUN]
    assert sent.countdown is not None and 29.0 < sent.countdown <= 31.0
    # And the breaker's permit is handed back without a verdict
    assert world.breaker().verdicts() == ["abandon"]


def test_a_stale_message_is_dropped(world: World) -> None:
    # Given a task at its second attempt, no lease
    task_id = world.task(attempts=2)
    before = world.row(task_id)
    # When an old message for its first attempt arrives
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT)
    # Then it is dropped: nothing runs, written or sent
    assert world.handler.calls == [] and world.dispatcher.sent == []
    assert world.row(task_id) == before
    assert "hop_skipped" in _events(log)


def test_a_message_with_a_forged_preclaim_runs_nothing(world: World) -> None:
    # Given a pre-claimed task
    task_id = world.task(attempts=1, owner=PRECLAIM)
    before = world.row(task_id)
    # When a message names a pre-claim the database never granted
    execute(world.rt, task_id, 0, AGENT, f"{c.PRECLAIM_TOKEN_PREFIX}forged/000000000000")
    # Then it is dropped and the real pre-claim is left as it was
    assert world.handler.calls == [] and world.dispatcher.sent == []
    assert world.row(task_id) == before


def test_a_duplicate_of_an_adopted_preclaim_waits_for_the_run_then_is_dropped(
    world: World,
) -> None:
    # Given a pre-claimed task whose message was delivered twice
    task_id = world.task(attempts=1, owner=PRECLAIM)
    world.handler.outcome = lambda view: (
        # While the first copy's handler runs, the second copy arrives
        execute(world.rt, task_id, 0, AGENT, PRECLAIM) or CallOutcome(Kind.RESULT, result=1)
    )
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then the handler ran once; the copy waits for the run's lease, naming it
    assert len(world.handler.calls) == 1
    [sent] = world.dispatcher.sent
    run_token = world.keeper.held[0][1]
    assert sent.args == [task_id, 0, AGENT, run_token]
    # When the copy comes back after the run completed
    execute(world.rt, task_id, *sent.args[1:])
    # Then it is dropped
    assert len(world.handler.calls) == 1 and len(world.dispatcher.sent) == 1
    assert world.row(task_id)["result"] == 1


def test_a_message_for_a_finished_or_unknown_task_is_dropped(world: World) -> None:
    done = world.task(attempts=1, status=TaskStatus.COMPLETED)
    before = world.row(done)
    with capture_logs() as log:
        execute(world.rt, done, 0, AGENT)
        execute(world.rt, 999_999, 0, AGENT)
    assert world.handler.calls == [] and world.dispatcher.sent == []
    assert world.row(done) == before
    dropped = [e for e in log if e["event"] == "message_dropped"]
    assert [e["task_id"] for e in dropped] == [999_999]


# -- which agent --------------------------------------------------------------------------


def test_a_message_naming_no_agent_runs_the_tasks_own_agent(world: World) -> None:
    task_id = world.task(attempts=1, owner=PRECLAIM)
    execute(world.rt, task_id, 0, None, PRECLAIM)
    assert [call.agent for call in world.handler.calls] == [AGENT]
    assert world.breaker().verdicts() == ["on_success"]


def test_a_message_naming_another_agent_runs_the_tasks_own_agent(world: World) -> None:
    # Given a task assigned to AGENT, and a message naming OTHER
    task_id = world.task(attempts=1, owner=PRECLAIM)
    execute(world.rt, task_id, 0, OTHER, PRECLAIM)
    # Then the row's agent runs, under its own breaker; OTHER's permit goes back unused
    assert [call.agent for call in world.handler.calls] == [AGENT]
    assert world.breaker(OTHER).verdicts() == ["abandon"]
    assert world.breaker(AGENT).verdicts() == ["on_success"]


def test_a_task_whose_agent_this_worker_lacks_is_given_back(world: World) -> None:
    # Given a pre-claimed task of an agent whose module this worker did not load
    task_id = world.task(attempts=1, owner=PRECLAIM, agent="missing_agent")
    execute(world.rt, task_id, 0, None, PRECLAIM)
    # Then the attempt is given back unused and offered again a little later
    assert world.handler.calls == []
    row = world.row(task_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == (
        TaskStatus.IN_PROGRESS,
        0,
        None,
    )
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 0, "missing_agent"] and sent.countdown == 5.0


def test_the_tasks_own_agents_open_breaker_gives_the_attempt_back(world: World) -> None:
    # Given a message naming no agent, and the task's agent's breaker open
    task_id = world.task(attempts=1, owner=PRECLAIM)
    world.breaker(AGENT).script.append(_breaker_open())
    execute(world.rt, task_id, 0, None, PRECLAIM)
    # Then the attempt is given back and the message sent again at once (its next take
    # names the agent, and defers on the breaker)
    assert world.handler.calls == []
    assert world.row(task_id)["attempts"] == 0
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 0, AGENT] and sent.countdown is None


# -- after the call -------------------------------------------------------------------------


def test_an_escalate_escalates_the_task(world: World) -> None:
    task_id = world.task(attempts=1, owner=PRECLAIM)
    world.handler.outcome = CallOutcome(Kind.ESCALATE, reason="needs a human")
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    row = world.row(task_id)
    assert (row["status"], row["last_error"], row["lease_owner"]) == (
        TaskStatus.ESCALATED,
        "needs a human",
        None,
    )
    [(_, _, error)] = [e for e in world.breaker().log if e[0] == "on_failure"]
    assert isinstance(error, Escalate)
    assert world.dispatcher.sent == []


def test_a_permanent_error_fails_the_task_at_once(world: World) -> None:
    task_id = world.task(attempts=1, owner=PRECLAIM)
    world.handler.outcome = CallOutcome(Kind.PERMANENT, reason="invalid account")
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    row = world.row(task_id)
    assert (row["status"], row["last_error"], row["attempts"]) == (
        TaskStatus.FAILED,
        "invalid account",
        1,
    )
    assert world.breaker().verdicts() == ["on_failure"]
    assert world.dispatcher.sent == []


def test_a_transient_error_retries_after_a_backoff(world: World) -> None:
    # Given a pre-claimed task whose handler raises a transient error
    task_id = world.task(attempts=1, owner=PRECLAIM)
    world.handler.outcome = CallOutcome(
        Kind.ERROR, reason="ConnectionError: refused", error=ConnectionError("refused")
    )
    before = utcnow()
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then the attempt is used, the lease released, the error and the retry time recorded
    row = world.row(task_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == (
        TaskStatus.IN_PROGRESS,
        1,
        None,
    )
    assert row["last_error"] == "ConnectionError: refused"
    # And the next attempt is sent after an exponential backoff with jitter
    [sent] = world.dispatcher.sent
    low, high = _backoff_bounds(world, 1)
    assert sent.args == [task_id, 1, AGENT]
    assert sent.countdown is not None and low <= sent.countdown <= high
    not_before = _aware(row["not_before"])
    assert not_before is not None
    assert before + timedelta(seconds=low - 0.1) <= not_before
    assert not_before <= utcnow() + timedelta(seconds=high)
    assert world.breaker().verdicts() == ["on_failure"]


def test_a_time_limit_retries_like_a_transient_error(world: World) -> None:
    task_id = world.task(attempts=1)
    world.handler.outcome = CallOutcome(Kind.TIMEOUT, reason="time limit of 1 s exceeded")
    execute(world.rt, task_id, 1, AGENT)
    row = world.row(task_id)
    assert (row["attempts"], row["last_error"]) == (2, "time limit of 1 s exceeded")
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 2, AGENT]
    [(_, _, error)] = [e for e in world.breaker().log if e[0] == "on_failure"]
    assert isinstance(error, TimeoutError)


def test_the_last_attempts_transient_error_fails_the_task(world: World) -> None:
    # Given a task at its last attempt (max_attempts 3)
    task_id = world.task(attempts=2)
    world.handler.outcome = CallOutcome(Kind.ERROR, reason="x", error=RuntimeError("down"))
    execute(world.rt, task_id, 2, AGENT)
    row = world.row(task_id)
    assert row["status"] == TaskStatus.FAILED
    assert row["last_error"] == "gave up after 3 attempts: RuntimeError: down"
    assert world.dispatcher.sent == []


def test_a_secret_in_a_transient_error_is_not_recorded(world: World) -> None:
    task_id = world.task(attempts=1)
    error = RuntimeError("cannot reach postgresql://bob:hunter2@db.internal/x")
    world.handler.outcome = CallOutcome(Kind.ERROR, reason=str(error), error=error)
    execute(world.rt, task_id, 1, AGENT)
    assert "hunter2" not in world.row(task_id)["last_error"]


def test_a_result_that_cannot_be_stored_fails_the_task(world: World) -> None:
    task_id = world.task(attempts=1)
    world.handler.outcome = CallOutcome(Kind.RESULT, result={"not json": object()})
    execute(world.rt, task_id, 1, AGENT)
    row = world.row(task_id)
    assert row["status"] == TaskStatus.FAILED and row["result"] is None
    assert row["last_error"]
    assert world.breaker().verdicts() == ["on_success"]  # the downstream answered


def test_a_handler_whose_process_died_is_charged_an_attempt_without_a_verdict(
    world: World,
) -> None:
    # Given a task running isolated (a worker died under it before)
    task_id = world.task(attempts=1, owner=DEAD_RUN, expires_in_s=-5)
    world.handler.outcome = CallOutcome(Kind.DIED, reason="the handler's process died (x)")
    execute(world.rt, task_id, 0, AGENT, DEAD_RUN)
    # Then the attempt counts and the next one follows a backoff, still isolated
    row = world.row(task_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == (
        TaskStatus.IN_PROGRESS,
        1,
        None,
    )
    assert row["last_error"] == "the handler's process died (x)" and row["isolated"]
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 1, AGENT]
    # And the breaker hears nothing about the downstream
    assert world.breaker().verdicts() == ["abandon"]


def test_an_attempt_past_the_last_fails_without_a_call(world: World) -> None:
    # Given a task whose last attempt's worker was lost (attempts = max_attempts, no lease)
    task_id = world.task(attempts=3)
    execute(world.rt, task_id, 3, AGENT)
    # Then no fourth attempt runs: the task fails, saying why
    assert world.handler.calls == []
    row = world.row(task_id)
    assert row["status"] == TaskStatus.FAILED
    assert row["last_error"] == (
        "gave up after 3 attempts; the worker running the last one was lost"
    )
    assert world.breaker().verdicts() == ["abandon"]


def test_a_row_that_breaks_the_producers_rules_fails_without_a_call(world: World) -> None:
    task_id = world.task(attempts=1, payload=[1, 2])
    execute(world.rt, task_id, 1, AGENT)
    assert world.handler.calls == []
    row = world.row(task_id)
    assert row["status"] == TaskStatus.FAILED
    assert row["last_error"].startswith("the task cannot run: ")
    assert world.breaker().verdicts() == ["abandon"]


def test_an_outcome_is_not_written_once_another_worker_took_the_lease(world: World) -> None:
    # Given a handler during whose call another worker takes the task over
    task_id = world.task(attempts=1, owner=PRECLAIM)

    def taken_over(view: TaskView) -> CallOutcome:
        world.set(task_id, lease_owner=LIVE_RUN)
        return CallOutcome(Kind.RESULT, result={"late": True})

    world.handler.outcome = taken_over
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then this run's result is not written: the new owner's run decides
    row = world.row(task_id)
    assert (row["status"], row["result"], row["lease_owner"]) == (
        TaskStatus.IN_PROGRESS,
        None,
        LIVE_RUN,
    )
    assert "lease_lost" in _events(log)


def test_a_retry_is_not_sent_once_another_worker_took_the_lease(world: World) -> None:
    task_id = world.task(attempts=1)

    def taken_over(view: TaskView) -> CallOutcome:
        world.set(task_id, lease_owner=LIVE_RUN)
        return CallOutcome(Kind.ERROR, reason="x", error=RuntimeError("x"))

    world.handler.outcome = taken_over
    execute(world.rt, task_id, 1, AGENT)
    assert world.dispatcher.sent == []
    assert world.row(task_id)["lease_owner"] == LIVE_RUN


# -- the breaker ------------------------------------------------------------------------------


def test_an_open_breaker_defers_a_preclaimed_attempt_without_using_it(world: World) -> None:
    # Given a pre-claimed task, and its agent's breaker open for 4 s more
    task_id = world.task(attempts=1, owner=PRECLAIM)
    world.breaker().script.append(_breaker_open(4.0))
    before = utcnow()
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then the handler is not called and the pre-claim is given back with its attempt
    assert world.handler.calls == []
    row = world.row(task_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == (
        TaskStatus.IN_PROGRESS,
        0,
        None,
    )
    # And the task is recorded as deferred, its next take due after the breaker's wait
    deferred_since, not_before = _aware(row["deferred_since"]), _aware(row["not_before"])
    assert deferred_since is not None and not_before is not None
    assert before - timedelta(seconds=1) <= deferred_since <= utcnow()
    assert not_before >= before + timedelta(seconds=3.9)
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 0, AGENT]
    assert sent.countdown is not None and 4.0 <= sent.countdown <= 4.8


def test_an_open_breaker_defers_a_retry_and_keeps_its_first_deferral_time(world: World) -> None:
    # Given a retry due (one attempt done), deferred once already ten seconds ago
    since = utcnow() - timedelta(seconds=10)
    task_id = world.task(attempts=1, deferred_since=since)
    world.breaker().script.append(_breaker_open(0.0))
    execute(world.rt, task_id, 1, AGENT)
    # Then no attempt is used; the deferral keeps its start; the wait is at least 0.2 s
    row = world.row(task_id)
    assert row["attempts"] == 1
    assert abs((_aware(row["deferred_since"]) - since).total_seconds()) < 0.01  # type: ignore[operator]
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 1, AGENT]
    assert sent.countdown is not None and 0.2 <= sent.countdown <= 0.24


def test_an_open_breaker_resends_a_take_over_without_writing(world: World) -> None:
    # Given a dead worker's expired lease, and the agent's breaker open
    task_id = world.task(attempts=1, owner=DEAD_RUN, expires_in_s=-5)
    before = world.row(task_id)
    world.breaker().script.append(_breaker_open(2.0))
    execute(world.rt, task_id, 0, AGENT, DEAD_RUN)
    # Then the take-over message only comes back later, still naming the lease
    assert world.row(task_id) == before
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 0, AGENT, DEAD_RUN]
    assert sent.countdown is not None and 2.0 <= sent.countdown <= 2.4


def test_a_task_deferred_past_max_deferral_is_escalated(world: World) -> None:
    # Given a retry deferred for longer than the agent's max_deferral_s (60 s)
    task_id = world.task(attempts=1, deferred_since=utcnow() - timedelta(seconds=120))
    world.breaker().script.append(_breaker_open())
    execute(world.rt, task_id, 1, AGENT)
    # Then it is escalated, naming the breaker and when it opened; nothing is sent
    row = world.row(task_id)
    assert row["status"] == TaskStatus.ESCALATED
    last = world.events(task_id)[-1]
    assert (last["event"], last["to_status"]) == ("escalate", TaskStatus.ESCALATED)
    assert last["detail"] == f"breaker agent:{AGENT} open since 2024-05-01T12:00:00+00:00"
    assert (row["deferred_since"], row["not_before"]) == (None, None)
    assert world.dispatcher.sent == [] and world.handler.calls == []


def test_a_failed_half_open_trial_gives_its_attempt_back(world: World) -> None:
    # Given a pre-claimed task whose call is the breaker's half-open trial, and it fails
    task_id = world.task(attempts=1, owner=PRECLAIM)
    trial = Permit(f"agent:{AGENT}", trial=True, epoch=2, token="t")
    world.breaker().script.append(trial)
    world.handler.outcome = CallOutcome(Kind.ERROR, reason="x", error=ConnectionError("down"))
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then the breaker hears the failure, but the task is not charged: the attempt goes
    # back and the task waits as deferred for the breaker's next trial
    assert [e[:2] for e in world.breaker().log if e[0] == "on_failure"] == [("on_failure", trial)]
    row = world.row(task_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == (
        TaskStatus.IN_PROGRESS,
        0,
        None,
    )
    assert row["deferred_since"] is not None
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 0, AGENT]
    reset = world.spec.reset_timeout_s
    assert sent.countdown is not None and reset <= sent.countdown <= reset * 1.2


def test_a_failed_trial_after_a_long_outage_escalates(world: World) -> None:
    task_id = world.task(
        attempts=1, owner=PRECLAIM, deferred_since=utcnow() - timedelta(seconds=120)
    )
    world.breaker().script.append(Permit(f"agent:{AGENT}", trial=True, epoch=2))
    world.handler.outcome = CallOutcome(Kind.ERROR, reason="x", error=ConnectionError("down"))
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    row = world.row(task_id)
    assert row["status"] == TaskStatus.ESCALATED
    assert world.events(task_id)[-1]["detail"].startswith(f"breaker agent:{AGENT} open since ")
    assert world.dispatcher.sent == []


def test_a_trial_failing_with_an_excluded_error_charges_the_task(world: World) -> None:
    # Given a half-open trial whose error the breaker does not count against the downstream
    task_id = world.task(attempts=1, owner=PRECLAIM)
    world.breaker().script.append(Permit(f"agent:{AGENT}", trial=True, epoch=2))
    world.breaker().circuit.system_error = False
    world.handler.outcome = CallOutcome(Kind.ERROR, reason="x", error=KeyError("k"))
    execute(world.rt, task_id, 0, AGENT, PRECLAIM)
    # Then it is the task's failure: the attempt is used and retried after a backoff
    row = world.row(task_id)
    assert (row["attempts"], row["deferred_since"]) == (1, None)
    [sent] = world.dispatcher.sent
    assert sent.args == [task_id, 1, AGENT]


def test_a_successful_call_ends_a_deferral(world: World) -> None:
    task_id = world.task(attempts=1, deferred_since=utcnow() - timedelta(seconds=30))
    execute(world.rt, task_id, 1, AGENT)
    row = world.row(task_id)
    assert (row["status"], row["deferred_since"], row["not_before"]) == (
        TaskStatus.COMPLETED,
        None,
        None,
    )


# -- take-overs of calls handed over (workers.aio) --------------------------------------


class _HandsOver:
    """Stands in for this process's executor of handed-over calls: it takes every agent
    and runs the world's fake call at once, on the hop's thread."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.tokens: list[str] = []

    def takes(self, spec: Any) -> bool:
        return True

    def new_stop(self) -> aio.RunStop:
        return aio.RunStop()

    def start(self, spec: Any, view: TaskView, stop: aio.RunStop, conclude: Any) -> bool:
        self.tokens.append(str(self.world.row(view.id)["lease_owner"]))
        conclude(self.world.handler.call(spec, view), False)
        return True


def test_a_handed_over_call_taken_over_from_a_dead_worker_runs_on_not_isolated(
    world: World, monkeypatch: Any
) -> None:
    # Given calls handed over to this process's executor, and a task whose worker died
    executor = _HandsOver(world)
    monkeypatch.setattr(aio, "executor", lambda settings: executor)
    task_id = world.task(attempts=1, owner=DEAD_RUN, expires_in_s=-5)
    # When the message naming the dead run's lease is taken
    with capture_logs() as log:
        execute(world.rt, task_id, 0, AGENT, DEAD_RUN)
    # Then the same attempt runs again handed over, not isolated (its process was shared
    # by many calls: one death does not mark them all), under a token that says so
    [call] = world.handler.calls
    assert (call.isolated, call.view.attempt) == (False, 1)
    [token] = executor.tokens
    assert token.endswith(leases.TAKEN_OVER_MARK) and leases.took_over(token)
    row = world.row(task_id)
    assert not row["isolated"]
    assert (row["status"], row["attempts"]) == (TaskStatus.COMPLETED, 1)
    [taken] = [e for e in log if e["event"] == "lease_taken_over"]
    assert taken["isolated"] is False


def test_a_handed_over_call_whose_take_over_dies_too_runs_isolated(
    world: World, monkeypatch: Any
) -> None:
    # Given a task whose run had already taken over a dead worker's run, and died too
    executor = _HandsOver(world)
    monkeypatch.setattr(aio, "executor", lambda settings: executor)
    twice_dead = DEAD_RUN + leases.TAKEN_OVER_MARK
    for named in (twice_dead, None):  # named by the message, or found on the row
        world.handler.calls.clear()
        task_id = world.task(attempts=1, owner=twice_dead, expires_in_s=-5)
        # When its run is taken over
        execute(world.rt, task_id, 0, AGENT, named)
        # Then it runs isolated, in a process of its own, and stays marked so
        [call] = world.handler.calls
        assert (call.isolated, call.view.attempt) == (True, 1)
        row = world.row(task_id)
        assert row["isolated"] is True or row["isolated"] == 1
        assert row["status"] == TaskStatus.COMPLETED
    assert executor.tokens == []  # never handed over


def test_an_isolated_task_stays_isolated_when_taken_over_again(
    world: World, monkeypatch: Any
) -> None:
    # Given a task already isolated, whose run's worker died, on an executor that hands over
    monkeypatch.setattr(aio, "executor", lambda settings: _HandsOver(world))
    task_id = world.task(attempts=1, owner=DEAD_RUN, expires_in_s=-5)
    world.set(task_id, isolated=True)
    # When its run is taken over
    execute(world.rt, task_id, 0, AGENT, DEAD_RUN)
    # Then it is still isolated, and ran so
    assert [call.isolated for call in world.handler.calls] == [True]
    row = world.row(task_id)
    assert row["isolated"] is True or row["isolated"] == 1
