"""Arbitrary bytes, arbitrary JSON and envelope-shaped JSON with random fields and bodies,
thrown at real workers on a redis-server of the test's own: the workers never stop, every
message leaves its queue, and a normal task pushed after each batch still completes.

The workers are the Procfile's pair: a ``solo`` worker on ``taskrail.hops`` and
``taskrail.control``, a ``threads`` executor on ``taskrail.execute``, started once for
the whole hypothesis run.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orchestration import api
from orchestration.messaging import protocol
from tests.support import REPO, OwnRedis, WorkerFleet, settings_from, wait_until_resting

pytestmark = pytest.mark.integration

QUEUES = ("taskrail.hops", "taskrail.execute", "taskrail.control")
PREFIX = "tprop:"
JSON = "application/json"
HOPS = ("taskrail.assign", "taskrail.start", "taskrail.execute", "taskrail.sweep")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
task_bodies = st.tuples(
    st.lists(json_values, max_size=4),
    st.dictionaries(st.sampled_from(["task_id", "task_type", "agent", "evil"]), json_values),
    st.none() | st.dictionaries(st.sampled_from(["callbacks", "chain", "x"]), json_values),
).map(lambda parts: b64(dumps(list(parts))))
bodies = st.one_of(
    task_bodies,
    st.binary(max_size=64).map(b64),
    json_values.map(lambda value: b64(dumps(value))),
    st.text(max_size=40),  # not base64, mostly
    json_values,  # not even a string
)
header_values = {
    "eta": json_values,
    "expires": json_values,
    "timelimit": json_values,
    "retries": json_values,
    "shadow": json_values,
    "root_id": json_values,
    "parent_id": json_values,
    "argsrepr": json_values,
    "ignore_result": json_values,
    "stamped_headers": json_values,
    "stamps": json_values,
    "compression": st.sampled_from(["zlib", "application/x-gzip", "nope"]) | json_values,
}
headers = st.one_of(
    st.fixed_dictionaries(
        {
            "task": st.sampled_from(HOPS) | st.text(max_size=20) | json_values,
            "id": st.uuids().map(str) | json_values,
        },
        optional=header_values,
    ),
    json_values,
)
properties = st.one_of(
    st.fixed_dictionaries(
        {
            "delivery_tag": st.uuids().map(str) | json_values,
            "delivery_info": st.fixed_dictionaries(
                {"exchange": st.just(""), "routing_key": st.sampled_from(QUEUES)}
            )
            | json_values,
        },
        optional={
            "body_encoding": st.sampled_from(["base64", "utf-8", "rot13"]) | json_values,
            "priority": json_values,
        },
    ),
    json_values,
)
envelopes = st.fixed_dictionaries(
    {"body": bodies, "headers": headers, "properties": properties},
    optional={
        "content-type": st.sampled_from(
            [JSON, JSON, "application/x-python-serialize", "application/x-yaml", "text/plain"]
        )
        | json_values,
        "content-encoding": st.sampled_from(["utf-8", "binary"]) | json_values,
    },
)
# Where a field of a valid hop message is overwritten (a parent that is no longer an
# object is left alone).
FIELDS = (
    ("body",),
    ("content-type",),
    ("content-encoding",),
    ("headers",),
    *(
        ("headers", name)
        for name in (
            "task", "id", "eta", "expires", "timelimit", "retries", "shadow", "root_id",
            "parent_id", "group", "argsrepr", "kwargsrepr", "origin", "ignore_result",
            "stamped_headers", "stamps", "compression", "lang",
        )
    ),
    ("properties",),
    ("properties", "delivery_tag"),
    ("properties", "body_encoding"),
    ("properties", "delivery_info"),
    ("properties", "delivery_info", "routing_key"),
    ("properties", "delivery_info", "exchange"),
    ("properties", "priority"),
    ("properties", "correlation_id"),
)  # fmt: skip
odd_values = json_values | st.sampled_from(
    ["application/x-python-serialize", "application/x-yaml", "text/plain", "", "zlib", "binary"]
)


@st.composite
def hop_messages(draw: st.DrawFn) -> bytes:
    """A hop message as producers build it, with none to three of its fields overwritten."""
    queue = draw(st.sampled_from(QUEUES))
    name = draw(st.sampled_from(HOPS) | st.text(max_size=20))
    message = protocol.envelope(name, [], queue)
    args = draw(st.lists(json_values, max_size=4))
    kwargs = draw(
        st.dictionaries(st.sampled_from(["task_id", "task_type", "agent", "x"]), json_values)
    )
    embed = draw(
        st.none() | st.dictionaries(st.sampled_from(["callbacks", "chain", "x"]), st.none())
    )
    message["body"] = b64(dumps([args, kwargs, embed]))
    for path, value in draw(st.lists(st.tuples(st.sampled_from(FIELDS), odd_values), max_size=3)):
        parent: Any = message
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent[path[-1]] = value
    return dumps(message)


messages = st.one_of(
    st.binary(max_size=200),
    json_values.map(dumps),
    envelopes.map(dumps),
    hop_messages(),
    hop_messages(),
)


@dataclass
class Run:
    broker: redis.Redis
    fleet: WorkerFleet
    pg_url: str

    def check_alive(self) -> None:
        for worker in self.fleet.workers:
            assert worker.alive(), f"{worker.name} stopped:\n{worker.log()[-4000:]}"


@pytest.fixture(scope="module")
def run(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A redis-server of the module's own, the Procfile's solo worker and threads executor."""
    server = OwnRedis().start()
    tmp = tmp_path_factory.mktemp("dead_letters_property")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(
        TASKRAIL_DATABASE_URL=pg_url,
        TASKRAIL_BROKER_URL=server.url,
        TASKRAIL_REDIS_URL=server.url.rsplit("/", 1)[0] + "/1",
        TASKRAIL_BROKER_KEY_PREFIX=PREFIX,
        TASKRAIL_AGENTS="demo_agents",
        TASKRAIL_LOG_FORMAT="json",
        TASKRAIL_DATA_DIR=str(tmp / "data"),
        PYTHONPATH=str(REPO),
    )
    fleet = WorkerFleet(env=env, tmp=tmp)
    with pytest.MonkeyPatch.context() as monkeypatch, settings_from(env, monkeypatch):
        try:
            fleet.start(pool="solo", concurrency=1, queues="taskrail.hops,taskrail.control")
            fleet.start(pool="threads", concurrency=8, queues="taskrail.execute")
            yield Run(redis.Redis.from_url(server.url), fleet, pg_url)
        finally:
            fleet.stop_all()
            server.stop()


