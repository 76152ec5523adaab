"""orchestration.messaging.codec decodes exactly as kombu's JSON does, and encodes events that
kombu decodes back to what was sent."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid

import pytest
from kombu import serialization
from kombu.utils import json as kombu_json

from orchestration.messaging import codec

TEXTS = [
    '{"task": "taskrail.assign", "id": "abc", "args": [1, "personal_tax"]}',
    '[[5, 0, "personal_tax_agent", {"token": "w/1", "until": 1.5, "payload": {"a": [1, 2.5, null, true]}}], {}, {"callbacks": null}]',  # noqa: E501
    '{"text": "Gr\\u00fc\\u00dfe", "raw": "Grüße"}',  # escapes: kombu's path
    '{"when": {"__type__": "datetime", "__value__": "2026-12-02T10:00:00+00:00"}}',
    '{"n": NaN, "big": 123456789012345678901234567890}',  # orjson refuses: kombu's path
    '{"a": 1, "a": 2}',
    '{"deep": [[[[[[[[[[{"x": -0.0}]]]]]]]]]]}',
    '"just a string"',
    "12",
    '{"e": 1e400}',
]


@pytest.mark.parametrize("text", TEXTS)
def test_loads_gives_what_kombu_gives(text):
    expected = kombu_json.loads(text)
    for form in (text, text.encode(), bytearray(text.encode()), memoryview(text.encode())):
        got = codec.loads(form)
        assert got == expected or (got != got and expected != expected)
        assert type(got) is type(expected)


def test_typed_values_are_decoded_as_kombu_decodes_them():
    when = dt.datetime(2026, 12, 2, 10, 0, tzinfo=dt.UTC)
    text = kombu_json.dumps({"when": when, "id": uuid.UUID(int=5), "d": decimal.Decimal("1.5")})
    assert codec.loads(text) == {"when": when, "id": uuid.UUID(int=5), "d": decimal.Decimal("1.5")}


@pytest.mark.parametrize("text", ["{not json", '{"a": 1', "", b"\xff\xfe", '{"a": 1} trailing'])
def test_what_is_not_json_raises_as_kombu_raises(text):
    with pytest.raises((ValueError, UnicodeDecodeError)) as theirs:
        kombu_json.loads(text)
    with pytest.raises(type(theirs.value)):
        codec.loads(text)


class Colour(enum.StrEnum):
    RED = "red"


EVENTS = [
    [
        {
            "type": "task-succeeded",
            "uuid": "9d36ae32-98b0-4d5e-8c08-70befb1ac7da",
            "hostname": "executor@vm",
            "timestamp": 1764700000.123,
            "runtime": 0.2012,
            "pid": 1234,
            "parent_id": None,
            "args": "(5, 0, 'agent')",
        }
    ],
    {"when": dt.datetime(2026, 12, 2, tzinfo=dt.UTC), "colour": Colour.RED},  # kombu's path
    {1: "int key"},  # kombu's path: orjson refuses non-str keys
    {"big": 2**70, "text": "Grüße"},
]


@pytest.mark.parametrize("value", EVENTS)
def test_dumps_round_trips_through_kombu(value):
    assert kombu_json.loads(codec.dumps(value)) == kombu_json.loads(kombu_json.dumps(value))


def test_dumps_hands_what_orjson_would_write_differently_to_kombu():
    when = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    assert codec.dumps({"when": when}) == kombu_json.dumps({"when": when})
    assert json.loads(codec.dumps({"c": Colour.RED})) == {"c": "red"}


def test_install_swaps_the_decoder_and_keeps_kombus_encoder():
    codec.install()
    codec.install()  # idempotent
    registry = serialization.registry
    value = {"args": [1, "x"], "when": dt.datetime(2026, 12, 2, tzinfo=dt.UTC)}
    content_type, encoding, data = serialization.dumps(value, serializer="json")
    assert (content_type, encoding, data) == ("application/json", "utf-8", kombu_json.dumps(value))
    assert registry._decoders["application/json"] is codec.loads
    assert registry.type_to_name["application/json"] == "json"
    assert (
        serialization.loads(
            data, content_type, encoding, accept=serialization.prepare_accept_content(["json"])
        )
        == value
    )
    # Task events go out as application/json, which consumers accepting "json" take.
    content_type, _, data = serialization.dumps({"type": "task-sent"}, codec.EVENTS_SERIALIZER)
    assert content_type == "application/json"
    assert serialization.loads(
        data, content_type, "utf-8", accept=serialization.prepare_accept_content(["json"])
    ) == {"type": "task-sent"}


def test_the_app_sends_events_with_the_events_serializer(tmp_path):
    from orchestration.messaging.dispatch import make_celery
    from orchestration.settings import Settings

    app = make_celery(Settings(data_dir=tmp_path))
    assert app.conf.event_serializer == codec.EVENTS_SERIALIZER
    assert app.conf.task_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
