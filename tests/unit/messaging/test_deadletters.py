"""The dead-letter store and the envelope check (orchestration.messaging.deadletters).

The Redis store runs on a redis-server of this module's own; the file store in a
temporary folder.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.transport import virtual

from orchestration import constants as c
from orchestration.errors import BrokerUnavailable, NotAHop
from orchestration.messaging import deadletters, protocol
from orchestration.messaging.deadletters import (
    FileDeadLetters,
    RedisDeadLetters,
    dead_letter,
    decode_envelope,
    excerpt,
    make_entry,
    store_for,
)
from orchestration.settings import Settings
from tests.support import OwnRedis


def good() -> dict[str, Any]:
    return protocol.envelope("taskrail.assign", [1, "personal_tax"], "taskrail.hops")


def with_(message: dict[str, Any], **changes: Any) -> bytes:
    return json.dumps({**message, **changes}).encode()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def props(**changes: Any) -> dict[str, Any]:
    return {**good()["properties"], **changes}


# -- the envelope check ------------------------------------------------------------------------


def test_a_message_built_as_producers_build_them_is_an_envelope() -> None:
    message = good()
    assert decode_envelope(orjson.dumps(message)) == message
    assert decode_envelope(orjson.dumps(message).decode()) == message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"garbage", "not JSON"),
        (b"\xff\xfe garbage", "not UTF-8"),
        (b"", "not JSON"),
        (b"[1, 2]", "JSON list, not a message envelope"),
        (b'"text"', "JSON str, not a message envelope"),
        (b"null", "JSON NoneType, not a message envelope"),
        (b'{"a": 1}', "no properties object"),
        (with_(good(), properties=[1]), "no properties object"),
        (with_(good(), properties=props(delivery_tag=None)), "no delivery tag"),
        (with_(good(), properties=props(delivery_tag=7)), "no delivery tag"),
        (with_(good(), properties=props(delivery_tag="")), "no delivery tag"),
        (with_(good(), properties=props(delivery_info=None)), "no delivery_info object"),
        (with_(good(), properties=props(delivery_info={"exchange": ""})), "routing key"),
        (with_(good(), headers=["task"]), "headers are not an object"),
        (with_(good(), headers={"compression": "zlib"}), "compressed"),
        (with_(good(), **{"content-type": 5}), "content-type is not a string"),
        (with_(good(), **{"content-encoding": []}), "content-encoding is not a string"),
        (with_(good(), body=[1]), "body is not a string"),
        (with_(good(), body="!!! not base64 !!!"), "body is not base64"),
        (with_(good(), body="YWJ"), "body is not base64"),
        (with_(good(), properties=props(body_encoding="rot13")), "unknown body encoding"),
    ],
)
def test_what_is_not_an_envelope_says_why(raw: bytes, reason: str) -> None:
    with pytest.raises(NotAHop) as caught:
        decode_envelope(raw)
    assert reason in caught.value.reason


class _Channel:
    """What kombu's virtual Message needs of a channel to build itself."""

    codecs = {"base64": virtual.Base64()}
    decode_body = virtual.Channel.decode_body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "body": st.text(max_size=20)
        | st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode())
        | json_values,
        "headers": st.dictionaries(st.sampled_from(["task", "id", "compression"]), json_values)
        | json_values,
        "content-type": st.text(max_size=8) | json_values,
        "properties": st.fixed_dictionaries(
            {},
            optional={
                "delivery_tag": st.text(max_size=8) | json_values,
                "body_encoding": st.sampled_from(["base64", "utf-8", "UTF-8"]) | json_values,
                "delivery_info": st.fixed_dictionaries(
                    {}, optional={"exchange": st.text(max_size=3), "routing_key": json_values}
                )
                | json_values,
            },
        )
        | json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100) | json_values.map(dumps) | envelope_like.map(dumps))
