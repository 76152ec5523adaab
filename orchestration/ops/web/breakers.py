"""The overview's circuit breakers: listed and reset as ``taskrail breakers`` does.

Every breaker in the shared state (Redis, ``TASKRAIL_REDIS_URL``), plus each registered
agent's, shown closed when no worker has used it yet. Resetting closes a breaker and
zeroes its failures for every worker; an agent's breaker that no worker has used is
closed already, so resetting it does nothing.
"""

from __future__ import annotations

from orchestration.agents import registry
from orchestration.breakers import BreakerBoard, BreakerInfo, BreakerNotFound
from orchestration.settings import Settings


class Breakers:
    """The console's view of the breakers; one board (one Redis connection pool)."""

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
            if name not in {spec.breaker_name for spec in registry.agents()}:
                raise

    def close(self) -> None:
        self.board.close()
