"""Fakes around ``workers.execution.execute``: no broker, no Redis, no handler thread.

The database is real (the embedded SQLite file): the worker's decisions are the rows
it writes. What would leave the process is recorded instead: the hops the dispatcher
would send, the breaker's verdicts, the handler calls.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import structlog
from sqlalchemy import select, update

from orchestration import api
from orchestration.agents import AgentSpec, TaskView, registry
from orchestration.breakers import BreakerOpen, Permit
from orchestration.models import TaskStatus, events_table, tasks_table, utcnow
from orchestration.settings import Settings
from workers import calls
from workers.calls import CallOutcome, Kind
from workers.runtime import Runtime

AGENT = "unit_agent"
OTHER = "unit_other_agent"
TASK_TYPE = "unit_work"
WORKER = "unit-host:4242"


@dataclass
class Sent:
    hop: str
    args: list[Any]
    countdown: float | None


class FakeDispatcher:
    """Records what ``send`` would publish."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def send(self, hop: str, args: Any, countdown: float | None = None, **_: Any) -> None:
        self.sent.append(Sent(hop, list(args), countdown))


class FakeKeeper:
    """Records the leases held; ``holding`` is what is held right now, ``stops`` the stop
    event of each watched run (the real keeper sets it when the task is cancelled)."""

    def __init__(self) -> None:
        self.held: list[tuple[int, str]] = []
        self.holding: list[tuple[int, str]] = []
        self.stops: dict[int, threading.Event] = {}

    @contextmanager
    def hold(
        self,
        task_id: int,
        token: str,
        expires_at: float | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> Iterator[None]:
        if stop is not None:
            self.stops[task_id] = stop
        self.held.append((task_id, token))
        self.holding.append((task_id, token))
        try:
            yield
        finally:
            self.holding.remove((task_id, token))


class FakeCircuit:
    def __init__(self) -> None:
        self.system_error = True

    def is_system_error(self, exception: BaseException) -> bool:
        return self.system_error


@dataclass
class FakeBreaker:
    """A breaker whose ``before_call`` answers from ``script`` (a Permit, or a BreakerOpen
    to raise); a closed breaker's permit when the script is empty. ``log`` records every
    call: ("before_call",), ("on_success", permit), ("on_failure", permit, error),
    ("abandon", permit)."""

    name: str
    script: list[Permit | BreakerOpen] = field(default_factory=list)
    log: list[tuple[Any, ...]] = field(default_factory=list)
    circuit: FakeCircuit = field(default_factory=FakeCircuit)

    def before_call(self) -> Permit:
        self.log.append(("before_call",))
        verdict = self.script.pop(0) if self.script else Permit(self.name, trial=False, epoch=1)
        if isinstance(verdict, BreakerOpen):
            raise verdict
        return verdict

    def on_success(self, permit: Permit) -> None:
        self.log.append(("on_success", permit))

    def on_failure(self, permit: Permit, error: BaseException) -> None:
        self.log.append(("on_failure", permit, error))

    def abandon(self, permit: Permit) -> None:
        self.log.append(("abandon", permit))

    def verdicts(self) -> list[str]:
        """The calls after ``before_call``, by name."""
        return [entry[0] for entry in self.log if entry[0] != "before_call"]


class FakeBoard:
    """One FakeBreaker per name, made on first use."""

    def __init__(self) -> None:
        self.breakers: dict[str, FakeBreaker] = {}

    def breaker(self, name: str, **_: Any) -> FakeBreaker:
        return self.breakers.setdefault(name, FakeBreaker(name))

    def for_agent(self, agent: str) -> FakeBreaker:
        return self.breaker(f"agent:{agent}")


@dataclass
class Call:
    isolated: bool
    agent: str
    view: TaskView
    lease_held: bool


class FakeCalls:
    """Stands in for ``workers.calls.call`` and ``call_isolated``: answers ``outcome``
    (a CallOutcome, or a function of the view giving one) and records each call."""

    def __init__(self, keeper: FakeKeeper) -> None:
        self.keeper = keeper
        self.outcome: CallOutcome | Callable[[TaskView], CallOutcome] = CallOutcome(
            Kind.RESULT, result={"ok": True}
        )
        self.calls: list[Call] = []

    def _answer(self, isolated: bool, spec: AgentSpec, view: TaskView) -> CallOutcome:
        held = any(task_id == view.id for task_id, _ in self.keeper.holding)
        self.calls.append(Call(isolated, spec.name, view, held))
        return self.outcome(view) if callable(self.outcome) else self.outcome

    def call(self, spec: AgentSpec, view: TaskView) -> CallOutcome:
        return self._answer(False, spec, view)

    def call_isolated(
        self, spec: AgentSpec, view: TaskView, agent_modules: tuple[str, ...]
    ) -> CallOutcome:
        return self._answer(True, spec, view)


def _never_called(task: TaskView) -> Any:
    raise AssertionError("the handler is faked in these tests")


@dataclass
class World:
    """A fake Runtime over the embedded database, and helpers to set and read rows."""

    rt: Runtime
    trail: api.Taskrail
    dispatcher: FakeDispatcher
    keeper: FakeKeeper
    board: FakeBoard
    handler: FakeCalls
    spec: AgentSpec

    @property
    def settings(self) -> Settings:
        return self.rt.settings

    def breaker(self, agent: str = AGENT) -> FakeBreaker:
        return self.board.for_agent(agent)

    def task(
        self,
        *,
        attempts: int = 1,
        owner: str | None = None,
        expires_in_s: float = 30.0,
        agent: str | None = AGENT,
        status: TaskStatus = TaskStatus.IN_PROGRESS,
        **values: Any,
    ) -> int:
        """A task whose row is as given (in_progress at ``attempts`` by default)."""
        (task_id,) = self.trail.submit_many(
            [{"task_type": TASK_TYPE, "client_id": 7, "payload": {"n": 1}}]
        )
        values.update(
            status=status,
            assigned_agent=agent,
            attempts=attempts,
            lease_owner=owner,
            lease_expires_at=utcnow() + timedelta(seconds=expires_in_s) if owner else None,
        )
        self.set(task_id, **values)
        return task_id

    def set(self, task_id: int, **values: Any) -> None:
        t = tasks_table
        with self.trail.db.begin() as conn:
            conn.execute(update(t).where(t.c.id == task_id).values(**values))

    def row(self, task_id: int) -> dict[str, Any]:
        t = tasks_table
        with self.trail.db.connect() as conn:
            found = conn.execute(select(t).where(t.c.id == task_id)).mappings().one()
        return dict(found)

    def events(self, task_id: int) -> list[dict[str, Any]]:
        """The task's audit trail written so far, oldest first."""
        e = events_table
        with self.trail.db.connect() as conn:
            rows = conn.execute(select(e).where(e.c.task_id == task_id).order_by(e.c.id))
            return [dict(r) for r in rows.mappings()]


@pytest.fixture
def world(embedded: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """``execute(world.rt, ...)`` runs against the embedded database, with fakes for the
    dispatcher, the lease keeper, the breaker board and the handler call."""
    spec = registry.register(
        AgentSpec(
            name=AGENT,
            handler=_never_called,
            task_types=(TASK_TYPE,),
            max_attempts=3,
            time_limit_s=1.0,
            reset_timeout_s=10.0,
            max_deferral_s=60.0,
        )
    )
    registry.register(AgentSpec(name=OTHER, handler=_never_called, task_types=(TASK_TYPE,)))
    trail = api.client()
    keeper = FakeKeeper()
    handler = FakeCalls(keeper)
    monkeypatch.setattr(calls, "call", handler.call)
    monkeypatch.setattr(calls, "call_isolated", handler.call_isolated)
    dispatcher, board = FakeDispatcher(), FakeBoard()
    parts: dict[str, Any] = {
        "settings": embedded,
        "db": trail.db,
        "dispatcher": dispatcher,
        "worker": WORKER,
        "leases": keeper,
        "breakers": board,
    }
    if "transitions" in {f.name for f in dataclasses.fields(Runtime)}:
        # The real writes, as this worker (the store the worker builds, less the metric).
        from orchestration.store.transitions import TransitionStore

        parts["transitions"] = TransitionStore(trail.db, worker=WORKER)
    rt = Runtime(**parts)
    try:
        yield World(rt, trail, dispatcher, keeper, board, handler, spec)
    finally:
        registry.unregister(AGENT)
        registry.unregister(OTHER)
        structlog.contextvars.clear_contextvars()
