"""Cancelling tasks on real servers and real workers (issue 21): a running handler is told
(``task.cancelled``), its lease released at once and its late result never written; a
task cancelled while its hops are queued never runs its handler; an isolated run is
killed. The test agents (tests/agents.py) count what they did in the counter Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import text

from orchestration import api
from orchestration import constants as c
from orchestration.store.db import Database
from orchestration.store.recovery import claim_stuck
from orchestration.store.transitions import apply_transition
from tests.agent_scene import HOPS, AgentScene
from tests.agents import key
from tests.support import WorkerFleet

pytestmark = pytest.mark.integration

BY = "ops-alice"


class Scene(AgentScene):
    """The scene, and what the cancel tests ask of it."""

    def handler_started(self, task_id: int) -> None:
        self.wait_for(lambda: self.count("calls", task_id), "the handler never started")

    def discarded(self, task_id: int, what: str) -> dict[str, Any]:
        """The one log line saying ``task_id``'s late result was discarded."""
        [late] = self.wait_for(lambda: self.log_lines("late_result_discarded", task_id), what)
        return late

    def assert_cancelled_once(self, task_id: int, before: list[str]) -> None:
        """The task rests cancelled, with no result, no lease, and ``before`` then one
        cancel event by BY as its history: nothing was written after the cancel."""
        row = self.row(task_id)
        assert row["status"] == "cancelled"
        assert row["result"] is None
        assert (row["lease_owner"], row["lease_expires_at"]) == (None, None)
        events = self.events_by(task_id)
        assert [event for event, _ in events] == [*before, "cancel"]
        assert events[-1][1] == BY

    def a_later_task_completes(self) -> None:
        later = api.submit("echo", 2, {"after": "cancel"})
        self.drain([later])
        assert api.get(later).status == "completed"


@pytest.fixture
def scene(
    server_settings: Any, pg_db: Database, pg_url: str, counter_url: str, fleet: WorkerFleet
) -> Iterator[Scene]:
    counter = redis.Redis.from_url(counter_url)
    yield Scene(pg_db, pg_url, counter, fleet)
    counter.close()


@pytest.mark.parametrize("pool", ["threads", "prefork", "solo"])
def test_a_running_handler_is_told_and_its_late_result_is_not_written(
    pool: str, scene: Scene
) -> None:
    # Given a handler that works for 20 s in steps, reading task.cancelled between them
    scene.deploy(pool)
    task_id = api.submit("cancellable", 1, {"run_s": 20})
    scene.handler_started(task_id)
    assert scene.row(task_id)["lease_owner"].startswith(c.RUN_TOKEN_PREFIX)
    # When it is cancelled while it runs
    api.cancel(task_id, reason="client withdrew", by=BY)
    # Then its lease is released at once, by the cancel itself
    row = scene.row(task_id)
    assert (row["status"], row["lease_owner"], row["lease_expires_at"]) == ("cancelled", None, None)
    assert row["last_error"] == "client withdrew"
    # and the handler sees the flag and returns
    scene.wait_for(lambda: scene.noted("saw_cancel", task_id), "no flag seen")
    scene.wait_for(lambda: scene.noted("returned", task_id), "never returned")
    # and its result is logged as discarded, never written
    late = scene.discarded(task_id, "nothing discarded")
    assert (late["reason"], late["handler"]) == ("cancelled", "returned")
    assert scene.log_lines("run_cancelled", task_id)
    scene.assert_cancelled_once(task_id, ["assign", "start"])
    assert scene.row(task_id)["attempts"] == 1
    # and the handler ran exactly once; nothing re-drives a cancelled task
    assert scene.count("calls", task_id) == 1
    assert [r.task_id for r in claim_stuck(scene.pg_db, redrive_after_s=0, batch=100)] == []
    # and the executor works on
    scene.a_later_task_completes()
    assert scene.count("calls", task_id) == 1
    scene.assert_cancelled_once(task_id, ["assign", "start"])
    assert not scene.log_lines("lease_lost", task_id)


