"""Garbage on every taskrail queue: a real worker keeps going and keeps each as a dead letter.

Each test gets a redis-server of its own (garbage never goes near the shared Redis),
a database of the session's PostgreSQL, and one real ``celery -A workers worker`` on
all three queues. Before the fix, the first of these messages stopped the worker
("Unrecoverable error").
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestration import api
from tests.support import OwnRedis, WorkerFleet, run_cli, wait_until_resting

pytestmark = pytest.mark.integration

QUEUES = ("taskrail.hops", "taskrail.execute", "taskrail.control")
PREFIX = "tdead:"
DEAD_KEY = f"{PREFIX}taskrail.dead"
JSON = "application/json"


def envelope(
    queue: str,
    *,
    task: str = "taskrail.assign",
    body: Any = None,
    raw_body: str | None = None,
    content_type: str | None = JSON,
    headers: dict[str, Any] | None = None,
    **properties: Any,
) -> dict[str, Any]:
    """A kombu envelope as a producer would push it; ``raw_body`` replaces the encoding."""
    task_id = str(uuid.uuid4())
    if raw_body is None:
        payload = json.dumps([[987654321, "personal_tax"], {}, {}] if body is None else body)
        raw_body = base64.b64encode(payload.encode()).decode()
    return {
        "body": raw_body,
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, **(headers or {})},
        "properties": {
            "correlation_id": task_id,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "body_encoding": "base64",
            "delivery_tag": task_id,
            **properties,
        },
    }


class Unpickled:
    """Unpickling this makes a folder: proof that a pickle was decoded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def garbage(queue: str, marker: Path) -> dict[str, bytes]:
    """Every kind of message that is not a valid hop, by name."""
    evil = base64.b64encode(pickle.dumps(Unpickled(marker))).decode()
    yaml_body = base64.b64encode(f"!!python/object/apply:os.mkdir ['{marker}']".encode()).decode()

    def enc(message: dict[str, Any]) -> bytes:
        return json.dumps(message).encode()

    return {
        # first: BRPOP hands it over (the rest of a batch comes with the fetch script)
        "big integers": enc(
            envelope(queue, task="taskrail.no_such_hop", headers={"x": 2**70, "y": "é"})
        ),
        "not json": b"garbage",
        "not utf-8": b"\xff\xfe\x00\x80 garbage \xc3",
        "json list": b"[1, 2, 3]",
        "json object": b'{"a": 1}',
        "json string": b'"taskrail.assign"',
        "no delivery tag": enc({**envelope(queue), "properties": {"body_encoding": "base64"}}),
        "headers a list": enc({**envelope(queue), "headers": ["task", "taskrail.assign"]}),
        "body not base64": enc(envelope(queue, raw_body="!!! not base64 !!!")),
        "body base64 not json": enc(
            envelope(queue, raw_body=base64.b64encode(b"\xff\xfe not json").decode())
        ),
        "body json wrong shape": enc(envelope(queue, body={"args": 5})),
        "body a number": enc(envelope(queue, body=5)),
        "unknown task": enc(envelope(queue, task="taskrail.no_such_hop")),
        "task name not text": enc(envelope(queue, task=["taskrail.assign"])),  # type: ignore[arg-type]
        "malformed hop arguments": enc(
            envelope(queue, task="taskrail.start", body=[["abc"], {}, {}])
        ),
        "unexpected hop argument": enc(
            envelope(queue, task="taskrail.start", body=[[1], {"evil": 1}, {}])
        ),
        "pickle": enc(
            envelope(queue, raw_body=evil, content_type="application/x-python-serialize")
        ),
        "yaml": enc(envelope(queue, raw_body=yaml_body, content_type="application/x-yaml")),
        "no content type": enc(envelope(queue, content_type=None)),
        "compressed": enc(envelope(queue, headers={"compression": "application/x-gzip"})),
        "bad timelimit": enc(envelope(queue, headers={"timelimit": "soon"})),
        "bad eta": enc(envelope(queue, headers={"eta": "yesterday-ish"})),
        "a chain": enc(envelope(queue, body=[[1], {}, {"chain": [{"task": "x"}]}])),
    }


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    yield server
    server.stop()


@pytest.fixture
def garbage_env(server_env: dict[str, str], own_redis: OwnRedis, tmp_path: Path) -> dict[str, str]:
    """The session's PostgreSQL database; broker and breakers on this test's redis-server."""
    return {
        **server_env,
        "TASKRAIL_BROKER_URL": own_redis.url,
        "TASKRAIL_REDIS_URL": own_redis.url.rsplit("/", 1)[0] + "/1",
        "TASKRAIL_BROKER_KEY_PREFIX": PREFIX,
        "TASKRAIL_DATA_DIR": str(tmp_path / "data"),
    }


