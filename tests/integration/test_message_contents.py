"""Hop messages carry ids, never client data (what Flower and the broker show)."""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis

from orchestration import api
from tests.support import KEY_PREFIX, WorkerFleet

pytestmark = pytest.mark.integration

SECRET = "hunter2-bank-password"


def test_execute_messages_carry_ids_and_a_lease_token_only(
    server_settings, broker_url: str, fleet: WorkerFleet
) -> None:
    # Given a hop worker and no executor, so the execute messages stay on their queue
    fleet.start(pool="solo", concurrency=1, queues="taskrail.hops,taskrail.control")
    # When tasks with a secret in their payload are assigned and started
    ids = [api.submit("echo", i, {"bank_password": SECRET, "note": "x" * 100}) for i in range(3)]
    client = redis.Redis.from_url(broker_url)
    queue = f"{KEY_PREFIX}taskrail.execute"
    deadline = time.monotonic() + 30
    while client.llen(queue) < len(ids):
        assert time.monotonic() < deadline, "the execute messages never arrived"
        time.sleep(0.1)
    # Then no message holds the payload: its arguments are the task id, the attempts
    # done, the agent and the pre-claim's token
    for raw in client.lrange(queue, 0, -1):
        assert SECRET.encode() not in raw
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert SECRET not in json.dumps(envelope["headers"])
        assert kwargs == {}
        task_id, attempts, agent, token = args
        assert task_id in ids and attempts == 0 and agent == "echo_agent"
        assert token.startswith("q:")