def test_a_handler_that_ignores_the_flag_has_its_result_discarded(scene: Scene) -> None:
    # Given a handler that sleeps 5 s and then returns, whatever happened meanwhile
    scene.deploy("threads")
    task_id = api.submit("stubborn", 1, {"sleep_s": 5})
    scene.handler_started(task_id)
    # When the task is cancelled while it sleeps
    api.cancel(task_id, by=BY)
    # Then, once it returned, its result is discarded
    scene.wait_for(lambda: scene.noted("returned", task_id), "never returned")
    late = scene.discarded(task_id, "nothing discarded")
    assert (late["reason"], late["handler"]) == ("cancelled", "returned")
    scene.assert_cancelled_once(task_id, ["assign", "start"])
    assert scene.row(task_id)["last_error"] == "cancelled"
    assert scene.count("calls", task_id) == 1
    scene.a_later_task_completes()
    scene.assert_cancelled_once(task_id, ["assign", "start"])


def test_tasks_cancelled_while_their_hops_are_queued_never_run(scene: Scene) -> None:
    # Given, with no worker running, a pending task (its assign message queued) and an
    # assigned one (assign and start messages queued)
    pending, assigned = (api.submit("cancellable", i, {"run_s": 1}) for i in range(2))
    apply_transition(scene.pg_db, assigned, "assign", agent="cancellable_agent")
    api.client().dispatcher.send(c.HOP_START, [assigned])
    # When both are cancelled
    api.cancel(pending, by=BY)
    api.cancel(assigned, by=BY)
    # and a task the hops took to in_progress (its pre-claimed execute message queued, no
    # executor running) is cancelled too
    started = api.submit("cancellable", 3, {"run_s": 1})
    scene.fleet.start(pool="solo", concurrency=1, queues=HOPS)
    scene.wait_for(lambda: api.get(started).status == "in_progress", "never started")
    api.cancel(started, by=BY)
    # and an executor takes the queued execute message
    scene.fleet.start(pool="threads", concurrency=4, queues=c.QUEUE_EXECUTE)
    scene.a_later_task_completes()
    # Then every queued hop for them is dropped quietly
    for task_id in (pending, assigned, started):
        scene.wait_for(
            lambda task_id=task_id: scene.log_lines("hop_skipped", task_id),
            f"task {task_id}'s hop was not dropped",
        )
    for task_id, hop in ((pending, "assign"), (assigned, "start"), (started, "execute")):
        skipped = scene.log_lines("hop_skipped", task_id)
        assert {entry["status"] for entry in skipped} == {"cancelled"}
        assert hop in {entry["hop"] for entry in skipped}
    # and no handler ran; each task stays cancelled with its one cancel event
    for task_id in (pending, assigned, started):
        assert scene.count("calls", task_id) == 0
    scene.assert_cancelled_once(pending, [])
    scene.assert_cancelled_once(assigned, ["assign"])
    scene.assert_cancelled_once(started, ["assign", "start"])
    assert "Traceback" not in scene.fleet.logs()


def test_an_isolated_run_is_killed_when_its_task_is_cancelled(scene: Scene) -> None:
    # Given a task that runs isolated (a worker died under it before), in a process of
    # its own, where its handler cannot see the flag: it would run for 20 s
    task_id = api.submit("cancellable", 1, {"run_s": 20})
    with scene.pg_db.begin() as conn:
        conn.execute(text("UPDATE tasks SET isolated = true WHERE id = :id"), {"id": task_id})
    scene.deploy("threads")
    scene.handler_started(task_id)
    child = int(scene.counter.get(key(f"pid:{task_id}")) or 0)
    assert child not in {worker.proc.pid for worker in scene.fleet.workers}
    # When the task is cancelled
    api.cancel(task_id, by=BY)
    # Then the child process is killed, and that is all
    killed = scene.discarded(task_id, "not killed")
    assert (killed["reason"], killed["handler"]) == ("cancelled", "killed")
    scene.wait_for(lambda: not _alive(child), "the child process lives on")
    assert not scene.noted("returned", task_id)
    scene.assert_cancelled_once(task_id, ["assign", "start"])
    assert scene.count("calls", task_id) == 1
    scene.a_later_task_completes()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