@pytest.fixture
def garbage_settings(garbage_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from tests.support import settings_from

    with settings_from(garbage_env, monkeypatch) as settings:
        yield settings


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_every_kind_of_garbage_on_every_queue_is_a_dead_letter_and_the_worker_goes_on(
    pool: str,
    garbage_settings: Any,
    garbage_env: dict[str, str],
    own_redis: OwnRedis,
    pg_url: str,
    tmp_path: Path,
) -> None:
    # Given one worker of the pool on all three queues, on a redis-server of the test's own
    fleet = WorkerFleet(env=garbage_env, tmp=tmp_path)
    try:
        worker = fleet.start(pool=pool, concurrency=2, queues=",".join(QUEUES))
        broker = redis.Redis.from_url(own_redis.url)
        marker = tmp_path / "unpickled"
        # When every kind of garbage is pushed onto every queue
        pushed: dict[tuple[str, str], bytes] = {}
        for queue in QUEUES:
            for kind, raw in garbage(queue, marker).items():
                broker.lpush(f"{PREFIX}{queue}", raw)
                pushed[(queue, kind)] = raw
        # and then a normal task is submitted
        task_id = api.submit("personal_tax", 42, {"scenario": "ok"})
        # Then every garbage message is a dead letter, with its queue and a reason
        entries = _wait_for_dead_letters(broker, len(pushed), worker)
        # and the task completes, on a worker that is still alive
        assert wait_until_resting(pg_url, [task_id], timeout=60)[task_id] == "completed"
        assert worker.alive(), worker.log()[-3000:]
        by_raw: dict[tuple[str, str], dict[str, Any]] = {}
        for entry in entries:
            assert entry["reason"], entry
            assert entry["queue"] in QUEUES, entry
            assert entry["worker"]
            assert isinstance(entry["size"], int) and entry["truncated"] is False
            for (queue, kind), raw in pushed.items():
                if queue == entry["queue"] and _holds(entry, raw, kind):
                    by_raw.setdefault((queue, kind), entry)
        missing = sorted(set(pushed) - set(by_raw))
        assert not missing, f"not dead-lettered: {missing}\n{worker.log()[-4000:]}"
        reasons = {kind: by_raw[("taskrail.hops", kind)]["reason"] for _, kind in pushed}
        assert "not JSON" in reasons["not json"]
        assert "delivery tag" in reasons["no delivery tag"]
        assert "base64" in reasons["body not base64"]
        assert "taskrail.no_such_hop" in reasons["unknown task"]
        assert "task_id must be a non-negative integer" in reasons["malformed hop arguments"]
        assert "unexpected arguments" in reasons["unexpected hop argument"]
        assert "x-python-serialize" in reasons["pickle"]
        assert "yaml" in reasons["yaml"]
        # and no pickle was ever decoded
        assert not marker.exists()
        # and nothing is left on the queues or waiting for an acknowledgement
        assert all(broker.llen(f"{PREFIX}{queue}") == 0 for queue in QUEUES)
        assert broker.hlen(f"{PREFIX}unacked") == 0
        # and each garbage message was logged with its queue, reason and an excerpt
        log = worker.log()
        assert log.count('"event": "dead_letter"') >= len(pushed)
        assert "Unrecoverable error" not in log
    finally:
        fleet.stop_all()
    # and `taskrail dead --json` lists them, `taskrail dead purge` empties the list
    listed = run_cli(["dead", "--json"], env=garbage_env)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == len(pushed)
    purged = run_cli(["dead", "purge", "--json"], env=garbage_env)
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"purged": len(pushed)}
    again = run_cli(["dead", "--json"], env=garbage_env)
    assert json.loads(again.stdout) == []
    assert redis.Redis.from_url(own_redis.url).exists(DEAD_KEY) == 0


def _wait_for_dead_letters(broker: redis.Redis, count: int, worker: Any) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + 30
    while broker.llen(DEAD_KEY) < count and time.monotonic() < deadline and worker.alive():
        time.sleep(0.1)
    time.sleep(0.3)  # one too many would show now
    entries = [json.loads(item) for item in broker.lrange(DEAD_KEY, 0, -1)]
    assert len(entries) == count, (
        f"{len(entries)} dead letters, {count} pushed; reasons: "
        f"{sorted(e['reason'] for e in entries)}\n{worker.log()[-4000:]}"
    )
    return entries


def _holds(entry: dict[str, Any], raw: bytes, kind: str) -> bool:
    """Whether ``entry`` keeps message ``raw`` (or, for a hop whose arguments did not
    parse, what Celery decoded of it)."""
    if entry["encoding"] == "base64":
        return base64.b64decode(entry["raw"]) == raw
    kept = entry["raw"]
    if kept == raw.decode("utf-8", "replace"):
        return True
    try:
        decoded = json.loads(raw)
        stored = json.loads(kept)
    except ValueError:
        return False
    if not isinstance(decoded, dict) or not isinstance(stored, dict):
        return False
    if stored.get("properties") is not None:  # the envelope, as the consumer had it
        return stored == decoded
    headers = decoded.get("headers")
    # a hop whose arguments did not parse: its name, id and arguments
    return isinstance(headers, dict) and stored.get("id") == headers.get("id")
