"""Agents: the Python callables that do a task's work, and the registry that finds them.

::

    from orchestration.agents import agent, Escalate, PermanentError

    @agent("personal_tax_agent", task_types=["personal_tax"], max_attempts=3)
    def prepare_return(task):
        if "w2" not in task.payload:
            raise Escalate("missing W-2")
        return {"refund": 120}

A handler gets a read-only :class:`TaskView` and returns a JSON-serialisable result.
It may be an ``async def`` (or a callable whose ``__call__`` is one)::

    @agent("tax_service_agent", task_types=["tax_lookup"], time_limit_s=30)
    async def look_up(task):
        async with httpx.AsyncClient() as client:
            reply = await client.get(URL, headers={"Idempotency-Key": task.idempotency_key})
        return reply.json()

An async handler is cancelled (``asyncio.CancelledError`` at its ``await``) at its time
limit and when its task is cancelled.

A handler may run more than once for one task (a worker that dies mid-call is replaced,
and the call is made again), so outside effects should be idempotent. A long handler
reads ``task.cancelled`` between its steps and stops when it turns true (the task was
cancelled): whatever it returns then is discarded.

- ``Escalate(reason)``: a human must look; the task ends ``escalated``.
- ``PermanentError(reason)``: fail now, no retries; the task ends ``failed``.
- any other exception: transient; retried with backoff up to ``max_attempts``.

Deployments list their agent modules in ``TASKRAIL_AGENTS``; producers and workers
import them with :func:`load_agent_modules`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from orchestration import constants as c
from orchestration.errors import ConfigurationError, InvalidPayload, UnknownTaskType
from orchestration.values import ESCAPE, StoredJson, encode_result, read_text


class AgentSignal(Exception):
    """Base of the outcomes an agent raises on purpose."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Escalate(AgentSignal):
    """A human must look at the task (missing document, inconsistent data)."""


class PermanentError(AgentSignal):
    """The task cannot succeed; fail it now without retrying."""


