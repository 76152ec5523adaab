#!/usr/bin/env python3
"""The people's side over a million tasks: the pages of ``taskrail list`` and the
console's task list, and the bulk retry and cancel (issue 21).

Everything runs in a database of its own, ``bench_taskrail_listing_<pid>`` (created,
migrated to head with ``Database(url).upgrade()``, dropped at the end; ``--keep``
keeps it), and the benchmark's own Redis (``_common``: bench/run's, or one started
here), databases 9 (the broker) and 10 (breaker state), which it flushes.

- **fill**: ``--rows`` tasks (default 1,000,000) with one INSERT ... SELECT over
  generate_series (seeded random()): created every ~8 s over 90 days, ids in creation
  order; 20 task types (one 20% of the rows, the rarest 1%), each handled by one of
  10 agents; 50,000 clients; about 86% completed, 5% failed, 3% escalated (40% of
  them claimed by one of 8 people), 3% cancelled, 1% pending, and the last ten
  minutes' tasks still assigned or in progress; one type (company_tax) failed only
  in the first three days (an old incident: its failures all lie far back in id
  order, behind every newer failure). Then made exact: ``--bulk`` failed
  tasks of the big type and ``--bulk`` pending tasks. No task_events (a page does not
  read them). VACUUM ANALYZE, then CHECKPOINT (the bulk moves start from clean pages).
- **lists**: each filter of ``Taskrail.list_tasks`` (and ``--status`` with two
  statuses, a rare task type and the old incident's): the first page of 50 and a deep
  page (``after`` = the middle id of what the filter matches). ``--runs`` timed calls
  of the API (after 3 untimed), median and p95, and the ``EXPLAIN (ANALYZE, BUFFERS)``
  of the page's query (``orchestration.store.listing.list_query``). Goal: a page in < 50 ms (p95
  of the API call). The status+type pages (the old incident's among them) are served
  by the schema's ``ix_tasks_status_type_id``.
- **inbox**: the console's escalations inbox, ``Taskrail.inbox(limit=200)`` (the
  console's) and ``limit=50``: ``--runs`` timed calls, what it returns checked, and the
  ``EXPLAIN (ANALYZE, BUFFERS)`` of its unclaimed read, its claimed read and its count.
  Held to the same 50 ms.
- **bulk**: ``Taskrail.cancel_many(status="pending")`` over the ``--bulk`` pending
  tasks, then ``Taskrail.retry_many(status="failed", task_type=<the big type>)`` over
  the ``--bulk`` failed ones, publishing every assign hop to the real broker; tasks/s
  of each, and afterwards the counts checked: the tasks in their new status, one
  audit event per task with its actor, one message per retried task in the queue.
  ``--bulk-rounds`` rounds (default 3), the tasks put back between them; goal: the
  median retry >= 5,000 tasks/s. The time of each move is split by wrapping the
  count, the reads of each batch's ids and the writes (``apply_many``) for the run.
  Logging at the CLI's level (WARNING) unless ``--log-level``, into the logs folder.

usage: bench/listing.py [--rows 1000000] [--runs 30] [--bulk 10000] [--skip lists,bulk]
       python -m bench.listing ...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import sqlalchemy
except ImportError:  # run as bench/listing.py by a python outside the project's venv
    venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    if not venv_python.exists():
        raise
    os.execv(venv_python, [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])

import _common as cm
import psycopg
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

LISTING_DB = f"{cm.DB_NAME}_listing_{os.getpid()}"
REDIS_DB_BROKER = 9
REDIS_DB_BREAKERS = 10
GOAL_PAGE_MS = 50.0
GOAL_RETRY_S = 5000.0
PAGE = 50
WARMUP = 3
BIG_TYPE = "personal_tax"
RARE_TYPE = "trust_return"
OLD_TYPE = "company_tax"  # failed in the first three days only
# 20 task types and the agent of each; the weights are percentages of the rows.
TYPES = [
    ("personal_tax", "tax_agent", 20), ("payroll", "payroll_agent", 12),
    ("bookkeeping", "books_agent", 10), ("vat_return", "tax_agent", 8),
    ("invoice_intake", "intake_agent", 7), ("receipt_scan", "intake_agent", 6),
    ("bank_reconciliation", "books_agent", 5), ("expense_report", "books_agent", 4),
    ("company_tax", "tax_agent", 4), ("pension", "payroll_agent", 3),
    ("benefits", "payroll_agent", 3), ("audit_prep", "audit_agent", 3),
    ("annual_accounts", "audit_agent", 3), ("kyc_check", "kyc_agent", 3),
    ("aml_screen", "kyc_agent", 2), ("mail_triage", "mail_agent", 2),
    ("client_onboarding", "onboard_agent", 2), ("dividend", "tax_agent", 1),
    ("property_tax", "property_agent", 1), ("trust_return", "trust_agent", 1),
]  # fmt: skip
PEOPLE = ["ana", "ben", "chloe", "dev", "eli", "fatima", "goran", "hana"]
CLIENTS = 50_000
DAYS = 90


class Explain(Executable, ClauseElement):
    """``EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)`` of a statement, its parameters bound
    as the statement binds them (enums, UTC datetimes)."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + compiler.process(element.statement, **kw)


