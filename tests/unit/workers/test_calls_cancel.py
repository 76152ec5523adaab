"""A handler call whose run is stopped (``workers.calls`` with the view's stop event set):
the hop stops waiting, the handler reads ``task.cancelled``, a late result is discarded,
an isolated child is killed. And a handler's own TimeoutError is its error, not the
time limit."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestration.agents import AgentSpec, TaskView
from workers import calls
from workers.calls import CallOutcome, Kind

WAIT_S = 20.0  # a generous bound for what should take a fraction of a second


def _spec(handler: Any, time_limit_s: float = 60.0, name: str = "unit_cancel_agent") -> AgentSpec:
    return AgentSpec(
        name=name, handler=handler, task_types=("unit_work",), time_limit_s=time_limit_s
    )


def _view(stop: threading.Event | None) -> TaskView:
    return TaskView.build(52, 7, "unit_work", {"n": 1}, 1, stop=stop)


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_view_is_cancelled_once_its_stop_event_is_set() -> None:
    stop = threading.Event()
    view = _view(stop)
    assert not view.cancelled
    stop.set()
    assert view.cancelled
    # A view no worker watches (a test's, an isolated child's) is never cancelled
    assert not _view(None).cancelled
    # and the event is no part of the view's value
    assert view == _view(None) and "stop" not in repr(view)


def test_a_handler_raising_timeout_error_is_a_transient_error_not_the_time_limit() -> None:
    def handler(task: TaskView) -> Any:
        raise TimeoutError("read from the tax service timed out")

    with capture_logs() as log:
        outcome = calls.call(_spec(handler), _view(None))
    assert outcome.kind is Kind.ERROR
    assert outcome.reason == "TimeoutError: read from the tax service timed out"
    assert not [e for e in log if e["event"] == "late_result_discarded"]


def test_a_stopped_run_ends_the_wait_the_handler_sees_the_flag_its_result_is_discarded() -> None:
    # Given a handler that works in steps, reading task.cancelled between them
    stop = threading.Event()
    seen = threading.Event()
    wound_down = threading.Event()
    returned = threading.Event()
    started = threading.Event()

    def handler(task: TaskView) -> dict[str, Any]:
        started.set()
        while not task.cancelled:
            time.sleep(0.01)
        seen.set()
        wound_down.wait(WAIT_S)  # winds down after the hop has stopped waiting
        returned.set()
        return {"late": True}

    with capture_logs() as log:
        result: list[CallOutcome] = []
        hop = threading.Thread(
            target=lambda: result.append(calls.call(_spec(handler), _view(stop)))
        )
        hop.start()
        assert started.wait(WAIT_S)
        # When its run is stopped (the lease keeper found the task cancelled)
        stop.set()
        hop.join(WAIT_S)
        # Then the hop stopped waiting, with a cancelled outcome (no result)
        assert result == [CallOutcome(Kind.CANCELLED, reason="cancelled")]
        # and the handler saw the flag; what it returns later is only logged as discarded
        assert seen.wait(WAIT_S)
        wound_down.set()
        assert returned.wait(WAIT_S)
        _wait_for(
            lambda: any(e["event"] == "late_result_discarded" for e in log),
            "the late result was not logged",
        )
    [late] = [e for e in log if e["event"] == "late_result_discarded"]
    assert (late["task_id"], late["handler"], late["reason"]) == (52, "returned", "cancelled")


def test_a_run_stopped_after_the_handler_returned_keeps_the_outcome_for_the_hop() -> None:
    # The hop decides with the flag; the call itself reports what the handler did
    stop = threading.Event()

    def handler(task: TaskView) -> str:
        stop.set()
        return "done"

    assert calls.call(_spec(handler), _view(stop)) == CallOutcome(Kind.RESULT, result="done")


_CHILD_AGENTS = """
import os
import time

from orchestration.agents import agent


@agent("unit_child_naps", task_types=["unit_child"])
def naps(task):
    with open(os.environ["UNIT_CHILD_PID_FILE"], "w") as out:
        out.write(str(os.getpid()))
    time.sleep(60)
    return {"woke": True}
"""


def test_an_isolated_run_is_killed_when_it_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a handler running in a process of its own, for a minute
    (tmp_path / "unit_child_cancel_agents.py").write_text(textwrap.dedent(_CHILD_AGENTS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(Path(calls.__file__).resolve().parents[1]))
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("UNIT_CHILD_PID_FILE", str(pid_file))
    stop = threading.Event()
    result: list[CallOutcome] = []

    def run() -> None:
        spec = _spec(None, name="unit_child_naps")
        result.append(calls.call_isolated(spec, _view(stop), ("unit_child_cancel_agents",)))

    with capture_logs() as log:
        hop = threading.Thread(target=run)
        hop.start()
        _wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the child never started")
        pid = int(pid_file.read_text())
        # When the run is stopped
        stop.set()
        hop.join(WAIT_S)
    # Then the child was killed (and reaped) and the outcome is cancelled, not a death
    assert result == [CallOutcome(Kind.CANCELLED, reason="cancelled")]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    [killed] = [e for e in log if e["event"] == "late_result_discarded"]
    assert (killed["task_id"], killed["handler"], killed["reason"]) == (52, "killed", "cancelled")
