"""Agents the tests register beside the demo ones.

Loaded with ``TASKRAIL_AGENTS=demo_agents,tests.agents``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import redis

from orchestration.agents import Escalate, PermanentError, TaskView, agent


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


# -- async handlers (tests/integration/test_async_agents.py) ------------------------------


@agent("async_echo_agent", task_types=["async_echo"])
async def async_echo(task: TaskView) -> dict[str, Any]:
    """Counts the call (``calls:<id>``, ``pid:<id>``), awaits ``sleep_s`` (default 0.2) and
    returns its payload, saying it ran on an event loop."""
    _note_start(task)
    await asyncio.sleep(float(task.payload.get("sleep_s", 0.2)))
    loop = asyncio.get_running_loop()
    return {"echo": dict(task.payload), "attempt": task.attempt, "loop": loop.is_running()}


@agent("async_outcome_agent", task_types=["async_outcome"], max_attempts=3, fail_max=100)
async def async_outcome(task: TaskView) -> dict[str, Any]:
    """Counts the call, then, after an await, does what ``do`` says: ``escalate``,
    ``permanent``, or ``flaky`` (a ConnectionError on each of the first ``fail_times``
    calls, then a result)."""
    counter = _note_start(task)
    await asyncio.sleep(0.01)
    do = task.payload.get("do")
    if do == "escalate":
        raise Escalate("missing W-2 (async)")
    if do == "permanent":
        raise PermanentError("invalid account (async)")
    calls = int(counter.get(key(f"calls:{task.id}")) or 0)
    if do == "flaky" and calls <= int(task.payload.get("fail_times", 2)):
        raise ConnectionError(f"tax service unreachable (call {calls})")
    return {"calls": calls, "attempt": task.attempt}


@agent("async_hang_agent", task_types=["async_hang"], time_limit_s=2, max_attempts=2)
async def async_hang(task: TaskView) -> dict[str, Any]:
    """Awaits for an hour past its 2 s time limit; counts starts (``calls:<id>``), the
    cancels it sees (``cancelled:<id>``) and finishes (``finished:<id>``)."""
    counter = _note_start(task)
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        counter.incr(key(f"cancelled:{task.id}"))
        raise
    counter.incr(key(f"finished:{task.id}"))
    return {"late": True}


@agent("async_cancellable_agent", task_types=["async_cancellable"], max_attempts=1)
async def async_cancellable(task: TaskView) -> dict[str, Any]:
    """Awaits ``run_s`` (default 20 s). Notes a cancel it sees (``cancelled:<id>``, and
    ``saw_cancel:<id>`` when ``task.cancelled`` said so too) and a return (``returned:<id>``)."""
    counter = _note_start(task)
    try:
        await asyncio.sleep(float(task.payload.get("run_s", 20)))
    except asyncio.CancelledError:
        counter.incr(key(f"cancelled:{task.id}"))
        if task.cancelled:
            counter.set(key(f"saw_cancel:{task.id}"), 1)
        raise
    counter.set(key(f"returned:{task.id}"), 1)
    return {"cancelled": task.cancelled}


# -- the async executor (tests/integration/test_async_executor.py, tests/chaos) ----------

# Counts calls in flight (``inflight``) and the most seen at once (``max_inflight``).
_GAUGE_UP = """
local now = redis.call('INCR', KEYS[1])
if now > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], now) end
return now
"""
_gates: dict[tuple[int, str], tuple[asyncio.Event, asyncio.Task[None]]] = {}


async def _gate(name: str) -> None:
    """Wait until the counter Redis has the key ``gate:<name>``: one watcher per event loop
    and gate looks every 0.1 s, however many calls wait on it."""
    loop = asyncio.get_running_loop()
    found = _gates.get((id(loop), name))
    if found is None:
        opened = asyncio.Event()

        async def watch() -> None:
            while not _pid_counter().exists(key(f"gate:{name}")):
                await asyncio.sleep(0.1)
            opened.set()

        found = _gates[(id(loop), name)] = (opened, loop.create_task(watch()))
    await found[0].wait()


@agent("async_gauge_agent", task_types=["async_gauge"], time_limit_s=300, max_attempts=10)
async def async_gauge(task: TaskView) -> dict[str, Any]:
    """Counts the call (``calls:<id>``, ``pid:<id>``) and the calls in flight (``inflight``,
    ``max_inflight``); awaits the gate ``gate`` names (else ``sleep_s``, default 0.2); notes
    a cancel it sees (``cancelled:<id>``); a call that returns notes ``finished:<id>`` and
    pushes its run id on ``runs:<id>`` just before returning (as the chaos agents do)."""
    counter = _note_start(task)
    counter.eval(_GAUGE_UP, 2, key("inflight"), key("max_inflight"))
    try:
        gate = task.payload.get("gate")
        if gate:
            await _gate(str(gate))
        else:
            await asyncio.sleep(float(task.payload.get("sleep_s", 0.2)))
    except asyncio.CancelledError:
        counter.incr(key(f"cancelled:{task.id}"))
        raise
    finally:
        counter.decr(key("inflight"))
    run = uuid.uuid4().hex[:12]
    pipe = counter.pipeline(transaction=False)
    pipe.incr(key(f"finished:{task.id}"))
    pipe.rpush(key(f"runs:{task.id}"), run)
    pipe.execute()
    return {"task": task.id, "run": run, "attempt": task.attempt}


@agent("async_svc_agent", task_types=["async_svc"], fail_max=2, reset_timeout_s=3, max_attempts=20)
async def async_svc(task: TaskView) -> dict[str, Any]:
    """An async call to a service that is down while ``async_svc:down`` is "1"; counts
    calls per task (``calls:<id>``)."""
    counter = _note_start(task)
    await asyncio.sleep(0.01)
    if counter.get(key("async_svc:down")) == b"1":
        raise ConnectionError("tax service unreachable (async)")
    return {"served": task.id, "attempt": task.attempt}


@agent("async_chaos_agent", task_types=["async_chaos"], max_attempts=10, time_limit_s=60)
async def async_chaos(task: TaskView) -> dict[str, Any]:
    """The chaos agent, async: counts calls (``calls:<id>``) and calls in flight
    (``inflight``, ``max_inflight``; a killed call stays counted), notes each call's pid
    (``pid:<id>``, and ``callpids:<id>`` in call order), awaits ``sleep_s`` (plus
    ``first_sleep_s`` on the first call) and pushes its run id on ``runs:<id>`` just
    before returning."""
    counter = _pid_counter()
    pipe = counter.pipeline(transaction=False)
    pipe.incr(key(f"calls:{task.id}"))
    pipe.set(key(f"pid:{task.id}"), os.getpid())
    pipe.rpush(key(f"callpids:{task.id}"), os.getpid())
    pipe.eval(_GAUGE_UP, 2, key("inflight"), key("max_inflight"))
    calls = int(pipe.execute()[0])
    sleep_s = float(task.payload.get("sleep_s", 0))
    if calls == 1:
        sleep_s += float(task.payload.get("first_sleep_s", 0))
    try:
        await asyncio.sleep(sleep_s)
    finally:
        counter.decr(key("inflight"))
    run = uuid.uuid4().hex[:12]
    counter.rpush(key(f"runs:{task.id}"), run)
    return {"task": task.id, "run": run, "call": calls, "attempt": task.attempt}


@agent("sync_gauge_agent", task_types=["sync_gauge"], time_limit_s=300, max_attempts=10)
def sync_gauge(task: TaskView) -> dict[str, Any]:
    """A sync call of ``sleep_s`` (default 0.5): counts it (``calls:<id>``) and the calls in
    flight (``inflight``, ``max_inflight``), and ``finished:<id>`` when it returns."""
    counter = _note_start(task)
    counter.eval(_GAUGE_UP, 2, key("inflight"), key("max_inflight"))
    try:
        time.sleep(float(task.payload.get("sleep_s", 0.5)))
    finally:
        counter.decr(key("inflight"))
    counter.incr(key(f"finished:{task.id}"))
    return {"task": task.id, "attempt": task.attempt}
