"""The escalations inbox (``Taskrail.inbox``, the console's ``/escalations``): escalated
tasks only, the unclaimed first, then the oldest first; on PostgreSQL from its index."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from orchestration.errors import InvalidFilter
from orchestration.models import TaskStatus as S
from orchestration.store.db import Database
from orchestration.store.listing import inbox_query
from tests.unit.domain.people_support import Backend


def test_the_unclaimed_come_first_then_the_oldest(backend: Backend) -> None:
    # Given escalated tasks, some claimed, among tasks in other states
    claimed_old = backend.put(S.ESCALATED, claimed_by="ana")
    unclaimed_old = backend.put(S.ESCALATED)
    backend.put(S.FAILED)
    claimed_new = backend.put(S.ESCALATED, claimed_by="bob")
    unclaimed_new = backend.put(S.ESCALATED)
    backend.put(S.COMPLETED)

    # When the inbox is read, whole and a first page of three
    tasks, total = backend.trail.inbox(limit=10)
    first, same_total = backend.trail.inbox(limit=3)

    # Then only the escalated tasks: unclaimed first, each group oldest first
    assert [t.id for t in tasks] == [unclaimed_old, unclaimed_new, claimed_old, claimed_new]
    assert [t.claimed_by for t in tasks] == [None, None, "ana", "bob"]
    assert total == same_total == 4
    assert [t.id for t in first] == [unclaimed_old, unclaimed_new, claimed_old]


@pytest.mark.parametrize("limit", [0, -1, 1001, True, "5"])
def test_a_bad_limit_is_refused(backend: Backend, limit: object) -> None:
    with pytest.raises(InvalidFilter):
        backend.trail.inbox(limit=limit)  # type: ignore[arg-type]


@pytest.mark.integration
def test_postgres_reads_the_inbox_from_its_index(pg_db: Database) -> None:
    # Given escalated tasks on PostgreSQL
    with pg_db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (client_id, task_type, status, payload, attempts, "
                "created_at, updated_at) SELECT i, 'payroll', 'escalated', '{}', 1, now(), "
                "now() FROM generate_series(1, 3) AS i"
            )
        )
    plans = []
    for claimed in (False, True):
        query = inbox_query(50, claimed=claimed).compile(
            dialect=pg_db.engine.dialect, compile_kwargs={"literal_binds": True}
        )

        # When the inbox's queries are planned with the table scans ruled out
        with pg_db.connect() as conn:
            conn.execute(text("SET enable_seqscan = off"))
            conn.execute(text("SET enable_bitmapscan = off"))
            plans.append("\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {query}"))))

    # Then each reads an index in id order and stops: no sort of every escalated task
    for plan, index in zip(plans, ("unclaimed", "claimed"), strict=True):
        assert f"ix_tasks_escalated_{index}" in plan, plan
        assert "Sort" not in plan, plan
