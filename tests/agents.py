"""Agents the tests register beside the demo ones.

Loaded with ``TASKRAIL_AGENTS=demo_agents,tests.agents``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import redis

from orchestration.agents import TaskView, agent


def key(name: str) -> str:
    """A test key under this test session's prefix."""
    return os.environ.get("TASKRAIL_TEST_KEY_PREFIX", "") + name


def _counter() -> redis.Redis:
    """Where test agents count their calls: TASKRAIL_TEST_COUNTER_URL, a Redis of the tests'
    own (tests/conftest.py ``counter_url``, tests/chaos/conftest.py ``counter_server``)."""
    url = os.environ.get("TASKRAIL_TEST_COUNTER_URL")
    if not url:
        raise RuntimeError("TASKRAIL_TEST_COUNTER_URL is not set: the test agents count there")
    return redis.Redis.from_url(url)


@agent("echo_agent", task_types=["echo"])
def echo(task: TaskView) -> dict[str, Any]:
    """Returns its payload; counts its calls per task in Redis (``calls:<task id>``)."""
    if task.payload.get("count_calls"):
        _counter().incr(key(f"calls:{task.id}"))
    sleep_s = float(task.payload.get("sleep_s", 0))
    if sleep_s:
        time.sleep(sleep_s)
    return {"echo": dict(task.payload), "attempt": task.attempt}


@agent("bad_result_agent", task_types=["bad_result"])
def bad_result(task: TaskView) -> Any:
    return {"not json": object()}


@agent("slow_agent", task_types=["slow"], time_limit_s=3600)
def slow(task: TaskView) -> dict[str, Any]:
    """Counts calls (``calls:<id>``); the first sleeps ``first_sleep_s`` (a long outside call)."""
    calls = _counter().incr(key(f"calls:{task.id}"))
    if calls == 1:
        time.sleep(float(task.payload.get("first_sleep_s", 0)))
    return {"calls": calls}


def _service_call(task: TaskView, flag: str) -> dict[str, Any]:
    """A call to an outside service that is down while the Redis key ``flag`` is "1"."""
    counter = _counter()
    counter.incr(key(f"{flag}:calls"))
    if counter.get(key(flag)) == b"1":
        raise ConnectionError("tax service unreachable")
    return {"served": task.id}


@agent("svc_agent", task_types=["svc"], fail_max=3, reset_timeout_s=5, max_attempts=20)
def svc(task: TaskView) -> dict[str, Any]:
    return _service_call(task, "svc:down")


@agent(
    "svc_doomed_agent",
    task_types=["svc_doomed"],
    fail_max=1,
    reset_timeout_s=1,
    max_deferral_s=3,
    max_attempts=20,
)
def svc_doomed(task: TaskView) -> dict[str, Any]:
    return _service_call(task, "doomed:down")


@agent("dual_broken_agent", task_types=["dual"], fail_max=2, reset_timeout_s=120, max_attempts=20)
def dual_broken(task: TaskView) -> dict[str, Any]:
    return _service_call(task, "dual_broken:down")


@agent("dual_ok_agent", task_types=["dual"])
def dual_ok(task: TaskView) -> dict[str, Any]:
    return {"served": task.id}


# -- the chaos suite's agents (tests/chaos) -----------------------------------------------

_counters: dict[int, redis.Redis] = {}


def _pid_counter() -> redis.Redis:
    """One counter client per process (handlers run many times in one pool process)."""
    client = _counters.get(os.getpid())
    if client is None:
        client = _counters[os.getpid()] = _counter()
    return client


def _chaos_run(task: TaskView) -> dict[str, Any]:
    """Counts calls (``calls:<id>``), notes the pid (``pid:<id>``), sleeps, records the run.

    Payload: ``sleep_s`` (every call), ``first_sleep_s`` (the first call only). A call that
    returns pushes its run id on ``runs:<id>`` just before returning, so a test can check
    that the stored result comes from a run that really finished.
    """
    counter = _pid_counter()
    pipe = counter.pipeline(transaction=False)
    pipe.incr(key(f"calls:{task.id}"))
    pipe.set(key(f"pid:{task.id}"), os.getpid())
    calls = int(pipe.execute()[0])
    sleep_s = float(task.payload.get("sleep_s", 0))
    if calls == 1:
        sleep_s += float(task.payload.get("first_sleep_s", 0))
    if sleep_s:
        time.sleep(sleep_s)
    run = uuid.uuid4().hex[:12]
    counter.rpush(key(f"runs:{task.id}"), run)
    return {"task": task.id, "run": run, "call": calls, "attempt": task.attempt}


