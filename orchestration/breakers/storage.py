"""Where a breaker's state lives: Redis, shared by every process (memory: :mod:`.memory`;
the same operations awaited, for coroutines: :mod:`.async_storage`).

Both storages subclass pybreaker's own (:class:`pybreaker.CircuitRedisStorage`,
:class:`pybreaker.CircuitMemoryStorage`). :class:`SharedBreaker` drives them only
through the atomic operations below: ``read``, ``record_failure``, ``record_success``,
``acquire_trial``, ``finish_trial``, ``abandon_trial``, ``reset`` and ``force_open``,
each one Lua script (one command) in Redis, or one short critical section in memory.
Redis errors propagate (:class:`redis.exceptions.RedisError`); the breaker decides what
they mean.

pybreaker's storage interface keeps working on the same state, so a
:class:`RedisBreakerStorage` can be the ``state_storage`` of a stock
``pybreaker.CircuitBreaker``, shared by every process that builds one on the same
namespace and name: it then behaves as it does over pybreaker's own
``CircuitMemoryStorage`` (failure and success counters, ``success_threshold``,
listeners, generators, ``throw_new_error_on_trip``; tested side by side). It keeps the
stock breaker's own limits, which :class:`SharedBreaker` exists to remove: counters and
state change in separate commands, every process may try while half-open, and a Redis
error propagates out of ``call`` (it is not read as "closed").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import pybreaker
import redis
from redis.commands.core import AsyncScript, Script

from orchestration import constants as c
from orchestration.breakers import lua
from orchestration.breakers.model import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    BreakerInfo,
    Reply,
    Snapshot,
    ms_to_datetime,
)


class BreakerStorage(Protocol):
    """The atomic operations a :class:`SharedBreaker` needs from its storage."""

    def read(self, *, register: bool = False, fail_max: int = 0, reset_ms: int = 0) -> Reply: ...
    def record_failure(self, epoch: int, fail_max: int, reset_ms: int) -> Reply: ...
    def record_success(self, epoch: int) -> Reply: ...
    def acquire_trial(self, token: str, lease_ms: int) -> Reply: ...
    def finish_trial(self, token: str, ok: bool, reset_ms: int) -> Reply: ...
    def abandon_trial(self, token: str) -> Reply: ...
    def reset(self, *, known_only: bool = False) -> Reply: ...
    def force_open(self, reset_ms: int) -> Reply: ...


class AsyncBreakerStorage(Protocol):
    """:class:`BreakerStorage`'s operations as coroutines (``redis.asyncio``), for the
    coroutine call path. The same scripts, keys and replies."""

    async def read(
        self, *, register: bool = False, fail_max: int = 0, reset_ms: int = 0
    ) -> Reply: ...
    async def record_failure(self, epoch: int, fail_max: int, reset_ms: int) -> Reply: ...
    async def record_success(self, epoch: int) -> Reply: ...
    async def acquire_trial(self, token: str, lease_ms: int) -> Reply: ...
    async def finish_trial(self, token: str, ok: bool, reset_ms: int) -> Reply: ...
    async def abandon_trial(self, token: str) -> Reply: ...
    async def reset(self, *, known_only: bool = False) -> Reply: ...
    async def force_open(self, reset_ms: int) -> Reply: ...


def breaker_keys(namespace: str, name: str) -> tuple[str, str, str]:
    """The state hash, the registry set and the trial-lease key of breaker ``name``."""
    return (
        f"{namespace}:{c.BREAKER_KEY_SEGMENT}:{name}",
        f"{namespace}:{c.BREAKER_REGISTRY_SEGMENT}",
        f"{namespace}:{c.BREAKER_TRIAL_KEY_SEGMENT}:{name}",
    )


def _text(value: Any) -> str:
    # decode_responses=True hands back str, the default bytes: accept both.
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _int_or_none(value: Any) -> int | None:
    text = "" if value is None else _text(value)
    return int(text) if text else None


def script_argv(name: str, clock: Callable[[], float] | None, *args: Any) -> list[str]:
    """A script's ARGV (see :mod:`.lua`): the breaker's name, the time (empty: the script
    reads Redis's ``TIME``; else milliseconds from ``clock``) and the operation's own."""
    now = "" if clock is None else str(int(clock() * 1000))
    return [name, now, *(str(a) for a in args)]


def parse_reply(raw: Sequence[Any], read_mono: float) -> Reply:
    """A :class:`Reply` from a script's nine-string reply (see :mod:`.lua`), read at
    ``read_mono`` on the local monotonic clock."""
    state, fails, epoch, opened, nxt, now, changed, verdict, wait = (_text(v) for v in raw)
    snapshot = Snapshot(
        state=state,
        fail_count=int(fails),
        epoch=int(epoch),
        opened_at_ms=_int_or_none(opened),
        next_trial_ms=_int_or_none(nxt) if state == STATE_OPEN else None,
        now_ms=int(now),
        read_mono=read_mono,
    )
    return Reply(snapshot, changed or None, verdict, int(wait))


class CommandTally:
    """A thread-safe count of the commands sent (for the overhead budget); the async
    clients of one board share one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n

    @property
    def count(self) -> int:
        return self._count


class CountingRedis(redis.Redis):
    """A redis-py client that counts the commands it sends into ``tally``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tally = CommandTally()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.tally.add(1)
        return super().execute_command(*args, **options)

    def add_commands(self, n: int) -> None:
        """Count ``n`` commands sent another way (a pipeline)."""
        self.tally.add(n)

    @property
    def commands(self) -> int:
        return self.tally.count


ScriptT = TypeVar("ScriptT", Script, AsyncScript)
_Registered = TypeVar("_Registered", covariant=True)


class _Registers(Protocol[_Registered]):
    """A redis-py client, sync or async."""

    def register_script(self, script: str, /) -> _Registered: ...


class Scripts(Generic[ScriptT]):
    """The Lua scripts of :mod:`.lua` registered on one client, sync (``Script``) or
    ``redis.asyncio`` (``AsyncScript``): ``EVALSHA``, loaded on first use."""

    def __init__(self, client: _Registers[ScriptT]) -> None:
        self.read: ScriptT = client.register_script(lua.READ)
        self.failure: ScriptT = client.register_script(lua.FAILURE)
        self.success: ScriptT = client.register_script(lua.SUCCESS)
        self.trial: ScriptT = client.register_script(lua.TRIAL)
        self.trial_done: ScriptT = client.register_script(lua.TRIAL_DONE)
        self.abandon: ScriptT = client.register_script(lua.ABANDON)
        self.reset: ScriptT = client.register_script(lua.RESET)
        self.force_open: ScriptT = client.register_script(lua.FORCE_OPEN)


class RedisBreakerStorage(pybreaker.CircuitRedisStorage):
    """One breaker's state in Redis, changed only by the atomic scripts of :mod:`.lua`.

    pybreaker's own storage keeps ``state``, ``fail_counter`` and ``opened_at`` in
    separate keys changed by separate commands, reads state bytes with ``.decode()``
    (breaks under ``decode_responses=True``) and turns a Redis error into "closed".
    This subclass keeps one hash per breaker, changes it in scripts (SharedBreaker's
    path), and lets Redis errors propagate.

    As a stock breaker's storage::

        storage = RedisBreakerStorage(client, Scripts(client), "taskrail", "billing")
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60,
                                           state_storage=storage)

    pybreaker's interface then reads the hash (writing nothing) and writes it one
    command at a time, as pybreaker's own storage does.

    ``clock`` (epoch seconds, tests) replaces Redis's ``TIME`` in the scripts and the
    local monotonic clock; ``None`` (production) keeps both.
    """

    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts[Script],
        namespace: str,
        name: str,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.breaker_name = name
        self._keys = list(breaker_keys(namespace, name))
        self._scripts = scripts
        self._clock = clock
        self._mono = clock or time.monotonic
        super().__init__(STATE_CLOSED, client, namespace=self._keys[0])

    def _initialize_redis_state(self, state: str) -> None:
        # The stock storage writes three keys when built; ours creates nothing until a
        # breaker is used, so building one never touches Redis (absent state = closed).
        return None

    def _run(self, script: Script, *args: Any) -> Reply:
        argv = script_argv(self.breaker_name, self._clock, *args)
        return parse_reply(script(keys=self._keys, args=argv, client=self._redis), self._mono())

    def read(self, *, register: bool = False, fail_max: int = 0, reset_ms: int = 0) -> Reply:
        """The state; with ``fail_max >= 1`` also registers it and writes the settings.

        ``fail_max=0`` (the default) writes nothing: a read is then only a read.
        """
        flag = "1" if register else "0"
        return self._run(self._scripts.read, flag, fail_max, reset_ms)

    def record_failure(self, epoch: int, fail_max: int, reset_ms: int) -> Reply:
        return self._run(self._scripts.failure, epoch, fail_max, reset_ms)

    def record_success(self, epoch: int) -> Reply:
        return self._run(self._scripts.success, epoch)

    def acquire_trial(self, token: str, lease_ms: int) -> Reply:
        return self._run(self._scripts.trial, token, lease_ms)

    def finish_trial(self, token: str, ok: bool, reset_ms: int) -> Reply:
        return self._run(self._scripts.trial_done, token, "1" if ok else "0", reset_ms)

    def abandon_trial(self, token: str) -> Reply:
        return self._run(self._scripts.abandon, token)

    def reset(self, *, known_only: bool = False) -> Reply:
        return self._run(self._scripts.reset, "1" if known_only else "0")

    def force_open(self, reset_ms: int) -> Reply:
        return self._run(self._scripts.force_open, reset_ms)

    # pybreaker's storage interface, on the same hash, for a stock CircuitBreaker (not
    # used by SharedBreaker). Reads are fresh and write nothing; each write is one
    # command, as in pybreaker's own Redis storage.
    @property
    def state(self) -> str:
        return self.read().snapshot.state

    @state.setter
    def state(self, state: str) -> None:
        # Registered too, so `taskrail breakers` lists a breaker a stock CircuitBreaker
        # opened (its fail_max and reset timeout stay unknown there).
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self._keys[0], "state", str(state))
        pipe.sadd(self._keys[1], self.breaker_name)
        if isinstance(self._redis, CountingRedis):
            self._redis.add_commands(len(pipe))
        pipe.execute()

    @property
    def counter(self) -> int:
        return self.read().snapshot.fail_count

    @property
    def success_counter(self) -> int:
        # Consecutive successes while half-open (pybreaker's success_threshold);
        # SharedBreaker's scripts delete the field whenever they open or close.
        return _int_or_none(self._redis.hget(self._keys[0], "success_count")) or 0

    def increment_counter(self) -> None:
        self._redis.hincrby(self._keys[0], "fail_count", 1)

    def reset_counter(self) -> None:
        self._redis.hset(self._keys[0], "fail_count", "0")

    def increment_success_counter(self) -> None:
        self._redis.hincrby(self._keys[0], "success_count", 1)

    def reset_success_counter(self) -> None:
        self._redis.hset(self._keys[0], "success_count", "0")

    @property
    def opened_at(self) -> datetime | None:
        return ms_to_datetime(self.read().snapshot.opened_at_ms)

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        self._redis.hset(self._keys[0], "opened_at_ms", str(int(now.timestamp() * 1000)))


_INFO_FIELDS = (
    "state",
    "fail_count",
    "opened_at_ms",
    "next_trial_ms",
    "fail_max",
    "reset_timeout_ms",
)


def redis_infos(client: redis.Redis, namespace: str) -> list[BreakerInfo]:
    """Every breaker registered under ``namespace`` (any process's), in two round trips."""
    registry = f"{namespace}:{c.BREAKER_REGISTRY_SEGMENT}"
    names = sorted(_text(n) for n in client.smembers(registry))
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        key, _, lease = breaker_keys(namespace, name)
        pipe.hmget(key, _INFO_FIELDS)
        pipe.exists(lease)
    if isinstance(client, CountingRedis):
        client.add_commands(len(pipe))
    results = pipe.execute()
    infos = []
    for i, name in enumerate(names):
        values, lease_exists = results[2 * i], results[2 * i + 1]
        state_v, fails, opened, nxt, fail_max, reset_ms = (
            None if v is None else _text(v) for v in values
        )
        state = state_v or STATE_CLOSED
        infos.append(
            BreakerInfo(
                name=name,
                state=state,
                fail_count=int(fails or 0),
                fail_max=int(fail_max) if fail_max else None,
                reset_timeout_s=int(reset_ms) / 1000 if reset_ms else None,
                opened_at=ms_to_datetime(int(opened)) if opened and state != STATE_CLOSED else None,
                next_trial_at=ms_to_datetime(int(nxt)) if nxt and state == STATE_OPEN else None,
                trial_in_progress=bool(lease_exists) and state == STATE_HALF_OPEN,
            )
        )
    return infos
