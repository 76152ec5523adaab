"""Alembic environment: runs against the engine taskrail hands over, or TASKRAIL_DATABASE_URL."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine

from orchestration.models import Base

config = context.config
target_metadata = Base.metadata


def _engine() -> Any:
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    from orchestration.settings import get_settings

    return create_engine(get_settings().effective_database_url)


def run_migrations_offline() -> None:
    from orchestration.settings import get_settings

    context.configure(
        url=get_settings().effective_database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
