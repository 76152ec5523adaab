"""taskrail's Redis transport against the real Redis: batched fetch, restored messages,
held acknowledgements and pushes, and wire compatibility with kombu's own transport."""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from orchestration.messaging import protocol, redisbroker, redisfetch
from tests.support import purge

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(broker_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the test session's broker database."""
    own = f"tbroker{uuid.uuid4().hex[:8]}:"
    yield own
    purge(broker_url, own)


def ours(url: str, prefix: str) -> Connection:
    return Connection(
        url, transport=redisbroker.TRANSPORT, transport_options={"global_keyprefix": prefix}
    )


def stock(url: str, prefix: str) -> Connection:
    return Connection(url, transport_options={"global_keyprefix": prefix})


def queue(name: str = "q") -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def publish(conn: Connection, count: int, name: str = "q") -> None:
    producer = Producer(conn.default_channel)
    for i in range(count):
        producer.publish(
            {"n": i},
            exchange=queue(name).exchange,
            routing_key=name,
            declare=[queue(name)],
            serializer="json",
        )


def consume(conn: Connection, *, prefetch: int, ack: bool, name: str = "q") -> list[Any]:
    """Messages delivered by one read of the broker (one BRPOP and what it brings)."""
    got: list[Any] = []
    channel = conn.channel()
    channel.basic_qos(prefetch_count=prefetch)
    consumer = Consumer(channel, [queue(name)], callbacks=[lambda body, m: got.append(m)])
    consumer.consume()
    conn.drain_events(timeout=2)
    if ack:  # done with this channel: close it, so a later read does not go to it
        for message in got:
            message.ack()
        consumer.cancel()
        channel.close()
    return got


def commands(client: redis.Redis, *names: str) -> dict[str, int]:
    stats = client.info("commandstats")
    return {n: int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in names}


def test_one_read_fetches_the_prefetch_window_recorded_as_kombu_does(
    broker_url: str, prefix: str
) -> None:
    # Given 5 messages published by kombu's own Redis transport
    with stock(broker_url, prefix) as conn:
        publish(conn, 5)
    client = redis.Redis.from_url(broker_url)
    client.script_load(redisfetch.FETCH_LUA)  # a fresh server answers NOSCRIPT once
    before = commands(client, "brpop", "evalsha")
    # When taskrail's transport reads once with a window of 5 and acknowledges nothing
    with ours(broker_url, prefix) as conn:
        got = consume(conn, prefetch=5, ack=False)
        after = commands(client, "brpop", "evalsha")
        unacked = client.hgetall(f"{prefix}unacked")
        # Then all 5 came in one BRPOP and one script call, in order, each recorded in
        # kombu's unacked format before it was delivered
        assert [m.payload for m in got] == [{"n": i} for i in range(5)]
        assert after["brpop"] - before["brpop"] <= 2  # this read (+ one possibly in flight)
        assert after["evalsha"] - before["evalsha"] == 1
        assert len(unacked) == 5
        for message in got:
            raw, exchange, routing_key = json.loads(unacked[message.delivery_tag.encode()])
            assert raw["properties"]["delivery_tag"] == message.delivery_tag
            assert (exchange, routing_key) == ("q", "q")
        assert client.zcard(f"{prefix}unacked_index") == 5
    # And closing without acks gives them back: kombu's own transport gets all 5
    with stock(broker_url, prefix) as conn:
        again = consume(conn, prefetch=10, ack=True)
        while len(again) < 5:
            again += consume(conn, prefetch=10, ack=True)
    assert sorted(m.payload["n"] for m in again) == [0, 1, 2, 3, 4]
    assert client.hlen(f"{prefix}unacked") == 0


def test_messages_from_taskrail_reach_kombus_own_transport(broker_url: str, prefix: str) -> None:
    with ours(broker_url, prefix) as conn:
        publish(conn, 3)
        channel = conn.default_channel
        channel.push([("q", protocol.envelope("taskrail.start", [7], "q"))])
    with stock(broker_url, prefix) as conn:
        got = []
        while len(got) < 4:
            got += consume(conn, prefetch=10, ack=True)
    bodies = [m.payload for m in got]
    assert bodies[:3] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert got[3].headers["task"] == "taskrail.start"
    assert json.loads(got[3].body)[0] == [7]


def test_a_message_given_back_unrun_is_delivered_again(broker_url: str, prefix: str) -> None:
    # Given a message fetched and never acknowledged
    with ours(broker_url, prefix) as conn:
        conn.default_channel.push([("q", protocol.envelope("taskrail.execute", [1, 0, "a"], "q"))])
        assert len(consume(conn, prefetch=1, ack=False)) == 1
    # When its consumer went away (the message was restored), then another gets it
    with ours(broker_url, prefix) as conn:
        again = consume(conn, prefetch=1, ack=True)
    assert len(again) == 1
    assert again[0].headers["task"] == "taskrail.execute"


def test_an_unreadable_message_in_a_batch_is_dropped_and_the_rest_delivered(
    broker_url: str, prefix: str
) -> None:
    client = redis.Redis.from_url(broker_url)
    with ours(broker_url, prefix) as conn:
        publish(conn, 1)
        client.lpush(f"{prefix}q", b"\x80 not json")
        publish(conn, 1)
        got = consume(conn, prefetch=5, ack=True)
    assert len(got) == 2
    assert client.llen(f"{prefix}q") == 0


def test_acks_in_an_event_loop_wait_for_the_loops_turn(broker_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(broker_url)
    with ours(broker_url, prefix) as conn:
        publish(conn, 3)
        got = consume(conn, prefetch=3, ack=False)
        transport = conn.transport
        # Outside an event loop an ack is sent at once
        got[0].ack()
        assert client.hlen(f"{prefix}unacked") == 2
        # In one, acks wait for the loop's next turn, then go together
        transport.in_event_loop = True
        got[1].ack()
        got[2].ack()
        assert client.hlen(f"{prefix}unacked") == 2
        assert conn.default_channel.qos.can_consume()  # the prefetch window opened at once
        transport.flush_acks()
        assert client.hlen(f"{prefix}unacked") == 0
        assert client.zcard(f"{prefix}unacked_index") == 0


def test_pushes_on_the_loop_thread_wait_for_its_turn_others_go_at_once(
    broker_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(broker_url)
    monkeypatch.setattr(redisbroker, "_loop_owner", (os.getpid(), threading.get_ident()))
    with ours(broker_url, prefix) as conn:
        channel = conn.default_channel
        channel.push([("q", protocol.envelope("taskrail.start", [1], "q"))])
        channel.push([("q", protocol.envelope("taskrail.start", [2], "q"))])
        assert client.llen(f"{prefix}q") == 0
        other = threading.Thread(
            target=channel.push, args=([("q", protocol.envelope("taskrail.start", [3], "q"))],)
        )
        other.start()
        other.join()
        assert client.llen(f"{prefix}q") == 1
        redisbroker.flush_deferred_pushes()
        assert client.llen(f"{prefix}q") == 3
    sent = [hop_args(m) for m in client.lrange(f"{prefix}q", 0, -1)]
    assert sorted(sent) == [[1], [2], [3]]


def hop_args(raw: bytes) -> list[Any]:
    args: list[Any] = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
    return args


def test_many_threads_publishing_at_once_wait_for_a_connection(
    broker_url: str, prefix: str
) -> None:
    # Given more publishing threads than the channel's pool has connections (a threads pool)
    client = redis.Redis.from_url(broker_url)
    errors: list[BaseException] = []
    with ours(broker_url, prefix) as conn:
        channel = conn.default_channel
        assert channel.pool.max_connections < 100

        def publish_some(k: int) -> None:
            try:
                for i in range(20):
                    channel.push([("q", protocol.envelope("taskrail.start", [k * 100 + i], "q"))])
            except BaseException as err:  # "Too many connections" from a non-blocking pool
                errors.append(err)

        threads = [threading.Thread(target=publish_some, args=(k,)) for k in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # Then every message went out: none failed for want of a connection
    assert errors == []
    sent = sorted(hop_args(m)[0] for m in client.lrange(f"{prefix}q", 0, -1))
    assert sent == sorted(k * 100 + i for k in range(100) for i in range(20))


def test_a_batch_of_encoded_envelopes_reaches_kombus_own_transport(
    broker_url: str, prefix: str
) -> None:
    encoded = protocol.encoded_envelopes(
        "taskrail.start", [[1], [2], [3]], "q", lineage=(None, None)
    )
    with ours(broker_url, prefix) as conn:
        conn.default_channel.push([("q", message) for message in encoded])
    with stock(broker_url, prefix) as conn:
        got = []
        while len(got) < 3:
            got += consume(conn, prefetch=10, ack=True)
    assert [m.headers["task"] for m in got] == ["taskrail.start"] * 3
    assert [json.loads(m.body)[0] for m in got] == [[1], [2], [3]]  # in order
