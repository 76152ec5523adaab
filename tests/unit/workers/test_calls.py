"""Handler calls (``workers.calls``): outcomes, the time limit, a child process that dies."""

from __future__ import annotations

import contextvars
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestration.agents import AgentSpec, Escalate, PermanentError, TaskView
from workers import calls
from workers.calls import CallOutcome, Kind

VIEW = TaskView.build(41, 7, "unit_work", {"n": 1}, 1)


def _spec(handler: Any, time_limit_s: float = 5.0, name: str = "unit_call_agent") -> AgentSpec:
    return AgentSpec(
        name=name, handler=handler, task_types=("unit_work",), time_limit_s=time_limit_s
    )


# -- classify ---------------------------------------------------------------------------------


def test_classify_escalate_and_permanent_keep_the_handlers_reason() -> None:
    up, bad = Escalate("needs a human"), PermanentError("invalid account")
    assert calls.classify(up) == CallOutcome(Kind.ESCALATE, reason="needs a human", error=up)
    assert calls.classify(bad) == CallOutcome(Kind.PERMANENT, reason="invalid account", error=bad)


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (ConnectionError("refused"), "ConnectionError: refused"),
        (KeyError("k"), "KeyError: 'k'"),
        (SystemExit(3), "SystemExit: 3"),
        (KeyboardInterrupt(), "KeyboardInterrupt: "),
    ],
)
def test_classify_anything_else_is_a_transient_error(err: BaseException, reason: str) -> None:
    assert calls.classify(err) == CallOutcome(Kind.ERROR, reason=reason, error=err)


# -- call -------------------------------------------------------------------------------------


def test_a_handler_that_returns_gives_its_result() -> None:
    seen: list[TaskView] = []

    def handler(task: TaskView) -> dict[str, Any]:
        seen.append(task)
        return {"double": task.payload["n"] * 2}

    assert calls.call(_spec(handler), VIEW) == CallOutcome(Kind.RESULT, result={"double": 2})
    assert seen == [VIEW]


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (Escalate("up"), Kind.ESCALATE),
        (PermanentError("no"), Kind.PERMANENT),
        (RuntimeError("down"), Kind.ERROR),
        (SystemExit(1), Kind.ERROR),  # the handler's failure, not the worker's exit
    ],
)
def test_what_a_handler_raises_is_its_outcome(raised: BaseException, kind: Kind) -> None:
    def handler(task: TaskView) -> None:
        raise raised

    outcome = calls.call(_spec(handler), VIEW)
    assert outcome.kind is kind and outcome.error is raised


def test_a_handler_sees_the_callers_context_variables() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("unit_var", default="unset")
    token = var.set("hop context")
    try:
        outcome = calls.call(_spec(lambda task: var.get()), VIEW)
    finally:
        var.reset(token)
    assert outcome.result == "hop context"


def test_past_the_time_limit_the_call_times_out_and_the_late_result_is_discarded() -> None:
    # Given a handler that runs past its 0.2 s time limit, then returns
    release = threading.Event()
    finished = threading.Event()

    def handler(task: TaskView) -> str:
        release.wait(5)
        finished.set()
        return "late"

    with capture_logs() as log:
        started = time.monotonic()
        outcome = calls.call(_spec(handler, time_limit_s=0.2), VIEW)
        waited = time.monotonic() - started
        # Then the hop stopped waiting at the limit, and the attempt timed out
        assert outcome == CallOutcome(Kind.TIMEOUT, reason="time limit of 0.2 s exceeded")
        assert 0.2 <= waited < 1.0
        # When the handler returns afterwards
        release.set()
        assert finished.wait(5)
        deadline = time.monotonic() + 5
        while not any(e["event"] == "late_result_discarded" for e in log):
            assert time.monotonic() < deadline, log
            time.sleep(0.01)
    # Then its result is only logged as discarded
    [late] = [e for e in log if e["event"] == "late_result_discarded"]
    assert (late["task_id"], late["handler"]) == (VIEW.id, "returned")


def test_a_hung_handler_does_not_hold_up_the_next_call() -> None:
    hung = threading.Event()
    try:
        first = calls.call(_spec(lambda task: hung.wait(10), time_limit_s=0.2), VIEW)
        second = calls.call(_spec(lambda task: "next"), VIEW)
    finally:
        hung.set()
    assert first.kind is Kind.TIMEOUT and second == CallOutcome(Kind.RESULT, result="next")


# -- call_isolated (a child process: no server, ~0.5 s each) --------------------------------------

_CHILD_AGENTS = """
import os
import signal
import time

from orchestration.agents import PermanentError, agent


@agent("unit_child_ok", task_types=["unit_child"])
def ok(task):
    print("noise on stdout")  # goes to stderr in the child: the reply stays parseable
    return {"n": task.payload["n"], "attempt": task.attempt}


@agent("unit_child_dies", task_types=["unit_child"])
def dies(task):
    os.kill(os.getpid(), signal.SIGKILL)


@agent("unit_child_permanent", task_types=["unit_child"])
def permanent(task):
    raise PermanentError("bad input")


@agent("unit_child_sleeps", task_types=["unit_child"])
def sleeps(task):
    time.sleep(30)
"""


@pytest.fixture
def child_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    """A module of agents the child process imports (from its working directory)."""
    (tmp_path / "unit_child_agents.py").write_text(textwrap.dedent(_CHILD_AGENTS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(Path(calls.__file__).resolve().parents[1]))
    return ("unit_child_agents",)


def test_an_isolated_call_gives_the_childs_result(child_agents: tuple[str, ...]) -> None:
    outcome = calls.call_isolated(_spec(None, name="unit_child_ok"), VIEW, child_agents)
    assert outcome == CallOutcome(Kind.RESULT, result={"n": 1, "attempt": 1})


def test_an_isolated_call_gives_the_childs_verdict(child_agents: tuple[str, ...]) -> None:
    outcome = calls.call_isolated(_spec(None, name="unit_child_permanent"), VIEW, child_agents)
    assert outcome == CallOutcome(Kind.PERMANENT, reason="bad input")


def test_a_child_that_kills_itself_is_a_died_outcome(child_agents: tuple[str, ...]) -> None:
    outcome = calls.call_isolated(_spec(None, name="unit_child_dies"), VIEW, child_agents)
    assert outcome == CallOutcome(
        Kind.DIED, reason="the handler's process died (killed by SIGKILL)"
    )


def test_a_child_past_its_time_limit_is_killed(
    child_agents: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calls, "ISOLATED_START_GRACE_S", 2.0)
    started = time.monotonic()
    outcome = calls.call_isolated(
        _spec(None, time_limit_s=0.2, name="unit_child_sleeps"), VIEW, child_agents
    )
    assert outcome == CallOutcome(Kind.TIMEOUT, reason="time limit of 0.2 s exceeded")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("returncode", "reason"),
    [
        (-signal.SIGKILL, "the handler's process died (killed by SIGKILL)"),
        (-250, "the handler's process died (killed by signal 250)"),
        (3, "the handler's process died (exit code 3)"),
        (None, "the handler's process died (exit code None)"),
    ],
)
def test_died_reason_says_how(returncode: int | None, reason: str) -> None:
    assert calls.died_reason(returncode) == reason