# -- the table -----------------------------------------------------------------------


def _slots() -> tuple[str, str]:
    """Two SQL arrays of 100 slots: the task type and its agent, by weight."""
    types: list[str] = []
    agents: list[str] = []
    for name, agent, weight in TYPES:
        types += [name] * weight
        agents += [agent] * weight
    assert len(types) == 100
    return (
        "ARRAY[" + ",".join(f"'{t}'" for t in types) + "]",
        "ARRAY[" + ",".join(f"'{a}'" for a in agents) + "]",
    )


def fill(c: psycopg.Connection, rows: int, bulk: int) -> None:
    """``rows`` tasks (see the module's docstring), then exactly ``bulk`` failed tasks of
    BIG_TYPE and ``bulk`` pending tasks."""
    types, agents = _slots()
    people = "ARRAY[" + ",".join(f"'{p}'" for p in PEOPLE) + "]"
    c.execute("SELECT setseed(0.21)")
    # One row per i; the draws s (status), t (type), k (client), p (claim) are made in a
    # subquery so that each row gets its own. The newest ten minutes are still running.
    c.execute(
        f"""
        INSERT INTO tasks (client_id, task_type, status, assigned_agent, payload, result,
            attempts, last_error, idempotency_key, created_at, updated_at, completed_at,
            claimed_by, claimed_at)
        SELECT client_id, task_type, status,
            CASE WHEN status = 'pending' THEN NULL ELSE agent END,
            jsonb_build_object('year', 2025, 'ref', 'C-' || client_id, 'scan', i %% 7 = 0),
            CASE WHEN status = 'completed' THEN jsonb_build_object('refund', i %% 2000) END,
            CASE status WHEN 'failed' THEN 3 WHEN 'pending' THEN 0 ELSE 1 END,
            CASE status WHEN 'failed' THEN 'upstream 503: service unavailable'
                WHEN 'escalated' THEN 'missing document: W-2'
                WHEN 'cancelled' THEN 'client withdrew' END,
            CASE WHEN i %% 3 = 0 THEN 'req-' || i END,
            created_at,
            created_at + interval '2 seconds',
            CASE WHEN status IN ('completed', 'failed', 'cancelled')
                THEN created_at + interval '2 seconds' END,
            CASE WHEN status = 'escalated' AND p < 0.4
                THEN ({people})[1 + floor(p * 20)::int] END,
            CASE WHEN status = 'escalated' AND p < 0.4
                THEN created_at + interval '1 hour' END
        FROM (
            SELECT i, k AS client_id, created_at,
                ({types})[1 + floor(t * 100)::int] AS task_type,
                ({agents})[1 + floor(t * 100)::int] AS agent,
                p,
                CASE
                    WHEN created_at > now() - interval '10 minutes'
                        THEN (ARRAY['pending', 'assigned', 'in_progress'])[1 + floor(s * 3)::int]
                    WHEN s < 0.86 THEN 'completed'
                    WHEN s < 0.91 THEN 'failed'
                    WHEN s < 0.94 THEN 'escalated'
                    WHEN s < 0.97 THEN 'cancelled'
                    WHEN s < 0.98 THEN 'pending'
                    ELSE 'completed'
                END AS status
            FROM (
                SELECT i, random() AS s, random() AS t, random() AS p,
                    1 + floor(random() * {CLIENTS})::bigint AS k,
                    now() - interval '{DAYS} days'
                        + (i - 1) * (interval '{DAYS} days' / %(rows)s) AS created_at
                FROM generate_series(1, %(rows)s) i
            ) draws
        ) picked
        """,
        {"rows": rows},
    )
    # An old incident: OLD_TYPE failed for the table's first three days and never since
    # (a filter whose matches all lie far back in id order).
    c.execute(
        "UPDATE tasks SET status = 'completed', attempts = 1, last_error = NULL, "
        "result = '{\"refund\": 1}', completed_at = updated_at "
        f"WHERE task_type = '{OLD_TYPE}' AND status = 'failed'"
    )
    c.execute(
        "UPDATE tasks SET status = 'failed', attempts = 3, result = NULL, "
        "last_error = 'upstream 503: service unavailable' "
        f"WHERE task_type = '{OLD_TYPE}' AND status = 'completed' AND id <= %s",
        (rows * 3 // DAYS,),
    )
    # Exact counts for the bulk moves: move the oldest surplus out, or the oldest
    # completed tasks of the same kind in.
    exact = (
        (f"status = 'failed' AND task_type = '{BIG_TYPE}'",
         "status = 'completed', attempts = 1, last_error = NULL, result = '{\"refund\": 1}'",
         f"status = 'completed' AND task_type = '{BIG_TYPE}'",
         "status = 'failed', attempts = 3, result = NULL, "
         "last_error = 'upstream 503: service unavailable'"),
        ("status = 'pending'",
         "status = 'cancelled', last_error = 'client withdrew', completed_at = updated_at",
         "status = 'completed'",
         "status = 'pending', attempts = 0, result = NULL, completed_at = NULL, "
         "assigned_agent = NULL"),
    )  # fmt: skip
    for match, surplus, donor, missing in exact:
        have = c.execute(f"SELECT count(*) FROM tasks WHERE {match}").fetchone()[0]
        if have != bulk:
            change, source = (surplus, match) if have > bulk else (missing, donor)
            c.execute(
                f"UPDATE tasks SET {change} WHERE id IN "
                f"(SELECT id FROM tasks WHERE {source} ORDER BY id LIMIT %s)",
                (abs(have - bulk),),
            )
    settle(c)


def describe_table(c: psycopg.Connection) -> None:
    counts = dict(c.execute("SELECT status, count(*) FROM tasks GROUP BY 1 ORDER BY 2 DESC"))
    print("  statuses: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    claimed = c.execute("SELECT count(*) FROM tasks WHERE claimed_by IS NOT NULL").fetchone()[0]
    size = c.execute(
        "SELECT pg_size_pretty(pg_table_size('tasks')), pg_size_pretty(pg_indexes_size('tasks'))"
    ).fetchone()
    print(f"  claimed escalations: {claimed}; table {size[0]}, its indexes {size[1]}")
    shared = c.execute("SHOW shared_buffers").fetchone()[0]
    print(f"  PostgreSQL {c.info.server_version}, shared_buffers {shared}")


# -- pages -----------------------------------------------------------------------------


def cases() -> list[tuple[str, dict[str, Any]]]:
    """The filters timed: (label, list_tasks keyword arguments)."""
    return [
        ("no filter", {}),
        ("status=failed", {"status": "failed"}),
        ("status=failed,escalated", {"status": ["failed", "escalated"]}),
        (f"status=failed type={BIG_TYPE}", {"status": "failed", "task_type": BIG_TYPE}),
        (f"status=failed type={RARE_TYPE}", {"status": "failed", "task_type": RARE_TYPE}),
        # the old incident: its failures all lie far back (ix_tasks_status_type_id)
        (f"status=failed type={OLD_TYPE}", {"status": "failed", "task_type": OLD_TYPE}),
        ("client=4242", {"client_id": 4242}),
        ("agent=books_agent", {"agent": "books_agent"}),
        ("claimed_by=ana", {"claimed_by": "ana"}),
        ("since=1h", {"since": "1h"}),
        ("since=30d status=failed", {"since": "30d", "status": "failed"}),
        ("status=escalated", {"status": "escalated"}),
    ]


def plan_of(conn: Any, statement: Any) -> tuple[list[str], float]:
    lines = [str(x) for x in conn.execute(Explain(statement)).scalars()]
    ms = next(float(p.split(":")[1].split()[0]) for p in lines if p.startswith("Execution"))
    return lines, ms


def access_path(lines: list[str]) -> str:
    """The plan's scan nodes, in one line (``Index Scan Backward using ix_tasks_status_id``)."""
    scans = []
    for line in lines:
        node = line.strip().removeprefix("->").strip()
        if " using " in node or node.startswith(("Seq Scan", "Bitmap Heap Scan")):
            scans.append(node.split(" on ")[0].split(" (")[0])
    return " + ".join(scans) or "?"


def timed(fn: Any, runs: int) -> tuple[list[float], Any]:
    out = None
    for _ in range(WARMUP):
        out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times, out


def report(label: str, page: str, times: list[float], rows: int, plan: list[str], ms: float):
    p50, p95 = cm.median(times), cm.pct(times, 95)
    verdict = "PASS" if p95 < GOAL_PAGE_MS else "FAIL"
    print(
        f"  {label:48s} {page:5s} {rows:3d} rows  API median {p50:6.2f} ms  p95 {p95:6.2f} ms"
        f"  (EXPLAIN ANALYZE {ms:6.2f} ms)  {verdict}"
    )
    for line in plan:
        if not line.startswith("Planning"):
            print(f"      {line}")
    return {"label": label, "page": page, "p50": p50, "p95": p95, "plan_ms": ms,
            "path": access_path(plan), "ok": p95 < GOAL_PAGE_MS}  # fmt: skip


def lists(tr: Any, runs: int) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from orchestration.filters import TaskFilter
    from orchestration.models import tasks_table
    from orchestration.store.listing import list_query, where

    t = tasks_table.c
    print(
        f"lists: pages of {PAGE}, {runs} timed calls of Taskrail.list_tasks each after "
        f"{WARMUP} untimed; deep page: after = the middle id of what the filter matches"
    )
    out = []
    with tr.db.connect() as conn:
        for label, kwargs in cases():
            flt = TaskFilter.build(**kwargs)
            matched = conn.execute(
                select(sqlalchemy.func.count()).select_from(tasks_table).where(where(flt))
            ).scalar_one()
            middle = conn.execute(
                select(t.id).where(where(flt)).order_by(t.id.desc()).offset(matched // 2).limit(1)
            ).scalar()
            for page, after in (("first", None), ("deep", middle)):
                times, got = timed(
                    lambda kw=kwargs, a=after: tr.list_tasks(**kw, limit=PAGE, after=a), runs
                )
                page_flt = TaskFilter.build(**kwargs, after=after)
                plan, ms = plan_of(conn, list_query(page_flt, PAGE))
                out.append(report(f"{label} ({matched})", page, times, len(got), plan, ms))
    return out


INBOX_LIMITS = (200, 50)  # the console's INBOX_ROWS, and the API's default


def inbox(tr: Any, runs: int) -> list[dict[str, Any]]:
    """The console's escalations inbox, ``Taskrail.inbox(limit=n)``: ``runs`` timed calls
    (after WARMUP untimed), what it returned checked (escalated tasks only, the unclaimed
    first, each group oldest first, the count), and the ``EXPLAIN (ANALYZE, BUFFERS)`` of
    its three statements: the unclaimed read and the claimed read
    (``listing.inbox_query``; the claimed read runs only when fewer than ``n`` tasks are
    unclaimed, and is explained at ``n`` either way) and the count of escalated tasks
    (built here as ``listing.inbox`` builds it)."""
    from sqlalchemy import select

    from orchestration.filters import TaskFilter
    from orchestration.models import TaskStatus, tasks_table
    from orchestration.store.listing import inbox_query, where

    t = tasks_table.c
    escalated = where(TaskFilter(statuses=(TaskStatus.ESCALATED,)))
    count = select(sqlalchemy.func.count()).select_from(tasks_table).where(escalated)
    print(
        f"inbox: Taskrail.inbox(limit=n), {runs} timed calls each after {WARMUP} untimed; "
        "EXPLAIN of its two reads and its count"
    )
    out = []
    with tr.db.connect() as conn:
        total = conn.execute(count).scalar_one()
        unclaimed = conn.execute(
            select(sqlalchemy.func.count())
            .select_from(tasks_table)
            .where(escalated, t.claimed_by.is_(None))
        ).scalar_one()
        print(f"  {total} escalated tasks, {unclaimed} of them unclaimed")
        for n in INBOX_LIMITS:
            times, (tasks, got_total) = timed(lambda n=n: tr.inbox(limit=n), runs)
            order = [(task.claimed_by is not None, task.id) for task in tasks]
            right = (
                len(tasks) == min(n, total)
                and got_total == total
                and all(task.status == TaskStatus.ESCALATED for task in tasks)
                and order == sorted(order)
            )
            p50, p95 = cm.median(times), cm.pct(times, 95)
            ok = p95 < GOAL_PAGE_MS and right
            print(
                f"  inbox(limit={n}): {len(tasks)} rows, total {got_total}  API median "
                f"{p50:6.2f} ms  p95 {p95:6.2f} ms  checks {'as expected' if right else 'WRONG'}"
                f"  {'PASS' if ok else 'FAIL'}"
            )
            reads = []
            for name, stmt, runs_here in (
                ("unclaimed", inbox_query(n, claimed=False), True),
                ("claimed", inbox_query(n, claimed=True), unclaimed < n),
                ("count", count, True),
            ):
                plan, ms = plan_of(conn, stmt)
                ran = "" if runs_here else f" (not run: {unclaimed} unclaimed >= {n})"
                print(f"    {name} read{ran}: EXPLAIN ANALYZE {ms:.2f} ms")
                for line in plan:
                    if not line.startswith("Planning"):
                        print(f"      {line}")
                reads.append({"name": name, "ran": runs_here, "ms": ms, "path": access_path(plan)})
            out.append({"limit": n, "rows": len(tasks), "total": got_total, "p50": p50,
                        "p95": p95, "ok": ok, "reads": reads})  # fmt: skip
    return out


def summary(pages: list[dict[str, Any]], inboxes: list[dict[str, Any]]) -> None:
    if pages:
        print()
        print(f"== pages of {PAGE}: API p50 / p95 ms (EXPLAIN ANALYZE ms), first and deep page ==")
        by_label: dict[str, dict[str, dict[str, Any]]] = {}
        for r in pages:
            by_label.setdefault(r["label"], {})[r["page"]] = r
        for label, both in by_label.items():
            cells = [
                f"{p['p50']:6.2f} / {p['p95']:6.2f} ({p['plan_ms']:6.2f})"
                for p in (both["first"], both["deep"])
            ]
            ok = all(p["ok"] for p in both.values())
            path = both["first"]["path"]
            if both["deep"]["path"] != path:
                path += f"; deep: {both['deep']['path']}"
            print(f"  {label:48s} {cells[0]}   {cells[1]}  {'PASS' if ok else 'FAIL'}  {path}")
        worst = max(pages, key=lambda r: r["p95"])
        verdict = "MET" if all(r["ok"] for r in pages) else "NOT MET"
        print(
            f"  goal a page of list_tasks in < {GOAL_PAGE_MS:.0f} ms: {verdict} (slowest p95 "
            f"{worst['p95']:.2f} ms: {worst['label']}, {worst['page']} page)"
        )
    if inboxes:
        print()
        print("== the console's inbox, Taskrail.inbox: API p50 / p95 ms; EXPLAIN ANALYZE ms ==")
        for r in inboxes:
            reads = "  ".join(
                f"{x['name']} {x['ms']:.2f}{'' if x['ran'] else ' (not run)'} ({x['path']})"
                for x in r["reads"]
            )
            print(
                f"  inbox(limit={r['limit']}) {r['rows']} of {r['total']}  {r['p50']:6.2f} / "
                f"{r['p95']:6.2f}  {'PASS' if r['ok'] else 'FAIL'}  {reads}"
            )
        verdict = "MET" if all(r["ok"] for r in inboxes) else "NOT MET"
        print(f"  goal the inbox page in < {GOAL_PAGE_MS:.0f} ms: {verdict}")


# -- bulk ------------------------------------------------------------------------------


class Split:
    """Where a bulk move's time goes: the count (``listing.count_tasks``), the reads of
    each batch's ids (``listing.page_ids``) and the writes (``TransitionStore.apply_many``),
    measured by wrapping those functions for the length of the block (a function the
    code no longer has is left out: its share then counts as the rest). Publishing is
    timed by the dispatcher."""

    def __init__(self) -> None:
        self.count_s = self.read_s = self.write_s = 0.0
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str, make: Any) -> None:
        original = getattr(owner, name, None)
        if original is not None:
            self._saved.append((owner, name, original))
            setattr(owner, name, make(original))

    def __enter__(self) -> Split:
        from orchestration.store import listing
        from orchestration.store.transitions import TransitionStore

        def adding(field: str) -> Any:
            def make(original: Any) -> Any:
                def timed_call(*a: Any, **kw: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return original(*a, **kw)
                    finally:
                        setattr(self, field, getattr(self, field) + time.perf_counter() - t0)

                return timed_call

            return make

        def timed_pages(original: Any) -> Any:
            def pages(*a: Any, **kw: Any) -> Any:
                batches = original(*a, **kw)
                while True:
                    t0 = time.perf_counter()
                    ids = next(batches, None)
                    self.read_s += time.perf_counter() - t0
                    if ids is None:
                        return
                    yield ids

            return pages

        self._wrap(listing, "count_tasks", adding("count_s"))
        self._wrap(listing, "page_ids", timed_pages)
        self._wrap(TransitionStore, "apply_many", adding("write_s"))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def settle(c: psycopg.Connection) -> None:
    """VACUUM ANALYZE, then a checkpoint: every round starts from clean pages (the first
    write to a page after a checkpoint logs the whole page, as an old task's would)."""
    c.execute("VACUUM ANALYZE tasks")
    c.execute("VACUUM ANALYZE task_events")
    c.execute("CHECKPOINT")


def bulk(tr: Any, dispatcher: Any, n: int, rounds: int) -> None:
    """``rounds`` rounds of: cancel the ``n`` pending tasks, retry the ``n`` failed tasks
    of BIG_TYPE, check; then (untimed) put both sets back as they were."""
    from sqlalchemy import text

    queue = "taskrail.hops"
    print(
        f"bulk: {n} tasks each, {rounds} rounds (the tasks put back between rounds, then "
        f"VACUUM ANALYZE and CHECKPOINT); assign hops published to redis db "
        f"{REDIS_DB_BROKER} of {cm.REDIS_HOST} (queue {queue}, no worker consumes it)"
    )

    def count(sql: str) -> int:
        with tr.db.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())

    def run(label: str, call: Any) -> float:
        dispatcher.publish_s = 0.0
        marks: list[tuple[float, int]] = []  # (time, tasks done) after each batch

        def progress(done: int, total: int) -> None:
            marks.append((time.perf_counter(), done))

        with Split() as split:
            t0 = time.perf_counter()
            res = call(progress)
            dt = time.perf_counter() - t0
        rate = res.moved / dt
        steps = list(zip([(t0, 0), *marks], marks, strict=False))
        per = sorted((b[1] - a[1]) / (b[0] - a[0]) for a, b in steps) or [0.0]
        rest = dt - split.count_s - split.read_s - split.write_s - dispatcher.publish_s
        print(
            f"    {label}: matched {res.matched}, moved {res.moved}, skipped {res.skipped} in "
            f"{dt:.2f}s -> {rate:,.0f} tasks/s ({len(marks)} batches, {per[0]:,.0f}-"
            f"{per[-1]:,.0f} tasks/s each)"
        )
        print(
            f"      time split: count {split.count_s * 1000:.0f} ms, reading the batches' ids "
            f"{split.read_s * 1000:.0f} ms, moving them (apply_many) {split.write_s * 1000:.0f} "
            f"ms, publishing {dispatcher.publish_s * 1000:.0f} ms, the rest {rest * 1000:.0f} ms"
        )
        return rate

    big = f"task_type = '{BIG_TYPE}'"
    rates: dict[str, list[float]] = {"cancel": [], "retry": []}
    wrong = 0
    for r in range(1, rounds + 1):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"  round {r}/{rounds}  {time.strftime('%H:%M:%S')}  load {load}")
        rds = cm.flush_redis(REDIS_DB_BROKER)
        ana, ben = f"bench-ana-{r}", f"bench-ben-{r}"
        cancelled_before = count("SELECT count(*) FROM tasks WHERE status = 'cancelled'")
        rates["cancel"].append(
            run(
                "cancel_many(status=pending)",
                lambda p, by=ana: tr.cancel_many(
                    status="pending", reason="client withdrew", by=by, progress=p
                ),
            )
        )
        rates["retry"].append(
            run(
                f"retry_many(status=failed, task_type={BIG_TYPE})",
                lambda p, by=ben: tr.retry_many(
                    status="failed", task_type=BIG_TYPE, by=by, note="upstream fixed", progress=p
                ),
            )
        )
        checks = [
            ("pending, all of them retried tasks",
             count("SELECT count(*) FROM tasks WHERE status = 'pending'"),
             count(f"SELECT count(*) FROM tasks WHERE status = 'pending' AND {big}"), n),
            ("cancelled added",
             count("SELECT count(*) FROM tasks WHERE status = 'cancelled'") - cancelled_before, n),
            (f"cancel events by {ana}",
             count(f"SELECT count(*) FROM task_events WHERE event = 'cancel' AND actor = '{ana}'"),
             n),
            (f"failed {BIG_TYPE} left",
             count(f"SELECT count(*) FROM tasks WHERE status = 'failed' AND {big}"), 0),
            (f"retry events by {ben} with the note",
             count(f"SELECT count(*) FROM task_events WHERE event = 'retry' AND actor = '{ben}' "
                   "AND note = 'upstream fixed' AND from_status = 'failed' "
                   "AND to_status = 'pending'"),
             n),
            (f"messages in {queue}", int(rds.llen(queue)), n),
        ]  # fmt: skip
        bad = [(label, got, want) for label, *gots, want in checks for got in gots if got != want]
        wrong += len(bad)
        print(
            "    checks: "
            + ("all as expected" if not bad else "WRONG " + "; ".join(map(str, bad)))
            + f" ({n} pending, cancelled +{n}, {n} cancel and {n} retry events with their "
            f"actor, {n} messages)"
        )
        rds.flushdb()
        if r < rounds:
            with psycopg.connect(cm.pg_dsn(LISTING_DB), autocommit=True) as c:
                c.execute(f"UPDATE tasks SET status = 'failed', attempts = 3 WHERE status = "
                          f"'pending' AND {big}")  # fmt: skip
                c.execute(
                    "UPDATE tasks SET status = 'pending', last_error = NULL, completed_at = NULL "
                    "WHERE id IN (SELECT task_id FROM task_events WHERE event = 'cancel' "
                    "AND actor = %s)",
                    (ana,),
                )
                settle(c)
    med_cancel, med_retry = cm.median(rates["cancel"]), cm.median(rates["retry"])
    print(
        f"  bulk cancel of {n}: median {med_cancel:,.0f} tasks/s (rounds "
        + ", ".join(f"{x:,.0f}" for x in rates["cancel"])
        + ")"
    )
    met = med_retry >= GOAL_RETRY_S and not wrong
    print(
        f"  goal bulk retry of {n} >= {GOAL_RETRY_S:,.0f} tasks/s: {'MET' if met else 'NOT MET'}"
        f" (median {med_retry:,.0f} tasks/s; rounds "
        + ", ".join(f"{x:,.0f}" for x in rates["retry"])
        + ")"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="tasks in the table")
    ap.add_argument("--runs", type=int, default=30, help="timed calls per page")
    ap.add_argument("--bulk", type=int, default=10_000, help="tasks retried, and cancelled")
    ap.add_argument("--bulk-rounds", type=int, default=3, help="rounds of the bulk moves")
    ap.add_argument("--skip", default="", help="lists (pages and inbox), bulk")
    ap.add_argument("--log-level", default="WARNING", help="taskrail's (the CLI's: WARNING)")
    ap.add_argument("--keep", action="store_true", help="keep the database (its name printed)")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.rows < 20 * args.bulk:
        ap.error("--rows must be at least 20 x --bulk (the failed tasks of one type)")

    log_dir = Path(tempfile.mkdtemp(prefix="taskrail-bench-listing-"))
    print(f"# listing.py  {args.rows} tasks in database {LISTING_DB}; logs in {log_dir}")
    cm.fresh_database(LISTING_DB)
    tr = None
    try:
        t0 = time.perf_counter()
        with psycopg.connect(cm.pg_dsn(LISTING_DB), autocommit=True) as c:
            fill(c, args.rows, args.bulk)
            print(f"  filled and analysed in {time.perf_counter() - t0:.1f}s")
            describe_table(c)
        os.environ.update(
            TASKRAIL_DATABASE_URL=cm.sqlalchemy_url(LISTING_DB),
            TASKRAIL_BROKER_URL=cm.redis_url(REDIS_DB_BROKER),
            TASKRAIL_REDIS_URL=cm.redis_url(REDIS_DB_BREAKERS),
            TASKRAIL_AGENTS="demo_agents",
            TASKRAIL_LOG_LEVEL=args.log_level,
        )
        from orchestration.api import Taskrail
        from orchestration.logging import configure_logging
        from orchestration.messaging.dispatch import Dispatcher, make_celery
        from orchestration.settings import Settings

        with open(log_dir / "taskrail.log", "a") as log_file:
            configure_logging("json", args.log_level, stream=log_file)

            class TimedDispatcher(Dispatcher):
                """The real dispatcher, plus the time spent publishing."""

                publish_s = 0.0

                def send_many(self, hop, args_list):  # type: ignore[override]
                    t1 = time.perf_counter()
                    try:
                        return super().send_many(hop, args_list)
                    finally:
                        self.publish_s += time.perf_counter() - t1

            settings = Settings()
            dispatcher = TimedDispatcher(make_celery(settings))
            tr = Taskrail(settings, dispatcher=dispatcher)
            if "lists" not in skip:
                summary(lists(tr, args.runs), inbox(tr, args.runs))
                print()
            if "bulk" not in skip:
                bulk(tr, dispatcher, args.bulk, args.bulk_rounds)
    finally:
        if tr is not None:
            tr.close()
        if args.keep:
            print(f"  kept database {LISTING_DB}")
        else:
            with psycopg.connect(cm.pg_dsn("postgres"), autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{LISTING_DB}" WITH (FORCE)')


if __name__ == "__main__":
    main()