def test_any_bytes_are_an_envelope_kombu_can_build_or_not_a_hop(raw: bytes) -> None:
    try:
        payload = decode_envelope(raw)
    except NotAHop as err:
        assert err.reason
        return
    message = virtual.Message(payload, channel=_Channel())
    assert isinstance(message.delivery_tag, str)
    assert {"exchange", "routing_key"} <= message.delivery_info.keys()
    assert isinstance(message.headers, dict)
    assert not message.errors


# -- entries ---------------------------------------------------------------------------------


def test_an_entry_keeps_text_with_its_queue_reason_worker_and_size() -> None:
    entry = make_entry("taskrail.hops", "not JSON", b"garbage", "host:1")
    assert entry["queue"] == "taskrail.hops"
    assert entry["reason"] == "not JSON"
    assert entry["worker"] == "host:1"
    assert entry["raw"] == "garbage"
    assert entry["encoding"] == "text"
    assert (entry["size"], entry["truncated"]) == (7, False)
    assert entry["at"].endswith("+00:00")


def test_bytes_that_are_not_utf8_are_kept_as_base64() -> None:
    entry = make_entry("q", "r", b"\xff\x00\x80")
    assert entry["encoding"] == "base64"
    assert base64.b64decode(entry["raw"]) == b"\xff\x00\x80"
    assert excerpt(entry).startswith("base64:")


def test_a_long_message_is_cut_and_flagged() -> None:
    raw = "é" * c.DEAD_LETTER_MAX_RAW_BYTES  # two bytes each: the cut falls mid-way
    entry = make_entry("q", "r", raw.encode())
    assert entry["truncated"] is True
    assert entry["size"] == 2 * c.DEAD_LETTER_MAX_RAW_BYTES
    assert entry["encoding"] == "text"
    assert len(entry["raw"].encode()) <= c.DEAD_LETTER_MAX_RAW_BYTES
    assert excerpt(entry).endswith("…")
    assert len(excerpt(entry)) == c.DEAD_LETTER_EXCERPT_CHARS + 1


def test_passwords_are_masked_and_control_characters_escaped() -> None:
    entry = make_entry("q", "from redis://u:s3cret@h/0", b"redis://u:s3cret@h/0 \x1b[31mred\n")
    assert "s3cret" not in json.dumps(entry)
    shown = excerpt(entry)
    assert "\x1b" not in shown and "\n" not in shown
    assert "\\x1b[31mred\\n" in shown
    assert "s3cret" not in entry["reason"]


def test_a_reason_is_cut_to_a_sane_length() -> None:
    assert len(make_entry("q", "x" * 10_000, b"")["reason"]) == c.DEAD_LETTER_MAX_REASON_CHARS


# -- the file store ----------------------------------------------------------------------------


def test_file_store_lists_newest_first_keeps_the_newest_and_purges(tmp_path: Path) -> None:
    store = FileDeadLetters(tmp_path / "dead", max_entries=3)
    assert store.list() == [] and store.purge() == 0  # no folder yet
    for i in range(5):
        store.add(make_entry("q", f"r{i}", b"x"))
    assert [e["reason"] for e in store.list()] == ["r4", "r3", "r2"]
    assert [e["reason"] for e in store.list(limit=1)] == ["r4"]
    assert not list((tmp_path / "dead").glob("*.part"))
    assert store.purge() == 3
    assert store.list() == []


def test_file_store_shows_a_file_that_is_not_an_entry(tmp_path: Path) -> None:
    store = FileDeadLetters(tmp_path)
    (tmp_path / "00000000000000000001_x.json").write_bytes(b"\xff not an entry")
    (entry,) = store.list()
    assert entry["reason"] == "not a dead-letter entry"


# -- the Redis store ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    yield server
    server.stop()