def _wait_for_empty_queues(run: Run, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(run.broker.llen(f"{PREFIX}{queue}") for queue in QUEUES):
        run.check_alive()
        assert time.monotonic() < deadline, "messages left on the queues"
        time.sleep(0.05)


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    # No shrinking: the workers are shared by every example, and once one has stopped
    # every later example fails too. The first failing batch is the one reported.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(st.tuples(st.sampled_from(QUEUES), messages), min_size=5, max_size=20))
def test_no_message_stops_a_worker(run: Run, batch: list[tuple[str, bytes]]) -> None:
    # Given the workers, alive, when a batch of arbitrary messages lands on the queues
    run.check_alive()
    with run.broker.pipeline(transaction=False) as pipe:
        for queue, raw in batch:
            pipe.lpush(f"{PREFIX}{queue}", raw)
        pipe.execute()
    # Then every one of them is taken off its queue, and the workers are alive
    _wait_for_empty_queues(run)
    run.check_alive()
    # and a normal task sent afterwards completes
    task_id = api.submit("personal_tax", 7, {"scenario": "ok"})
    assert wait_until_resting(run.pg_url, [task_id], timeout=30)[task_id] == "completed"
    run.check_alive()


def test_the_run_left_no_unrecoverable_error_and_kept_dead_letters(run: Run) -> None:
    # (after the property above, in file order)
    logs = run.fleet.logs()
    assert "Unrecoverable error" not in logs
    assert "Connection to broker lost" not in logs
    assert run.broker.llen(f"{PREFIX}taskrail.dead") > 0
