"""BreakerBoard: the breakers of one process, over one Redis connection pool (or memory)."""

from __future__ import annotations

import asyncio
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pybreaker
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from orchestration import constants as c
from orchestration.breakers.async_storage import (
    AsyncRedisBreakerStorage,
    AsyncScripts,
    CommandTally,
    CountingAsyncRedis,
)
from orchestration.breakers.breaker import SharedBreaker
from orchestration.breakers.memory import AsyncMemoryBreakerStorage, MemoryBreakerStorage
from orchestration.breakers.model import (
    STATE_OPEN,
    BreakerInfo,
    BreakerStateChange,
)
from orchestration.breakers.storage import (
    AsyncBreakerStorage,
    CountingRedis,
    RedisBreakerStorage,
    Scripts,
    redis_infos,
)
from orchestration.errors import BreakerNotFound, BreakerStateUnavailable, ConfigurationError
from orchestration.logging import get_logger
from orchestration.redact import redact_url

log = get_logger(__name__)

StateChangeHook = Callable[[BreakerStateChange], None]


@dataclass(slots=True)
class _LoopClient:
    """One event loop's Redis client, its scripts and its breakers' storages."""

    client: CountingAsyncRedis
    scripts: AsyncScripts
    storages: dict[str, AsyncRedisBreakerStorage] = field(default_factory=dict)


