"""Inserting new tasks: one statement per batch on PostgreSQL, idempotency keys resolved.

:func:`insert_tasks` takes rows the producer has checked (orchestration.values) and
returns (id, created) per row, in input order; a row whose idempotency key exists
already is answered with that task's id and ``created`` False.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import orjson
import psycopg
from sqlalchemy import Text, bindparam, select
from sqlalchemy.dialects import sqlite

from orchestration import constants as c
from orchestration.errors import WriteConflict
from orchestration.logging import get_logger
from orchestration.models import TaskStatus, tasks_table, utcnow
from orchestration.store.db import Database

log = get_logger("taskrail.api")

# serialization_failure, deadlock_detected: the transaction lost a conflict; try again.
_CONFLICT_STATES = frozenset({"40001", "40P01"})


class NewRow(NamedTuple):
    """One checked item of submit_many, as it is inserted."""

    client_id: int
    task_type: str
    payload: str  # the JSON text it was checked as
    idempotency_key: str | None


# submit_many on PostgreSQL: every row of the batch (a JSON array of
# [client_id, task_type, payload, idempotency_key]) in one INSERT; ids drawn and answered
# in input order, rows inserted in the order of their keys: two batches that share keys
# take their locks in one order, never each waiting on the other (a deadlock).
_INSERT_MANY = """
WITH src AS (
    SELECT nextval(pg_get_serial_sequence('tasks', 'id')) AS id, o, e
    FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS a(e, o)
), ins AS (
    INSERT INTO tasks (id, client_id, task_type, status, payload, attempts,
                       idempotency_key, created_at, updated_at)
    SELECT id, (e->>0)::bigint, e->>1, 'pending', e->2, 0, e->>3, now(), now()
    FROM src ORDER BY (e->>3) COLLATE "C", o
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
)
SELECT src.id, ins.id IS NOT NULL, src.e->>3 FROM src LEFT JOIN ins USING (id) ORDER BY src.o
"""


def _insert_batch(conn: Any, batch: str) -> tuple[list[Any], dict[str, int]]:
    """Run _INSERT_MANY on ``conn``; (id, created, key) per row, and the ids of keys taken
    before this statement (or twice in this batch)."""
    created = conn.execute(_INSERT_MANY, (batch,)).fetchall()
    missing = [key for _id, is_new, key in created if not is_new]
    existing: dict[str, int] = {}
    if missing:
        existing = dict(
            conn.execute(
                "SELECT idempotency_key, id FROM tasks WHERE idempotency_key = ANY(%s)",
                (missing,),
            ).fetchall()
        )
    return created, existing


def insert_tasks(db: Database, rows: list[NewRow]) -> list[tuple[int, bool]]:
    """Insert ``rows``; (id, created) per row, in their order. Raises WriteConflict
    after DB_CONFLICT_ATTEMPTS lost conflicts, DatabaseUnavailable."""
    return _insert_postgres(db, rows) if db.is_postgres else _insert_sqlite(db, rows)


def _insert_postgres(db: Database, rows: list[NewRow]) -> list[tuple[int, bool]]:
    """Insert ``rows`` in one statement, whatever their number; (id, created) per row.

    The rows travel as one JSON array (the payloads as the JSON text they were
    checked as); each draws its id from the sequence in input order, and a row whose
    idempotency key exists already is skipped and answered with that task's id. A
    deadlock or serialization failure is tried again, up to DB_CONFLICT_ATTEMPTS
    times in all (then WriteConflict).
    """
    batch = orjson.dumps(
        [
            [
                row.client_id,
                row.task_type,
                orjson.Fragment(row.payload),
                row.idempotency_key,
            ]
            for row in rows
        ]
    ).decode()
    with db.driver_connection() as conn:
        for attempt in range(1, c.DB_CONFLICT_ATTEMPTS + 1):
            try:
                with conn.transaction():
                    created, existing = _insert_batch(conn, batch)
                break
            except psycopg.Error as err:
                if err.sqlstate not in _CONFLICT_STATES:
                    raise
                if attempt == c.DB_CONFLICT_ATTEMPTS:
                    detail = str(err).splitlines()[0] if str(err) else ""
                    raise WriteConflict(db.where, attempt, detail) from None
                log.info("submit_conflict_retry", attempt=attempt, error=type(err).__name__)
                db.pause(random.uniform(0.5, 1.0) * c.DB_CONFLICT_PAUSE_S * attempt)
    return [
        (task_id, True) if is_new else (existing[key], False) for task_id, is_new, key in created
    ]


def _insert_sqlite(db: Database, new_rows: list[NewRow]) -> list[tuple[int, bool]]:
    """Insert ``new_rows`` with SQLAlchemy; returns (id, created) per row,
    resolving idempotency keys. Payloads go in as the JSON text they were checked as."""
    now = utcnow()
    rows = [row._asdict() for row in new_rows]
    for row in rows:
        row.update(status=TaskStatus.PENDING, attempts=0, created_at=now, updated_at=now)
        row["payload_text"] = row.pop("payload")
    keyed = [row for row in rows if row["idempotency_key"] is not None]
    insert = sqlite.insert(tasks_table).values(payload=bindparam("payload_text", type_=Text()))
    with db.begin() as conn:
        if not keyed:
            stmt = insert.returning(tasks_table.c.id, sort_by_parameter_order=True)
            ids = conn.execute(stmt, rows).scalars().all()
            return [(task_id, True) for task_id in ids]
        result: list[tuple[int, bool]] = []
        stmt = insert.on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(
            tasks_table.c.id
        )
        seen: dict[str, int] = {}
        for row in rows:
            key = row["idempotency_key"]
            if key is not None and key in seen:
                result.append((seen[key], False))
                continue
            new_id = conn.execute(stmt, row).scalar_one_or_none()
            if new_id is None:
                new_id = conn.execute(
                    select(tasks_table.c.id).where(tasks_table.c.idempotency_key == key)
                ).scalar_one()
                result.append((new_id, False))
            else:
                result.append((new_id, True))
            if key is not None:
                seen[key] = new_id
        return result
