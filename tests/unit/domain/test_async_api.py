"""The async producer API (issue 22.4) does what the sync API does, on the embedded
SQLite and on the real PostgreSQL with a Redis broker: every call, the same records,
histories (actor, note, worker "api"), hop messages and return values; the module
coroutines use one handle per event loop; many calls at once share the pool."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration import api
from orchestration.api import aio
from orchestration.models import TaskStatus
from tests.unit.domain.aio_support import Loop, async_trail, comparable, outcome
from tests.unit.domain.people_support import Backend

S = TaskStatus
Do = Callable[..., Any]


def script(do: Do, backend: Backend, base: int) -> tuple[list[Any], list[int]]:
    """Every call of the API once or more, through ``do(method, *args, **kwargs)``, on
    tasks of client ids ``base + n``. Returns what the calls returned (labelled) and the
    tasks made, in order."""
    out: list[Any] = []
    tasks: list[int] = []

    def new(task_id: int) -> int:
        tasks.append(task_id)
        return task_id

    key = f"tax-2025@{base}"
    first = new(do("submit", "personal_tax", base + 1, {"year": 2025}, idempotency_key=key))
    again = do("submit", "personal_tax", base + 1, {"year": 1}, idempotency_key=key)
    many = do(
        "submit_many",
        [
            api.NewTask("payroll", base + 2, {"n": 1.0, "s": "a\x00b"}),
            {"task_type": "bookkeeping", "client_id": base + 3, "idempotency_key": key},
        ],
    )
    new(many[0])
    out += [("same key", again == first, many[1] == first), ("empty", do("submit_many", []))]
    failed = new(backend.put(S.FAILED, client_id=base + 4))
    do("retry", failed, by="ana", note="again")
    escalated = new(backend.put(S.ESCALATED, client_id=base + 5))
    do("claim", escalated, by="ana", note="mine")
    do("claim", escalated, by="ana")  # held already: nothing written
    do("unclaim", escalated, by="bob")
    do("claim", escalated, by="bob")
    do("resolve", escalated, {"refund": 120.5}, by="bob", note="read the scan")
    reopened = new(backend.put(S.ESCALATED, client_id=base + 6, payload={"year": 2024}))
    do("reopen", reopened, payload={"w2": "scan.pdf"}, by="ana", note="found it")
    rejected = new(backend.put(S.ESCALATED, client_id=base + 7))
    do("reject", rejected, "no W-2 will come", by="ana")
    cancelled = new(backend.put(S.IN_PROGRESS, client_id=base + 8))
    do("cancel", cancelled, reason="client withdrew", by="ana", note="phone")
    new(backend.put(S.FAILED, client_id=base + 9))
    out.append(("retry_many", do("retry_many", client_id=base + 9, by="ana", note="bulk")))
    new(backend.put(S.PENDING, client_id=base + 10))
    out.append(("dry", do("cancel_many", status="pending", client_id=base + 10, dry_run=True)))
    out.append(
        ("cancel_many", do("cancel_many", status=["pending"], client_id=base + 10, by="ana"))
    )
    for task_id in tasks:
        out += [("get", do("get", task_id)), ("history", do("history", task_id))]
    out.append(("list", do("list_tasks", client_id=base + 6)))
    out.append(("list pending", [t for t in do("list_tasks", status="pending") if t.id in tasks]))
    return out, tasks


def test_every_call_does_what_the_sync_call_does(backend: Backend) -> None:
    # Given the sync API's run of every call, and the hops it sent
    hops_before = backend.assign_hops()
    sync_out, sync_tasks = script(
        lambda name, *a, **k: getattr(backend.trail, name)(*a, **k), backend, 1000
    )
    sync_hops = backend.assign_hops()[len(hops_before) :]

    # When the async API makes the same calls
    with async_trail(backend.settings) as loop:
        async_out, async_tasks = script(loop.call, backend, 2000)
        async_hops = backend.assign_hops()[len(hops_before) + len(sync_hops) :]

        # Then every call returned the same, and wrote the same rows and audit events
        sync_ids = {t: n for n, t in enumerate(sync_tasks)}
        async_ids = {t: n for n, t in enumerate(async_tasks)}
        assert comparable(async_out, async_ids, 2000) == comparable(sync_out, sync_ids, 1000)
        # and sent the same first hops, in the same order
        assert [async_ids.get(t, -1) for t in async_hops] == [
            sync_ids.get(t, -1) for t in sync_hops
        ]
        # and the reads of one state answer the same
        assert loop.call("inbox", limit=50) == backend.trail.inbox(limit=50)
        assert loop.call("counts") == backend.trail.counts()
        assert loop.call("list_tasks", limit=500) == backend.trail.list_tasks(limit=500)
        assert loop.call("list_tasks", status="escalated", claimed_by="bob") == (
            backend.trail.list_tasks(status="escalated", claimed_by="bob")
        )
    # and the audit events name the person, the note and the api worker
    last = backend.trail.history(async_tasks[3])[-1]
    assert (last.event, last.actor, last.note, last.worker) == (
        "resolve",
        "bob",
        "read the scan",
        "api",
    )


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), inner, max_size=4)
    ),
    max_leaves=12,
)
# Mostly objects (payloads), some values that are not, some not JSON at all.
_PAYLOADS = st.none() | st.dictionaries(st.text(max_size=8), _VALUES, max_size=5) | _VALUES
_TEXTS = st.none() | st.text(max_size=20) | st.integers(0, 3)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=_PAYLOADS,
    task_type=st.sampled_from(["payroll", "personal_tax", "no_such_type", ""]),
    client_id=st.integers(-1, 3) | st.sampled_from([2**63, "7", True]),
    reason=_TEXTS,
    by=_TEXTS,
    note=_TEXTS,
)
def test_sync_and_async_give_the_same_records_and_histories(
    backend: Backend,
    payload: Any,
    task_type: Any,
    client_id: Any,
    reason: Any,
    by: Any,
    note: Any,
) -> None:
    with async_trail(backend.settings) as loop:
        # Given one submit through each API
        made = outcome(lambda: backend.trail.submit(task_type, client_id, payload))
        made_async = outcome(lambda: loop.call("submit", task_type, client_id, payload))
        # Then both refuse it with the same error, or both store the same task
        assert made[0] == made_async[0], (made, made_async)
        if made[0] == "error":
            assert made_async == made
            return
        sync_id, async_id = made[1], made_async[1]
        ids = {sync_id: 0, async_id: 0}
        assert comparable(loop.call("get", async_id), ids) == comparable(
            backend.trail.get(sync_id), ids
        )
        # When each is cancelled with the same reason, actor and note
        moved = outcome(lambda: backend.trail.cancel(sync_id, reason=reason, by=by, note=note))
        moved_async = outcome(
            lambda: loop.call("cancel", async_id, reason=reason, by=by, note=note)
        )
        # Then the outcome, the record and the history are the same
        assert moved_async == moved
        assert comparable(loop.call("get", async_id), ids) == comparable(
            backend.trail.get(sync_id), ids
        )
        assert comparable(loop.call("history", async_id), ids) == comparable(
            backend.trail.history(sync_id), ids
        )


def test_many_calls_at_once_share_the_pool(backend: Backend) -> None:
    # Given more concurrent submits than the pool has connections
    async def submit_all(loop: Loop) -> list[int]:
        calls = [loop.trail.submit("payroll", n, {"n": n}) for n in range(40)]
        return list(await asyncio.gather(*calls))

    async def get_all(loop: Loop, ids: list[int]) -> list[Any]:
        return list(await asyncio.gather(*(loop.trail.get(i) for i in ids)))

    with async_trail(backend.settings) as loop:
        ids = loop.run(submit_all(loop))
        # Then each got its own task, stored as given, and its first hop
        assert len(set(ids)) == 40
        records = loop.run(get_all(loop, ids))
    assert [(r.client_id, r.payload) for r in records] == [(n, {"n": n}) for n in range(40)]
    assert sorted(backend.assign_hops()) == sorted(ids)


def test_the_module_coroutines_use_one_handle_per_loop(backend: Backend) -> None:
    # Given a failed task
    task_id = backend.put(S.FAILED)

    async def moves() -> tuple[aio.AsyncTaskrail, Any]:
        # When the module coroutines retry it, cancel it and read it back
        await aio.retry(task_id, by="ana")
        await aio.cancel(task_id, reason="dup", by="ana")
        handle = aio.client()
        assert aio.client() is handle
        got = (await aio.get(task_id), await aio.history(task_id))
        await aio.reset_client()
        return handle, got

    first, (task, history) = asyncio.run(moves())
    second, _ = asyncio.run(moves_again(task_id))

    # Then the moves are made, and each loop had a handle of its own
    assert task.status is S.CANCELLED and task.last_error == "dup"
    assert [(e.event, e.actor) for e in history[-2:]] == [("retry", "ana"), ("cancel", "ana")]
    assert first is not second


async def moves_again(task_id: int) -> tuple[aio.AsyncTaskrail, Any]:
    handle = aio.client()
    got = await aio.list_tasks(status="cancelled"), await aio.inbox(limit=5)
    assert [t.id for t in got[0]] == [task_id]
    assert got[1] == ([], 0)
    await aio.reset_client()
    return handle, got


def test_the_module_coroutines_need_a_running_loop() -> None:
    try:
        aio.client()
    except RuntimeError as err:
        assert "no running event loop" in str(err)
    else:
        raise AssertionError("aio.client() outside a loop gave a handle")