@pytest.fixture
def client(own_redis: OwnRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(own_redis.url)
    client.flushdb()  # this module's own server
    yield client
    client.close()


def test_redis_store_is_one_capped_list_newest_first(client: redis.Redis) -> None:
    store = RedisDeadLetters(client, "p:taskrail.dead", max_entries=3)
    for i in range(5):
        store.add(make_entry("q", f"r{i}", b"x"))
    assert client.llen("p:taskrail.dead") == 3
    assert [e["reason"] for e in store.list()] == ["r4", "r3", "r2"]
    assert [e["reason"] for e in store.list(limit=2)] == ["r4", "r3"]
    client.lpush("p:taskrail.dead", b"someone else's bytes")
    assert store.list()[0]["reason"] == "not a dead-letter entry"
    assert store.purge() == 4
    assert client.exists("p:taskrail.dead") == 0
    assert store.purge() == 0


def test_redis_store_that_cannot_be_reached_is_broker_unavailable() -> None:
    from tests.support import free_port

    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    store = RedisDeadLetters(client, "k", where="redis://127.0.0.1")
    with pytest.raises(BrokerUnavailable):
        store.list()
    with pytest.raises(BrokerUnavailable):
        store.purge()
    # and recording a dead letter there logs, never raises
    entry = dead_letter(store, "taskrail.hops", "not JSON", b"garbage")
    assert entry["raw"] == "garbage"


# -- which store -------------------------------------------------------------------------------


def test_store_for_each_kind_of_broker(tmp_path: Path) -> None:
    embedded = store_for(Settings(data_dir=tmp_path, broker_url=None))
    assert isinstance(embedded, FileDeadLetters)
    assert embedded.folder == tmp_path / "broker" / c.DEAD_LETTER_FOLDER
    on_redis = store_for(
        Settings(data_dir=tmp_path, broker_url="redis://:pw@127.0.0.1:1/3", broker_key_prefix="p:")
    )
    assert isinstance(on_redis, RedisDeadLetters)
    assert on_redis.key == "p:" + c.DEAD_LETTER_KEY
    assert "pw" not in on_redis.where
    deadletters.close_store(on_redis)
    elsewhere = store_for(Settings(data_dir=tmp_path, broker_url="amqp://guest:guest@h//"))
    assert isinstance(elsewhere, FileDeadLetters)
    assert elsewhere.folder == tmp_path / c.DEAD_LETTER_FOLDER


# -- the embedded broker -----------------------------------------------------------------------


def test_a_queue_file_that_is_not_an_envelope_is_a_dead_letter_on_the_embedded_broker(
    tmp_path: Path,
) -> None:
    from kombu import Connection, Consumer, Exchange, Queue

    from orchestration.messaging import localbroker

    # Given the embedded broker's folders with a garbage file first in line, then a hop
    # (written as the broker writes them: kombu's in-process binding state is shared by
    # every connection of a transport, so a test does not publish through a new folder)
    folder = tmp_path / "broker"
    for sub in ("queue", "control"):
        (folder / sub).mkdir(parents=True)
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.01,
    }
    queue = Queue("taskrail.hops", Exchange("taskrail.hops", type="direct"), "taskrail.hops")
    (folder / "queue" / f"{0:020d}_x.taskrail.hops.msg").write_bytes(b"garbage")
    (folder / "queue" / f"{1:020d}_y.taskrail.hops.msg").write_bytes(orjson.dumps(good()))
    got: list[Any] = []
    # When a consumer reads the queue
    with (
        Connection(f"{localbroker.SCHEME}://localhost/", transport_options=options) as conn,
        Consumer(conn, [queue], callbacks=[lambda body, m: (got.append(body), m.ack())]),
    ):
        conn.drain_events(timeout=5)
    # Then the hop is delivered and the garbage kept beside the queue folder
    assert [body[0] for body in got] == [[1, "personal_tax"]]
    (entry,) = FileDeadLetters(folder / c.DEAD_LETTER_FOLDER).list()
    assert (entry["queue"], entry["raw"], entry["reason"]) == (
        "taskrail.hops",
        "garbage",
        "not JSON",
    )
    assert not list((folder / "queue").glob("*.msg*"))