@agent("chaos_agent", task_types=["chaos"], max_attempts=10)
def chaos(task: TaskView) -> dict[str, Any]:
    return _chaos_run(task)


@agent("chaos_hour_agent", task_types=["chaos_hour"], time_limit_s=3600, max_attempts=10)
def chaos_hour(task: TaskView) -> dict[str, Any]:
    """The chaos agent with a one-hour time limit."""
    return _chaos_run(task)


@agent("suicide_agent", task_types=["suicide"])
def suicide(task: TaskView) -> dict[str, Any]:
    """A poison task: SIGKILLs the process running it, every time (counts ``calls:<id>``)."""
    _pid_counter().incr(key(f"calls:{task.id}"))
    os.kill(os.getpid(), signal.SIGKILL)
    return {"unreachable": True}


@agent("overrun_agent", task_types=["overrun"], time_limit_s=1, max_attempts=2)
def overrun(task: TaskView) -> dict[str, Any]:
    """Runs past its one-second time limit (``sleep_s``, default 5); counts ``calls:<id>``."""
    _pid_counter().incr(key(f"calls:{task.id}"))
    time.sleep(float(task.payload.get("sleep_s", 5)))
    return {"overran": False}


@agent("exit_agent", task_types=["exit"])
def exits(task: TaskView) -> dict[str, Any]:
    """A poison task on a threads executor: ``os._exit(1)``, every time (counts ``calls:<id>``)."""
    _pid_counter().incr(key(f"calls:{task.id}"))
    os._exit(1)


@agent("hang_agent", task_types=["hang"], time_limit_s=2, max_attempts=2)
def hang(task: TaskView) -> dict[str, Any]:
    """Hangs past its 2 s time limit (``sleep_s``, default 30); counts starts and finishes."""
    counter = _pid_counter()
    counter.incr(key(f"calls:{task.id}"))
    time.sleep(float(task.payload.get("sleep_s", 30)))
    counter.incr(key(f"finished:{task.id}"))
    return {"late": True}


@agent(
    "svc_trial_agent",
    task_types=["svc_trial"],
    fail_max=1,
    reset_timeout_s=1,
    max_attempts=2,
    max_deferral_s=60,
)
def svc_trial(task: TaskView) -> dict[str, Any]:
    """A one-failure breaker in front of a service that is down while ``trial:down`` is 1."""
    return _service_call(task, "trial:down")


# -- cancellation (tests/integration/test_cancel_running.py) ------------------------------


def _note_start(task: TaskView) -> redis.Redis:
    """Counts the call (``calls:<id>``) and notes the process it runs in (``pid:<id>``)."""
    counter = _pid_counter()
    pipe = counter.pipeline(transaction=False)
    pipe.incr(key(f"calls:{task.id}"))
    pipe.set(key(f"pid:{task.id}"), os.getpid())
    pipe.execute()
    return counter


@agent("cancellable_agent", task_types=["cancellable"], max_attempts=1)
def cancellable(task: TaskView) -> dict[str, Any]:
    """Works in steps of 0.1 s for ``run_s`` (default 20 s), reading ``task.cancelled``
    between them. Records the steps it saw before the flag (``saw_cancel:<id>``, set only
    when it saw it) and that it returned (``returned:<id>``)."""
    counter = _note_start(task)
    steps = int(float(task.payload.get("run_s", 20)) / 0.1)
    for step in range(steps):
        if task.cancelled:
            counter.set(key(f"saw_cancel:{task.id}"), step)
            break
        time.sleep(0.1)
    counter.set(key(f"returned:{task.id}"), 1)
    return {"steps": steps, "cancelled": task.cancelled}


@agent("stubborn_agent", task_types=["stubborn"], max_attempts=1)
def stubborn(task: TaskView) -> dict[str, Any]:
    """Never reads ``task.cancelled``: sleeps ``sleep_s`` (default 5), then returns a
    result (noting ``returned:<id>``)."""
    counter = _note_start(task)
    time.sleep(float(task.payload.get("sleep_s", 5)))
    counter.set(key(f"returned:{task.id}"), 1)
    return {"ignored": "the cancel"}
