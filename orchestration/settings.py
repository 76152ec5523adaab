"""Configuration, read once at the edge (CLI, worker start-up) and passed in.

Every setting comes from a ``TASKRAIL_*`` environment variable. With none set,
taskrail runs on the embedded default: a SQLite file and a file-system broker
under ``.taskrail/`` in the working directory, no servers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from orchestration import constants as c
from orchestration.redact import redact_url
from orchestration.urls import (
    check_broker_url,
    check_database_url,
    check_redis_url,
    embedded_broker_folder,
    password_in_userinfo,
)


class Settings(BaseSettings):
    """taskrail's settings; ``TASKRAIL_<NAME>`` sets each field."""

    model_config = SettingsConfigDict(env_prefix="TASKRAIL_", extra="ignore")

    # URLs may carry passwords: kept out of repr(); describe() shows them masked.
    database_url: str | None = Field(
        default=None, repr=False, description="SQLAlchemy URL; default: SQLite file in data_dir"
    )
    broker_url: str | None = Field(
        default=None,
        repr=False,
        description="Celery broker URL; default: file-system broker in data_dir",
    )
    redis_url: str | None = Field(
        default=None,
        repr=False,
        description="Redis for shared breaker state; default: per-process state",
    )
    broker_key_prefix: str = Field(
        default="",
        description="prefix of every broker key on Redis (several deployments, one Redis)",
    )
    breaker_namespace: str = Field(
        default=c.DEFAULT_BREAKER_NAMESPACE, description="prefix of the breaker keys on Redis"
    )
    data_dir: Path = Path(c.DEFAULT_DATA_DIR)
    agents: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(c.DEFAULT_AGENT_MODULES),
        description="comma-separated importable modules that register agents",
    )
    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    log_level: str = "INFO"
    metrics_auth: SecretStr | None = Field(
        default=None, description="user:password that `taskrail metrics` requires"
    )
    metrics_host: str = c.DEFAULT_METRICS_HOST
    metrics_port: int = Field(default=c.DEFAULT_METRICS_PORT, ge=1, le=65535)
    web_auth: SecretStr | None = Field(
        default=None, description="user:password that `taskrail web` (the console) requires"
    )

    prefetch_multiplier: int = Field(default=c.DEFAULT_PREFETCH_MULTIPLIER, ge=1)
    visibility_timeout_s: int = Field(default=c.DEFAULT_VISIBILITY_TIMEOUT_S, ge=1)
    db_pool_size: int = Field(default=5, ge=1)
    db_connect_timeout_s: float = Field(
        default=c.DB_CONNECT_TIMEOUT_S, gt=0, description="PostgreSQL connect timeout"
    )
    db_tcp_timeout_s: float = Field(
        default=c.DB_TCP_USER_TIMEOUT_S,
        gt=0,
        description="a PostgreSQL connection whose data goes unacknowledged this long is dead",
    )
    db_statement_timeout_s: float = Field(
        default=c.DB_STATEMENT_TIMEOUT_S, ge=0, description="workers' statements; 0: none"
    )
    db_lock_timeout_s: float = Field(
        default=c.DB_LOCK_TIMEOUT_S, ge=0, description="workers' lock waits; 0: none"
    )
    broker_socket_timeout_s: float = Field(
        default=c.BROKER_SOCKET_TIMEOUT_S,
        gt=c.BROKER_BRPOP_TIMEOUT_S,
        description="longest wait for a reply from the broker's Redis",
    )
    publish_max_wait_s: float = Field(
        default=c.DEFAULT_PUBLISH_MAX_WAIT_S,
        ge=0,
        description="how long a producer waits for a broker that is down",
    )
    lease_ttl_s: float = Field(default=c.DEFAULT_LEASE_TTL_S, gt=0)
    cancel_poll_s: float = Field(
        default=c.DEFAULT_CANCEL_POLL_S,
        gt=0,
        description="how often a worker holding leases checks whether their tasks were cancelled",
    )
    async_calls: int = Field(
        default=0,
        ge=0,
        description=(
            "async def handlers a worker runs at a time on its event loop "
            "(the async executor; 0: off, `--async-calls` overrides)"
        ),
    )
    sync_calls: int = Field(
        default=0,
        ge=0,
        description=(
            "sync handlers a worker runs at a time on threads of their own, the execute "
            "hop returning at once (0: off, `--sync-calls` overrides)"
        ),
    )
    async_drain_s: float = Field(
        default=c.DEFAULT_ASYNC_DRAIN_S,
        ge=0,
        description="how long a stopping worker waits for its async calls in flight",
    )
    sweep_interval_s: float = Field(default=c.DEFAULT_SWEEP_INTERVAL_S, gt=0)
    redrive_after_s: float = Field(default=c.DEFAULT_REDRIVE_AFTER_S, gt=0)
    sweep_batch: int = Field(default=c.DEFAULT_SWEEP_BATCH, ge=1)
    retry_backoff_base_s: float = Field(default=c.RETRY_BACKOFF_BASE_S, ge=0)
    retry_backoff_max_s: float = Field(default=c.RETRY_BACKOFF_MAX_S, ge=0)

    @field_validator("agents", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("database_url", "broker_url", "redis_url")
    @classmethod
    def _check_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A URL taskrail cannot use fails here, in one line naming the variable.
        if not value:  # unset, or set to nothing: the embedded default
            return None
        checks = {
            "database_url": check_database_url,
            "broker_url": check_broker_url,
            "redis_url": check_redis_url,
        }
        return checks[str(info.field_name)](value)

    @property
    def embedded(self) -> bool:
        """True when no broker server is configured (file-system broker, in-process use)."""
        return self.broker_url is None

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite:///{(self.data_dir / 'taskrail.db').as_posix()}"

    @property
    def effective_broker_url(self) -> str:
        return (
            password_in_userinfo(self.broker_url) if self.broker_url else "taskrailfs://localhost/"
        )

    def broker_folder(self) -> Path:
        """The embedded broker's folder, beside the database (one queue per database)."""
        return embedded_broker_folder(self.data_dir, self.database_url)

    def describe(self) -> dict[str, str | None]:
        """The settings an operator may want to see, with every password masked."""
        return {
            "database_url": redact_url(self.effective_database_url),
            "broker_url": redact_url(self.effective_broker_url),
            "redis_url": redact_url(self.redis_url) if self.redis_url else None,
            "agents": ",".join(self.agents),
        }


def normalise_database_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