class BreakerBoard:
    """Every breaker of this process, by name, sharing one storage.

    ``redis_url`` names the Redis that holds the shared state; ``None`` keeps state in
    this process (the embedded default). ``redis_options`` go to ``redis.Redis.from_url``
    (``decode_responses`` either way is fine). No connection is made until a breaker is
    used. ``on_state_change`` is called once, in the process that made it, for every
    transition (closed->open, open->half-open, half-open->closed/open, reset); its
    exceptions are logged, never raised. ``clock`` (epoch seconds; tests) replaces the
    clocks the breakers read: Redis's ``TIME`` (the scripts get the time as an
    argument), ``time.time`` in memory and ``time.monotonic`` for the cached views.

    Coroutines use the same breakers (``acall``, ``abefore_call``, ...): the board opens
    a ``redis.asyncio`` client, with the same options, for each event loop that uses
    one (its connections belong to that loop); ``await board.aclose()`` on a loop
    before it ends closes that loop's client.
    """

    def __init__(
        self,
        redis_url: str | None,
        *,
        namespace: str = c.DEFAULT_BREAKER_NAMESPACE,
        cache_ttl_s: float = c.DEFAULT_BREAKER_CACHE_TTL_S,
        trial_lease_s: float = c.DEFAULT_BREAKER_TRIAL_LEASE_S,
        on_state_change: StateChangeHook | None = None,
        redis_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.namespace = namespace
        self.clock = clock
        self.trial_lease_s = trial_lease_s
        self.on_state_change = on_state_change
        self._lock = threading.Lock()
        self._breakers: dict[str, SharedBreaker] = {}
        self._memory: dict[str, MemoryBreakerStorage] = {}
        self._client: CountingRedis | None = None
        self._scripts: Scripts | None = None
        self._redis_url: str | None = redis_url
        self._async_options: dict[str, Any] = {}
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._async_memory: dict[str, AsyncMemoryBreakerStorage] = {}
        self._async_tally = CommandTally()
        if redis_url is None:
            self.where = "memory"
            self.cache_ttl_s = 0.0  # reading process memory costs nothing
            return
        self.where = redact_url(redis_url)
        self.cache_ttl_s = cache_ttl_s
        common: dict[str, Any] = {
            "socket_timeout": c.BREAKER_REDIS_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": c.BREAKER_REDIS_CONNECT_TIMEOUT_S,
            # An idle connection to a host that vanished is found within seconds.
            "socket_keepalive": True,
            "socket_keepalive_options": {
                socket.TCP_KEEPIDLE: c.REDIS_KEEPALIVE_IDLE_S,
                socket.TCP_KEEPINTVL: c.REDIS_KEEPALIVE_INTERVAL_S,
                socket.TCP_KEEPCNT: c.REDIS_KEEPALIVE_COUNT,
            },
        }
        # One quick retry survives a pooled connection that died with a Redis restart.
        backoff = ExponentialWithJitterBackoff(cap=0.05, base=0.01)
        options = {**common, "retry": Retry(backoff, 1), **(redis_options or {})}
        self._async_options = {**common, "retry": AsyncRetry(backoff, 1), **(redis_options or {})}
        client: CountingRedis = CountingRedis.from_url(redis_url, **options)  # type: ignore[assignment]
        self._client = client
        self._scripts = Scripts(client)

    @property
    def shared(self) -> bool:
        """Whether the state lives in Redis (shared by every process)."""
        return self._client is not None

    def breaker(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        exclude: tuple[type[BaseException], ...] = (),
        trial_lease_s: float | None = None,
    ) -> SharedBreaker:
        """The breaker ``name``, made on first use and cached; later calls apply new settings.

        ``exclude``: exception types that say nothing about the downstream's health
        (business outcomes); they count as successes. ``trial_lease_s``: how long one
        half-open trial may hold the cluster-wide lease (default: the board's).
        Raises ConfigurationError for a non-positive ``fail_max`` or ``reset_timeout_s``.
        """
        if fail_max < 1:
            raise ConfigurationError(f"breaker {name!r}: fail_max must be >= 1")
        if reset_timeout_s <= 0:
            raise ConfigurationError(f"breaker {name!r}: reset_timeout_s must be > 0")
        lease_s = self.trial_lease_s if trial_lease_s is None else trial_lease_s
        with self._lock:
            existing = self._breakers.get(name)
            if existing is not None:
                existing.configure(
                    fail_max=fail_max,
                    reset_timeout_s=reset_timeout_s,
                    exclude=tuple(exclude),
                    trial_lease_s=lease_s,
                )
                return existing
            made = SharedBreaker(
                self,
                name,
                self._storage(name),
                fail_max=fail_max,
                reset_timeout_s=reset_timeout_s,
                exclude=tuple(exclude),
                trial_lease_s=lease_s,
                cache_ttl_s=self.cache_ttl_s,
                clock=self.clock,
            )
            self._breakers[name] = made
            return made

    def _storage(self, name: str) -> RedisBreakerStorage | MemoryBreakerStorage:
        if self._client is None or self._scripts is None:
            return self._memory.setdefault(name, MemoryBreakerStorage(name, clock=self.clock))
        return RedisBreakerStorage(
            self._client, self._scripts, self.namespace, name, clock=self.clock
        )

    def _async_storage(self, name: str, loop: asyncio.AbstractEventLoop) -> AsyncBreakerStorage:
        """Breaker ``name``'s storage for coroutines on ``loop``: the same state as
        :meth:`_storage`'s (in memory, the same object)."""
        with self._lock:
            if self._redis_url is None:
                found = self._async_memory.get(name)
                if found is None:
                    memory = self._memory.setdefault(
                        name, MemoryBreakerStorage(name, clock=self.clock)
                    )
                    found = self._async_memory[name] = AsyncMemoryBreakerStorage(memory)
                return found
            held = self._async_clients.get(loop)
            if held is None:
                client: CountingAsyncRedis = CountingAsyncRedis.from_url(  # type: ignore[assignment]
                    self._redis_url, **self._async_options
                )
                client.tally = self._async_tally
                held = self._async_clients[loop] = _LoopClient(client, AsyncScripts(client))
            storage = held.storages.get(name)
            if storage is None:
                storage = held.storages[name] = AsyncRedisBreakerStorage(
                    held.client, held.scripts, self.namespace, name, clock=self.clock
                )
            return storage

    def list(self) -> list[BreakerInfo]:
        """Every breaker known to the storage (in Redis: registered by any process), by name.

        Raises BreakerStateUnavailable when Redis cannot be reached.
        """
        if self._client is None:
            with self._lock:
                storages = list(self._memory.values())
            return sorted((s.info() for s in storages), key=lambda i: i.name)
        try:
            return redis_infos(self._client, self.namespace)
        except RedisError as err:
            log.error("breaker_state_unavailable", op="list", where=self.where, error=repr(err))
            raise BreakerStateUnavailable("*", self.where, repr(err)) from err

    def reset(self, name: str) -> None:
        """Operator: close breaker ``name`` and zero its counter, for every process.

        Raises BreakerNotFound when no process ever registered ``name``, and
        BreakerStateUnavailable when Redis cannot be reached.
        """
        with self._lock:
            local = self._breakers.get(name)
        if local is not None:
            local.reset()
            return
        if self._client is None:
            # In memory a breaker exists only once this board made it.
            raise BreakerNotFound(name, list(self._memory))
        try:
            reply = self._storage(name).reset(known_only=True)
        except RedisError as err:
            log.error(
                "breaker_state_unavailable",
                name=name,
                op="reset",
                where=self.where,
                error=repr(err),
            )
            raise BreakerStateUnavailable(name, self.where, repr(err)) from err
        if reply.verdict == "unknown":
            raise BreakerNotFound(name, [i.name for i in self.list()])
        if reply.changed_from is not None:
            self._emit(name, reply.changed_from, reply.snapshot.state, reply.snapshot.fail_count)

    def command_count(self) -> int:
        """Redis commands this board has sent so far, from threads and coroutines (0 in
        memory)."""
        sync = self._client.commands if self._client is not None else 0
        return sync + self._async_tally.count

    def close(self) -> None:
        """Release the Redis connections (the board can still be used; it reconnects).

        The coroutines' clients are left to :meth:`aclose`, on their own loops.
        """
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        """Close the running event loop's Redis client (the next coroutine call on this
        loop opens a new one)."""
        with self._lock:
            held = self._async_clients.pop(asyncio.get_running_loop(), None)
        if held is not None:
            await held.client.aclose()

    def _emit(
        self,
        name: str,
        old: str,
        new: str,
        fail_count: int,
        circuit: pybreaker.CircuitBreaker | None = None,
    ) -> None:
        """One transition: a log line, pybreaker listeners, the board's hook."""
        emit = log.warning if new == STATE_OPEN else log.info
        emit("breaker_state_change", name=name, old=old, new=new, fail_count=fail_count)
        if circuit is not None:
            for listener in circuit.listeners:
                try:
                    listener.state_change(
                        circuit, circuit._create_new_state(old), circuit._create_new_state(new)
                    )
                except Exception:
                    log.exception("breaker_listener_failed", name=name, listener=repr(listener))
        if self.on_state_change is not None:
            change = BreakerStateChange(name, old, new, fail_count, datetime.now(UTC))
            try:
                self.on_state_change(change)
            except Exception:
                log.exception("breaker_listener_failed", name=name, listener="on_state_change")
