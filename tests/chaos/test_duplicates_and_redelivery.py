"""Every hop message sent twice, and unacked messages redelivered after a short visibility
timeout while their handlers still run."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import pytest
import redis
from celery import Celery

from orchestration.messaging.dispatch import Dispatcher, make_celery
from orchestration.settings import Settings
from tests.agents import key
from tests.chaos import Workload, count_lines, report_numbers, start_workers
from tests.support import OwnPostgres, WorkerFleet, drain, verify_every_task

pytestmark = pytest.mark.chaos

VISIBILITY_TIMEOUT_S = 3
SLOW_S = 4.5  # longer than the visibility timeout


def _args(message: dict[str, Any]) -> list[Any]:
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return list(json.loads(body)[0])


class Redeliverer(threading.Thread):
    """Plays kombu's restore sweep every second: unacked messages older than the visibility
    timeout go back on their queue, exactly as ``QoS.restore_visible`` does.

    kombu 5.7 workers run that sweep when they start and then only every
    ``unacked_restore_interval * unacked_restore_throttle`` (10 x 10) seconds, too rarely
    for a test of a few seconds; the redelivery itself is the same.
    """

    def __init__(self, app: Celery, counter: redis.Redis) -> None:
        super().__init__(name="redeliverer", daemon=True)
        self.app, self.counter = app, counter
        self.redelivered: list[tuple[str, list[Any]]] = []
        self.mid_handler: set[int] = set()  # tasks whose execute came back while it ran
        self.errors: list[str] = []  # what went wrong in a sweep (the next sweep goes on)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                with self.app.connection_for_write() as conn:
                    while not self.stopped.wait(1.0):
                        self._sweep(conn.default_channel)
            except Exception as exc:  # a test helper that must outlive a blip
                self.errors.append(repr(exc))

    def _sweep(self, channel: Any) -> None:
        client, qos = channel.client, channel.qos
        ceil = time.time() - VISIBILITY_TIMEOUT_S
        for tag in client.zrangebyscore(qos.unacked_index_key, 0, ceil):
            raw = client.hget(qos.unacked_key, tag)
            if raw is None:
                continue  # acked meanwhile
            message = json.loads(raw)[0]
            name, args = message["headers"]["task"], _args(message)
            if name == "taskrail.execute":
                calls, runs = self.counter.mget(key(f"calls:{args[0]}"), key(f"runs:{args[0]}"))
                if calls and runs is None:
                    self.mid_handler.add(args[0])
            qos.restore_by_tag(tag, client)
            self.redelivered.append((name, args))


def test_every_hop_twice_and_redelivery_while_handlers_run(
    chaos_settings: Settings, chaos_env: dict[str, str], own_pg: OwnPostgres,
    counter: redis.Redis, chaos_fleet: WorkerFleet, chaos_report, monkeypatch,
) -> None:  # fmt: skip
    # Given two workers and beat that publish every hop message a second time, and a
    # visibility timeout of 3 s (a message unacked that long goes back to the queue)
    tuned = {
        "TASKRAIL_AGENTS": chaos_env["TASKRAIL_AGENTS"] + ",tests.duplicate_hops",
        "TASKRAIL_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
    }
    start_workers(chaos_fleet, 2, extra_env=tuned)
    chaos_fleet.start_beat(extra_env=tuned)
    monkeypatch.setenv("TASKRAIL_VISIBILITY_TIMEOUT_S", str(VISIBILITY_TIMEOUT_S))
    app = make_celery(Settings())
    redeliverer = Redeliverer(app, counter)
    redeliverer.start()
    # When 1,000 tasks are submitted, their first hop sent twice, one in 50 with a
    # handler that runs longer than the visibility timeout
    work = Workload.mixed(1000, slow_every=50, slow_s=SLOW_S)
    work.submit()
    Dispatcher(app).send_many(
        "taskrail.assign",
        [[i, item.task_type] for i, item in zip(work.ids, work.items, strict=True)],
    )
    started = time.monotonic()
    # Then no task has an extra event, each handler ran once, and the results are theirs
    try:
        done = drain(own_pg.url, work.ids, timeout=180, logs=chaos_fleet.logs)
        # and, the queue empty, a few more slow tasks whose execute messages are fetched
        # at once (not restored while waiting in a prefetch buffer, as in the flood): each
        # stays unacknowledged past the visibility timeout while its handler runs
        tail = Workload.mixed(4, demo_every=0, slow_every=1, slow_s=SLOW_S)
        tail.submit()
        drain(own_pg.url, tail.ids, timeout=60, logs=chaos_fleet.logs)
        time.sleep(2.0)  # the last duplicates and redeliveries arrive: they change nothing
    finally:
        redeliverer.stopped.set()
        redeliverer.join(10)
    verdict = verify_every_task(
        own_pg.url, work.expected_by_id, counter, work.counted_ids, exactly_once=True
    )
    tail_verdict = verify_every_task(
        own_pg.url, tail.expected_by_id, counter, tail.counted_ids, exactly_once=True
    )
    assert tail_verdict.lost == 0
    skipped = count_lines(chaos_fleet, '"hop_skipped"')
    chaos_report(
        faults=(
            f"every hop published twice; {len(redeliverer.redelivered)} messages redelivered "
            f"after the {VISIBILITY_TIMEOUT_S}s visibility timeout, "
            f"{len(redeliverer.mid_handler)} of them while their handler ran"
        ),
        run_s=round(done - started, 1), hops_skipped=skipped, **report_numbers(verdict),
    )  # fmt: skip
    assert skipped > len(work.ids), "the duplicates never arrived"
    assert redeliverer.mid_handler, (
        f"no execute message came back while its handler ran "
        f"({len(redeliverer.redelivered)} redelivered; sweep errors: {redeliverer.errors[:3]})"
    )
