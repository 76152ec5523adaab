"""The pool of `celery -A workers worker` (issue 22): with no --pool it is taskrail's
default (constants.DEFAULT_WORKER_POOL, the hops in the worker's own process) instead of
Celery's prefork; a pool named on the command line or in CELERY_WORKER_POOL is obeyed.

Real worker processes on the real servers; each names its pool on its worker_ready line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from orchestration import api
from orchestration import constants as c
from orchestration.api import NewTask
from orchestration.settings import Settings
from tests.agents import key
from tests.support import WorkerFleet, WorkerProcess, wait_until_resting

pytestmark = pytest.mark.integration


def _ready_pool(worker: WorkerProcess) -> str:
    """The pool named by the worker's worker_ready log line."""
    for line in worker.log().splitlines():
        if line.startswith("{") and '"worker_ready"' in line:
            return str(json.loads(line)["pool"])
    raise AssertionError(f"no worker_ready line:\n{worker.log()[-3000:]}")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


@pytest.mark.parametrize(
    ("pool", "extra_env", "expected"),
    [
        (None, {}, c.DEFAULT_WORKER_POOL),
        ("prefork", {}, "prefork"),
        ("threads", {}, "threads"),
        (None, {"CELERY_WORKER_POOL": "prefork"}, "prefork"),
    ],
    ids=["no-pool-flag", "explicit-prefork", "explicit-threads", "env-prefork"],
)
def test_the_worker_runs_the_pool_it_was_given_or_taskrails_default(
    fleet: WorkerFleet,
    server_settings: Settings,
    pool: str | None,
    extra_env: dict[str, str],
    expected: str,
) -> None:
    # Given `celery -A workers worker -c 2`, with or without a pool named
    worker = fleet.start(pool=pool, concurrency=2, extra_env=extra_env)
    # Then it runs that pool, or taskrail's default when none was named
    assert _ready_pool(worker) == expected
    forked = _children(worker.proc.pid)
    if expected == "prefork":
        assert len(forked) == 2, forked
    else:
        assert forked == [], "the hops run in the worker's own process"
    # And it drives tasks home
    ids = api.submit_many(
        [NewTask(t, k, {"scenario": "ok"}) for k, t in enumerate(["personal_tax", "payroll"] * 5)]
    )
    final = wait_until_resting(server_settings.effective_database_url, ids, timeout=60)
    assert set(final.values()) == {"completed"}, final


@pytest.mark.parametrize("kind", ["sync_gauge", "async_gauge"])
def test_the_plain_worker_keeps_many_slow_calls_in_flight_in_one_process(
    fleet: WorkerFleet, server_settings: Settings, counter_url: str, kind: str
) -> None:
    # Given `celery -A workers worker` with no pool flag: one solo process, all queues
    worker = fleet.start(pool=None, concurrency=2)
    assert _ready_pool(worker) == "solo"
    # When 40 tasks whose handler waits 1.5 s on a slow call (sync or async) are submitted
    ids = api.submit_many([NewTask(kind, n, {"sleep_s": 1.5}) for n in range(40)])
    final = wait_until_resting(server_settings.effective_database_url, ids, timeout=120)
    # Then every one completed, each handler called and finished once, one attempt each
    assert set(final.values()) == {"completed"}, worker.log()[-3000:]
    counter = redis.Redis.from_url(counter_url)
    try:
        for task_id in ids:
            assert int(counter.get(key(f"calls:{task_id}")) or 0) == 1
            assert int(counter.get(key(f"finished:{task_id}")) or 0) == 1
            assert api.get(task_id).attempts == 1
        # and many calls were in flight at once, in the one process (handed over by its
        # hops: sync ones to handler threads, async ones to its event loop)
        assert int(counter.get(key("max_inflight")) or 0) > 10
    finally:
        counter.close()
    assert '"async_executor_started"' in worker.log()
    assert _children(worker.proc.pid) == []
