"""Migration 0006 (the people's side) on SQLite and PostgreSQL, over existing rows:
upgrade from 0005, downgrade, upgrade again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from orchestration.store import migrate
from orchestration.store.db import Database
from tests.support import PG_ADMIN_URL

NEW_INDEXES = {
    "ix_tasks_status_id": ["status", "id"],
    "ix_tasks_type_id": ["task_type", "id"],
    "ix_tasks_status_type_id": ["status", "task_type", "id"],
    "ix_tasks_escalated_unclaimed": ["id"],
    "ix_tasks_escalated_claimed": ["id"],
    "ix_tasks_client_id_id": ["client_id", "id"],
    "ix_tasks_agent_id": ["assigned_agent", "id"],
    "ix_tasks_created_at": ["created_at"],
    "ix_tasks_claimed_by_id": ["claimed_by", "id"],
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database of the test's own, migrated to 0005."""
    if request.param == "sqlite":
        # As Database builds the embedded engine (foreign keys on)
        db = Database(f"sqlite:///{tmp_path / 'old.db'}", auto_upgrade=False)
        migrate.upgrade(db.engine, "0005")
        yield db.engine
        db.dispose()
        return
    name = f"taskrail_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng = create_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        migrate.upgrade(eng, "0005")
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.begin() as conn:
        result = conn.execute(text(sql), params)
        return list(result.all()) if result.returns_rows else []


def add_task(engine: Engine, status: str, **extra: str) -> int:
    [(task_id,)] = run(
        engine,
        "INSERT INTO tasks (client_id, task_type, status, payload, attempts, created_at, "
        "updated_at) VALUES (42, 'payroll', :status, '{\"n\": 1}', 1, "
        "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP) RETURNING id",
        status=status,
    )
    return int(task_id)


def add_event(
    engine: Engine, task_id: int, event: str, frm: str, to: str, worker: str | None
) -> None:
    run(
        engine,
        "INSERT INTO task_events (task_id, event, from_status, to_status, worker, at) "
        "VALUES (:task_id, :event, :frm, :to, :worker, CURRENT_TIMESTAMP)",
        task_id=task_id,
        event=event,
        frm=frm,
        to=to,
        worker=worker,
    )


def columns(engine: Engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def index_columns(engine: Engine) -> dict[str, list[str]]:
    return {i["name"]: list(i["column_names"]) for i in inspect(engine).get_indexes("tasks")}


def refuses_status(engine: Engine, status: str) -> bool:
    try:
        add_task(engine, status)
    except IntegrityError:
        return True
    run(engine, "DELETE FROM tasks WHERE status = :s", s=status)
    return False


def test_upgrade_downgrade_and_upgrade_again_over_existing_rows(engine: Engine) -> None:
    # Given a 0005 database with tasks and their events (one written with no worker)
    done = add_task(engine, "completed")
    add_event(engine, done, "assign", "pending", "assigned", "w-1")
    add_event(engine, done, "start", "assigned", "in_progress", "w-2")
    add_event(engine, done, "complete", "in_progress", "completed", "w-2")
    failed = add_task(engine, "failed")
    add_event(engine, failed, "retry", "failed", "pending", None)
    assert refuses_status(engine, "cancelled")
    assert "actor" not in columns(engine, "task_events")

    # When it is upgraded to 0006
    migrate.upgrade(engine, "0006")

    # Then the existing events name their worker as actor; tasks have no claim yet
    assert migrate.current_revision(engine) == "0006"
    assert {"claimed_by", "claimed_at"} <= columns(engine, "tasks")
    assert {"actor", "note"} <= columns(engine, "task_events")
    assert run(engine, "SELECT task_id, worker, actor, note FROM task_events ORDER BY id") == [
        (done, "w-1", "w-1", None),
        (done, "w-2", "w-2", None),
        (done, "w-2", "w-2", None),
        (failed, None, None, None),
    ]
    assert run(engine, "SELECT id, status, claimed_by FROM tasks ORDER BY id") == [
        (done, "completed", None),
        (failed, "failed", None),
    ]
    # the listing indexes are there, the old client index replaced
    indexes = index_columns(engine)
    assert {name: indexes.get(name) for name in NEW_INDEXES} == NEW_INDEXES
    assert "ix_tasks_client_id" not in indexes
    # and the status check admits cancelled, still nothing unknown
    assert not refuses_status(engine, "cancelled")
    assert refuses_status(engine, "bogus")

    # Given a cancelled task with its events, and a claimed escalated one
    cancelled = add_task(engine, "cancelled")
    add_event(engine, cancelled, "assign", "pending", "assigned", "w-1")
    add_event(engine, cancelled, "cancel", "assigned", "cancelled", "api")
    claimed = add_task(engine, "escalated")
    run(engine, "UPDATE tasks SET claimed_by = 'ana' WHERE id = :id", id=claimed)

    # When it is downgraded to 0005
    command.downgrade(migrate.alembic_config(engine), "0005")

    # Then the schema is 0005's again: the cancelled task and its events are gone (0005
    # has no cancelled state), everything else is kept
    assert migrate.current_revision(engine) == "0005"
    assert "actor" not in columns(engine, "task_events")
    assert "claimed_by" not in columns(engine, "tasks")
    assert run(engine, "SELECT id, status FROM tasks ORDER BY id") == [
        (done, "completed"),
        (failed, "failed"),
        (claimed, "escalated"),
    ]
    assert [r[0] for r in run(engine, "SELECT task_id FROM task_events ORDER BY id")] == [
        done,
        done,
        done,
        failed,
    ]
    assert refuses_status(engine, "cancelled")
    indexes = index_columns(engine)
    assert indexes["ix_tasks_client_id"] == ["client_id"]
    assert not set(NEW_INDEXES) & set(indexes)

    # When it is upgraded once more, it is 0006 again with every row
    migrate.upgrade(engine)
    assert migrate.is_current(engine)
    assert not refuses_status(engine, "cancelled")
    assert [r[0] for r in run(engine, "SELECT actor FROM task_events ORDER BY id")] == [
        "w-1",
        "w-2",
        "w-2",
        None,
    ]
    assert {name: index_columns(engine).get(name) for name in NEW_INDEXES} == NEW_INDEXES


@pytest.mark.integration
def test_the_migrated_schema_has_the_partial_indexes_on_postgres(pg_db: Database) -> None:
    with pg_db.engine.connect() as conn:
        indexes = {i["name"]: i for i in inspect(conn).get_indexes("tasks")}
        checks = {c["name"]: c["sqltext"] for c in inspect(conn).get_check_constraints("tasks")}
    assert (
        "claimed_by IS NOT NULL"
        in indexes["ix_tasks_claimed_by_id"]["dialect_options"]["postgresql_where"]
    )
    assert "cancelled" in checks["ck_tasks_status"]


def test_the_migrated_schema_has_the_partial_indexes_on_sqlite(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'new.db'}")
    db.ensure_schema()
    with db.engine.connect() as conn:
        sql = dict(
            conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index'")).all()
        )
    db.dispose()
    assert "WHERE claimed_by IS NOT NULL" in sql["ix_tasks_claimed_by_id"]
    assert "WHERE status IN" in sql["ix_tasks_active_updated_at"]