def _freeze(value: Any) -> Any:
    """The stored payload, read-only and with its escapes undone (orchestration.values)."""
    if isinstance(value, str):
        return read_text(value) if ESCAPE in value else value
    if isinstance(value, Mapping):
        return MappingProxyType({_freeze(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class TaskView:
    """What a handler may see of its task. Read-only, payload included.

    ``_stop`` is the event the worker sets when this run is no longer wanted
    (:attr:`cancelled`); None for a view no worker watches (a test; an isolated run,
    whose process is killed instead).
    """

    id: int
    client_id: int
    task_type: str
    payload: Mapping[str, Any]
    attempt: int
    _stop: threading.Event | None = field(default=None, repr=False, compare=False)

    @property
    def idempotency_key(self) -> str:
        """The same for every run of this attempt (a re-run after a crash or a network
        cut): pass it to outside services so that they can drop the repeat."""
        return f"taskrail-{self.id}-{self.attempt}"

    @property
    def cancelled(self) -> bool:
        """True once nothing this run returns will be used: the task was cancelled (the
        worker notices within ``TASKRAIL_CANCEL_POLL_S``, 1 s by default), or another
        worker took the run over. Check it between steps and return (or raise) when it
        turns true; a run that ignores it goes on until it ends by itself, and its
        result is discarded all the same."""
        stop = self._stop
        return stop is not None and stop.is_set()

    @classmethod
    def build(
        cls,
        id: int,
        client_id: int,
        task_type: str,
        payload: Mapping[str, Any],
        attempt: int,
        *,
        stop: threading.Event | None = None,
    ) -> TaskView:
        """The view of a task whose payload is as stored; ``stop`` backs
        :attr:`cancelled`. Raises InvalidPayload for a payload nested too deep to walk
        (:func:`orchestration.values.check_task_row` says more)."""
        try:
            frozen = _freeze(payload or {})
        except RecursionError:
            raise InvalidPayload(f"nested deeper than {c.MAX_JSON_DEPTH} levels") from None
        return cls(id, client_id, task_type, frozen, attempt, stop)


Handler = Callable[[TaskView], Any]


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """A registered agent and its per-agent settings."""

    name: str
    handler: Handler
    task_types: tuple[str, ...]
    max_attempts: int = c.DEFAULT_MAX_ATTEMPTS
    time_limit_s: float = c.DEFAULT_TIME_LIMIT_S
    fail_max: int = c.DEFAULT_FAIL_MAX
    reset_timeout_s: float = c.DEFAULT_RESET_TIMEOUT_S
    max_deferral_s: float = c.DEFAULT_MAX_DEFERRAL_S
    # Exceptions that do not count as a failure of the downstream for its breaker.
    breaker_excludes: tuple[type[BaseException], ...] = field(default=())
    # The handler is a coroutine function: it is run on an event loop (workers.calls).
    is_async: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", is_coroutine_handler(self.handler))

    @property
    def breaker_name(self) -> str:
        return f"agent:{self.name}"


def is_coroutine_handler(handler: object) -> bool:
    """True for an ``async def`` function or method, a ``functools.partial`` of one, or an
    object whose ``__call__`` is one: a handler whose call returns a coroutine to await.

    A plain function that returns an awaitable is not one (its call is its result, and
    the worker refuses an awaitable result with the reason)."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    if inspect.iscoroutinefunction(handler):
        return True
    if inspect.isroutine(handler) or isinstance(handler, type):
        return False
    return callable(handler) and inspect.iscoroutinefunction(type(handler).__call__)


class AgentRegistry:
    """Agents by name and by task type. Several agents may serve one task type."""

    def __init__(self) -> None:
        self._by_name: dict[str, AgentSpec] = {}
        self._by_type: dict[str, list[AgentSpec]] = {}
        self._lock = threading.Lock()

    def register(self, spec: AgentSpec) -> AgentSpec:
        with self._lock:
            existing = self._by_name.get(spec.name)
            if existing is not None:
                if existing.handler is spec.handler or _same_function(
                    existing.handler, spec.handler
                ):
                    return existing  # a module imported twice
                raise ConfigurationError(f"agent {spec.name!r} is registered twice")
            self._by_name[spec.name] = spec
            for task_type in spec.task_types:
                self._by_type.setdefault(task_type, []).append(spec)
        return spec

    def unregister(self, name: str) -> None:
        with self._lock:
            spec = self._by_name.pop(name, None)
            if spec is None:
                return
            for task_type in spec.task_types:
                specs = [s for s in self._by_type.get(task_type, []) if s.name != name]
                if specs:
                    self._by_type[task_type] = specs
                else:
                    self._by_type.pop(task_type, None)

    def get(self, name: str) -> AgentSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigurationError(f"no agent named {name!r} is registered") from None

    def find(self, name: str) -> AgentSpec | None:
        return self._by_name.get(name)

    def for_task_type(self, task_type: str) -> list[AgentSpec]:
        """Agents for ``task_type``; raises UnknownTaskType listing the known types."""
        specs = self._by_type.get(task_type)
        if not specs:
            raise UnknownTaskType(task_type, self.task_types())
        return list(specs)

    def task_types(self) -> list[str]:
        return sorted(self._by_type)

    def agents(self) -> list[AgentSpec]:
        return sorted(self._by_name.values(), key=lambda s: s.name)


def _same_function(a: Handler, b: Handler) -> bool:
    return getattr(a, "__module__", None) == getattr(b, "__module__", None) and getattr(
        a, "__qualname__", None
    ) == getattr(b, "__qualname__", None)


registry = AgentRegistry()


def agent(
    name: str,
    *,
    task_types: Iterable[str],
    max_attempts: int = c.DEFAULT_MAX_ATTEMPTS,
    time_limit_s: float = c.DEFAULT_TIME_LIMIT_S,
    fail_max: int = c.DEFAULT_FAIL_MAX,
    reset_timeout_s: float = c.DEFAULT_RESET_TIMEOUT_S,
    max_deferral_s: float = c.DEFAULT_MAX_DEFERRAL_S,
    breaker_excludes: Iterable[type[BaseException]] = (),
) -> Callable[[Handler], Handler]:
    """Register the decorated function (plain or ``async def``) as agent ``name`` for
    ``task_types``."""
    types = tuple(task_types)
    if not types:
        raise ConfigurationError(f"agent {name!r} handles no task type")
    if max_attempts < 1:
        raise ConfigurationError(f"agent {name!r}: max_attempts must be >= 1")

    def decorate(func: Handler) -> Handler:
        registry.register(
            AgentSpec(
                name=name,
                handler=func,
                task_types=types,
                max_attempts=max_attempts,
                time_limit_s=time_limit_s,
                fail_max=fail_max,
                reset_timeout_s=reset_timeout_s,
                max_deferral_s=max_deferral_s,
                breaker_excludes=tuple(breaker_excludes),
            )
        )
        return func

    return decorate


def load_agent_modules(modules: Iterable[str]) -> None:
    """Import each module so that its ``@agent`` decorators register.

    Raises ConfigurationError naming a module that cannot be imported: missing, a syntax
    error, or any exception its code raises while it is imported.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ConfigurationError as err:  # an @agent registration that cannot work
            raise ConfigurationError(f"agent module {module!r}: {err}") from err
        except Exception as err:  # SyntaxError, ImportError, whatever its code raised
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigurationError(
                f"cannot import agent module {module!r}: {type(err).__name__}: {detail}"
            ) from err


def ensure_json(value: Any, what: str = "result") -> StoredJson:
    """A handler's result in the form it is stored in (pass it on as the ``result``).

    Text PostgreSQL cannot hold is escaped, reversibly; what JSON cannot keep (keys that
    are not strings, NaN, integers beyond 64 bits, nesting deeper than MAX_JSON_DEPTH,
    more than MAX_RESULT_BYTES) raises ResultRejected (a ValueError) with the reason.
    """
    return encode_result(value)
