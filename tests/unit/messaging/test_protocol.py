"""orchestration.messaging.protocol: a batch's pre-encoded envelopes are the envelopes
:func:`protocol.envelope` builds, and kombu's own transport reads them."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

import orjson
import pytest

from orchestration.messaging import protocol

ARGS = [
    [1, "personal_tax"],
    (2, "payroll"),  # a tuple is sent as a list, as envelope() does
    [3, 'quote " brace { } backslash \\ and ünïcode'],
    [4, "x" * 2000],  # a repr longer than Celery's argsrepr limit
]


def _same_ids(reference: dict, task_id: str, root_id: str) -> dict:
    reference["headers"]["id"] = task_id
    reference["headers"]["root_id"] = root_id
    reference["properties"]["correlation_id"] = task_id
    reference["properties"]["delivery_tag"] = task_id
    return reference


@pytest.mark.parametrize("lineage", [(None, None), ("root-1", "parent-2")])
def test_encoded_envelopes_decode_to_what_envelope_builds(lineage) -> None:
    encoded = protocol.encoded_envelopes("taskrail.assign", ARGS, "taskrail.hops", lineage=lineage)
    assert len(encoded) == len(ARGS)
    ids = set()
    for args, raw in zip(ARGS, encoded, strict=True):
        message = orjson.loads(raw)
        task_id = message["headers"]["id"]
        ids.add(task_id)
        expected = protocol.envelope("taskrail.assign", args, "taskrail.hops", lineage=lineage)
        assert message == _same_ids(expected, task_id, lineage[0] or task_id)
        body = json.loads(base64.b64decode(message["body"]))
        assert body == [list(args), {}, protocol._EMBED]
    assert len(ids) == len(ARGS)  # every message its own id


def test_encoded_envelopes_reject_what_json_cannot_encode() -> None:
    with pytest.raises(TypeError):
        protocol.encoded_envelopes("taskrail.assign", [[object()]], "q", lineage=(None, None))


def test_uuid4_strings_are_random_version_4_uuids() -> None:
    values = protocol.uuid4_strings(2000)
    assert len(set(values)) == 2000
    for value in values:
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value
    assert protocol.uuid4_strings(0) == []


# -- the same message as Celery's own send_task -----------------------------------------

# Fields Celery fills with values of its own that say nothing of the task: ``reply_to``
# (the sending app's thread oid; taskrail sends "" as the hops keep no results) and
# kombu's ``delivery_tag`` (a fresh uuid4 per publish; taskrail uses the task id, as
# unique). The body is compared decoded (Celery's JSON has spaces after separators).
CELERY_OWN = {("properties", "reply_to"), ("properties", "delivery_tag")}


def _celery_envelope(name: str, args: list, queue: str, **options) -> dict:
    """What ``Celery.send_task`` puts on ``queue`` (kombu's in-memory transport)."""
    from celery import Celery

    app = Celery("protocol-probe", broker="memory://", set_as_current=False)
    app.conf.task_serializer = "json"
    try:
        app.send_task(name, args=args, queue=queue, ignore_result=True, **options)
        with app.connection_for_write() as conn:
            return conn.default_channel._get(queue)
    finally:
        app.close()


def _comparable(message: dict) -> dict:
    message = json.loads(json.dumps(message))
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for section, key in CELERY_OWN:
        message[section].pop(key)
    return message


def _assert_same_message(ours: dict, celery: dict) -> None:
    ours, celery = _comparable(ours), _comparable(celery)
    # Known differences, in a display-only field (what logs and Flower show of the
    # arguments): taskrail's argsrepr is Python's repr, cut at ARGSREPR_MAX with "...";
    # Celery's saferepr writes a backslash inside a string unescaped and cuts inside
    # the long string, closing its quotes and brackets. Short arguments without a
    # backslash read the same.
    ours_repr, celery_repr = ours["headers"]["argsrepr"], celery["headers"]["argsrepr"]
    if ours_repr != celery_repr:
        unescaped = ours_repr.replace("\\\\", "\\")
        assert "\\" in ours_repr or len(ours_repr) == protocol.ARGSREPR_MAX, ours_repr
        shown = min(len(unescaped), len(celery_repr)) - 3
        assert unescaped[:shown] == celery_repr[:shown]
        ours["headers"]["argsrepr"] = celery_repr
    assert set(ours) == set(celery)
    for section in ("headers", "properties"):
        assert set(ours[section]) == set(celery[section]), section
        for key in celery[section]:
            assert ours[section][key] == celery[section][key], f"{section}.{key}"
    assert ours == celery


CASES = {
    "plain": ({}, {}),
    "time limits": (
        {"time_limit": 30.0, "soft_time_limit": 20.0},
        {"time_limit": 30.0, "soft_time_limit": 20.0},
    ),
    "lineage": (
        {"lineage": ("root-1", "parent-2")},
        {"root_id": "root-1", "parent_id": "parent-2"},
    ),
    "headers": ({"headers": {"agent": "a"}}, {"headers": {"agent": "a"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_envelope_is_the_message_celery_send_task_builds(case: str) -> None:
    ours_options, celery_options = CASES[case]
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    args = [7, "payroll", {"nested": [1, 2]}]
    ours_options.setdefault("lineage", (None, None))
    ours = protocol.envelope("taskrail.assign", args, queue, **ours_options)
    task_id = ours["headers"]["id"]
    celery = _celery_envelope("taskrail.assign", args, queue, task_id=task_id, **celery_options)
    _assert_same_message(ours, celery)


def test_envelope_with_a_countdown_has_celerys_eta() -> None:
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    ours = protocol.envelope("taskrail.execute", [1], queue, countdown=60, lineage=(None, None))
    celery = _celery_envelope(
        "taskrail.execute", [1], queue, task_id=ours["headers"]["id"], countdown=60
    )
    # The eta is "now + countdown" on each side's clock: the same to within a second
    ours_eta = datetime.fromisoformat(ours["headers"].pop("eta"))
    celery_eta = datetime.fromisoformat(celery["headers"].pop("eta"))
    assert abs((ours_eta - celery_eta).total_seconds()) < 1.0
    _assert_same_message(ours, celery)


@pytest.mark.parametrize("lineage", [(None, None), ("root-1", "parent-2")])
def test_encoded_envelopes_are_the_messages_celery_send_task_builds(lineage) -> None:
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    for args, raw in zip(
        ARGS,
        protocol.encoded_envelopes("taskrail.start", ARGS, queue, lineage=lineage),
        strict=True,
    ):
        ours = orjson.loads(raw)
        options = {"root_id": lineage[0], "parent_id": lineage[1]} if lineage[0] else {}
        celery = _celery_envelope(
            "taskrail.start", list(args), queue, task_id=ours["headers"]["id"], **options
        )
        _assert_same_message(ours, celery)
