"""Alembic, driven from code: the migrations live in ``orchestration/store/migrations``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


@contextlib.contextmanager
def events_kept(name: str) -> Iterator[None]:
    """Keep ``task_events`` as it is across a rebuild of ``tasks`` on SQLite.

    For a migration's ``batch_alter_table("tasks")``: on SQLite the batch rebuilds the
    table (copy, drop, rename), and with foreign keys on (as taskrail connects)
    dropping the old table deletes every task's events (ON DELETE CASCADE); the pragma
    cannot be turned off inside the migration's transaction. The rows are copied to a
    temporary table ``task_events_<name>`` and written back after the rebuild. Other
    databases alter the table in place: nothing to keep.
    """
    from alembic import op

    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    aside = f"task_events_{name}"
    op.execute(f"CREATE TEMP TABLE {aside} AS SELECT * FROM task_events")
    yield
    op.execute("DELETE FROM task_events")
    op.execute(f"INSERT INTO task_events SELECT * FROM {aside}")
    op.execute(f"DROP TABLE {aside}")
