"""Circuit breakers on pybreaker, their state shared in Redis by every worker process.

::

    board = BreakerBoard(settings.redis_url)            # None: per-process state
    breaker = board.breaker(spec.breaker_name, fail_max=spec.fail_max,
                            reset_timeout_s=spec.reset_timeout_s,
                            exclude=(Escalate, PermanentError, *spec.breaker_excludes))
    try:
        permit = breaker.before_call()
    except BreakerOpen as refused:                      # defer by refused.remaining_s
        ...
    try:
        result = spec.handler(view)
    except Exception as exc:
        breaker.on_failure(permit, exc)
        raise
    breaker.on_success(permit)

Coroutines use the same breaker, awaited: ``permit = await breaker.abefore_call()``,
``await breaker.aon_success(permit)`` / ``aon_failure(permit, exc)`` / ``aabandon(permit)``,
or ``await breaker.acall(fetch, url)``, ``async with breaker.acalling():``, and
``@breaker.circuit`` on an ``async def``. Their Redis round trips go through
``redis.asyncio`` (one client per event loop; ``await board.aclose()`` before the loop
ends) with the same scripts, keys and cached view, so they cost the same commands and
share one state with threads and other processes. An ``asyncio.CancelledError`` (a time
limit, a cancel) is no verdict: nothing counted, a half-open trial's lease released.

Each breaker is a pybreaker ``CircuitBreaker`` subclass over a subclass of
``CircuitRedisStorage`` with its own keys. What the stock Redis storage gets wrong for
us, and what this package does instead:

- Counter and state change are separate commands (``INCR``, ``GET``, ``SET``), so
  processes failing at once push the counter past ``fail_max`` and each of them opens
  the breaker. Here every state change is one Lua script: the increment that reaches
  ``fail_max`` opens the breaker in the same step, exactly once cluster-wide; failures
  reported after that (calls already in flight) are not counted.
- Half-open is gated by nothing across processes: every process that sees the timeout
  pass makes a trial call. Here the trial is a cluster-wide lease (``SET NX PX``): one
  caller gets it, the rest get BreakerOpen; its success closes the breaker for all, its
  failure re-opens it with a fresh reset timeout; a lease whose caller died expires
  after ``trial_lease_s``.
- ``CircuitBreaker.call`` holds the breaker's lock while the guarded call runs, so the
  threads of a pool serialise. Here no lock is held across the call (``before_call``,
  the call, ``on_success``/``on_failure``).
- A Redis error reads as "closed", so a broken downstream is called unguarded exactly
  when nobody can see it. See "Redis errors" below.
- State is read with ``bytes.decode``: a client with ``decode_responses=True`` breaks it.
  Here replies are accepted as ``bytes`` or ``str``.
- Storages built without a namespace share one state (pybreaker #88). Here every key
  carries the breaker's name.
- Reading state costs a command per call and every success writes the counter. Here a
  closed breaker's state is cached in-process for ``cache_ttl_s`` (one read per TTL per
  breaker per process) and a success writes only when there is a failure count to
  zero; a failure is counted at once (one script call). The cost: a process may go on
  calling for up to ``cache_ttl_s`` after another process opened the breaker, and its
  first failure report there brings it the open state.

Redis errors (a deliberate choice): ``before_call`` (and ``state``) raise
:class:`BreakerStateUnavailable`, an :class:`~orchestration.errors.InfrastructureError`,
when the state has to be read and cannot be: the hop is retried later instead of
calling a maybe-broken downstream with no protection. A cached view younger than
``cache_ttl_s`` is still used. ``on_success``/``on_failure`` never raise for Redis: the
call has happened and its own outcome matters more; the lost record is logged
(``breaker_outcome_not_recorded``) and the cache dropped, so the next ``before_call``
fails closed if Redis is still down. Both are logged with structlog. A Redis restart
without persistence forgets every breaker (all closed).

Keys, with namespace ``N`` (default ``taskrail``) and breaker name ``B``
(see :mod:`orchestration.constants`):

- ``N:breaker:B``: hash ``state``, ``fail_count``, ``epoch`` (bumped on every close;
  failures of calls admitted before it are not counted), ``opened_at_ms``,
  ``next_trial_ms`` (Redis server clock), ``fail_max``, ``reset_timeout_ms``, and
  ``success_count`` (half-open successes of a stock ``pybreaker.CircuitBreaker`` using
  ``RedisBreakerStorage`` as its ``state_storage``; SharedBreaker never sets it).
- ``N:breaker-trial:B``: the half-open trial lease (a token, with a PX expiry).
- ``N:breakers``: set of every breaker name, for ``BreakerBoard.list()``.

Multi-key scripts touch one breaker's keys plus the registry: Redis Cluster is not
supported.

pybreaker's options on a SharedBreaker (``breaker.circuit``): listeners, guarded
generators and ``throw_new_error_on_trip`` work as in pybreaker; ``success_threshold``
other than 1 is refused (see :mod:`.breaker`).

Exceptions::

    pybreaker.CircuitBreakerError
    └── BreakerOpen                 refused, nothing called; .remaining_s, .opened_at
    TaskrailError
    ├── InfrastructureError
    │   └── BreakerStateUnavailable the shared state cannot be read: retry the hop later
    └── InputError
        └── BreakerNotFound         an operator named no known breaker
"""

from __future__ import annotations

from orchestration.breakers.board import BreakerBoard, StateChangeHook
from orchestration.breakers.breaker import SharedBreaker
from orchestration.breakers.model import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    BreakerInfo,
    BreakerOpen,
    BreakerStateChange,
    Permit,
)
from orchestration.errors import BreakerNotFound, BreakerStateUnavailable

__all__ = [
    "STATE_CLOSED",
    "STATE_HALF_OPEN",
    "STATE_OPEN",
    "BreakerBoard",
    "BreakerInfo",
    "BreakerNotFound",
    "BreakerOpen",
    "BreakerStateChange",
    "BreakerStateUnavailable",
    "Permit",
    "SharedBreaker",
    "StateChangeHook",
]
