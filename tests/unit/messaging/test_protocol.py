"""orchestration.messaging.protocol: a batch's pre-encoded envelopes are the envelopes
:func:`protocol.envelope` builds, and kombu's own transport reads them."""

from __future__ import annotations

import base64
import json
import uuid

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
