"""The circuit breakers as an operator sees them, in ``taskrail breakers`` and on the
console's overview: listed, and reset.

Every breaker in the shared state (Redis, ``TASKRAIL_REDIS_URL``), plus each registered
agent's, shown closed when no worker has used it yet. Resetting closes a breaker and
zeroes its failures for every worker; an agent's breaker that no worker has used is
closed already, so resetting it does nothing. The agents are those registered in this
process (:func:`opened` loads the settings' agent modules first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from orchestration.agents import load_agent_modules, registry
from orchestration.breakers import BreakerBoard, BreakerInfo, BreakerNotFound
from orchestration.settings import Settings


class Breakers:
    """The breakers of ``settings``' shared state; one board (one Redis connection pool),
    released by :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.board = BreakerBoard(settings.redis_url, namespace=settings.breaker_namespace)

    @property
    def shared(self) -> bool:
        return self.board.shared

    def list(self) -> list[BreakerInfo]:
        """Every breaker, by name. Raises BreakerStateUnavailable (Redis down)."""
        infos = {info.name: info for info in self.board.list()}
        for spec in registry.agents():
            infos.setdefault(
                spec.breaker_name,
                BreakerInfo(
                    name=spec.breaker_name,
                    state="closed",
                    fail_count=0,
                    fail_max=spec.fail_max,
                    reset_timeout_s=spec.reset_timeout_s,
                    opened_at=None,
                    next_trial_at=None,
                    trial_in_progress=False,
                ),
            )
        return sorted(infos.values(), key=lambda info: info.name)

    def reset(self, name: str) -> None:
        """Close breaker ``name`` for every worker. Raises BreakerNotFound,
        BreakerStateUnavailable."""
        try:
            self.board.reset(name)
        except BreakerNotFound:
            # An agent's breaker that no worker has used yet is closed already.
            if name not in {spec.breaker_name for spec in registry.agents()}:
                raise

    def close(self) -> None:
        self.board.close()


@contextlib.contextmanager
def opened(settings: Settings) -> Iterator[Breakers]:
    """:class:`Breakers` for one command: ``settings``' agent modules loaded, the board
    closed after. Raises ConfigurationError (an agent module cannot be imported)."""
    load_agent_modules(settings.agents)
    views = Breakers(settings)
    try:
        yield views
    finally:
        views.close()
