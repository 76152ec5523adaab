"""The rules of ``orchestration.values``, without servers: what is kept, what is refused,
and that orjson's fast answer is always the Python walk's."""

from __future__ import annotations

import enum
import json
import math
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration import constants as c
from orchestration.agents import TaskView, ensure_json
from orchestration.errors import (
    InputError,
    InvalidClientId,
    InvalidIdempotencyKey,
    InvalidPayload,
    InvalidTaskType,
    ResultRejected,
    UnknownTaskType,
)
from orchestration.values import (
    ESCAPE,
    StoredJson,
    _Walk,
    check_client_id,
    check_idempotency_key,
    check_task_row,
    check_task_type,
    encode_payload,
    encode_result,
    escape_text,
    read_json,
    read_text,
    storable_text,
)

chars = st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ue000", "0"]
)
# Strings that also hold the fast path's hints ("e+", an escaped NUL) now and then.
texts = st.text(chars, max_size=12) | st.sampled_from(["1e+20", "\\u0000", "e+"])
floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e16, 1e20, -1e300, 9999999999999998.0, 5e-324, 1.7976931348623157e308]
)
storable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | floats
    | texts,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(texts, inner, max_size=4)
    ),
    max_leaves=25,
)
anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | texts
    | st.builds(object)
    | st.uuids(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(texts | st.integers() | st.none(), inner, max_size=3)
    ),
    max_leaves=15,
)


def as_read(value: Any) -> Any:
    """What a reader gets for ``value``: tuples become lists."""
    if isinstance(value, Mapping):
        return {k: as_read(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_read(v) for v in value]
    return value


def kinds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: kinds(v) for k, v in value.items()}
    if isinstance(value, list):
        return [kinds(v) for v in value]
    return type(value).__name__


def slow(value: Any) -> str:
    return orjson.dumps(_Walk(ResultRejected).clean(value)).decode()


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- text ----------------------------------------------------------------------------


@given(st.text(chars))
def test_escaping_is_undone_exactly_and_leaves_nothing_postgres_refuses(text: str) -> None:
    stored = escape_text(text)
    assert read_text(stored) == text
    assert "\x00" not in stored
    stored.encode()  # no surrogate left: valid UTF-8
    if not any(ch in text for ch in "\x00\ue000") and not any(
        0xD800 <= ord(ch) <= 0xDFFF for ch in text
    ):
        assert stored is text


def test_the_escape_is_the_documented_one() -> None:
    assert escape_text("a\x00b") == "a\ue0000000b"
    assert escape_text("\ud800") == "\ue000d800"
    assert escape_text("\ue000") == "\ue000e000"
    assert read_text("\ue000zz") == "\ue000zz"  # not an escape: kept as it is
    assert ESCAPE == "\ue000"


def test_reasons_are_cut_with_a_mark_and_escaped() -> None:
    assert storable_text("short") == "short"
    long = storable_text("\x00" * 10 + "x" * 10_000)
    assert read_text(long).startswith("\x00" * 10 + "x" * (c.MAX_REASON_CHARS - 10))
    assert "10010 characters in all" in long
    assert storable_text(ValueError("boom")) == "boom"


# -- JSON: kept --------------------------------------------------------------------------


@settings(max_examples=400)
@given(storable)
def test_what_is_kept_reads_back_equal_with_its_types(value: Any) -> None:
    stored = encode_result(value)
    back = read_json(json.loads(stored.text))
    assert back == as_read(value)
    assert kinds(back) == kinds(as_read(value))


@settings(max_examples=400)
@given(storable)
def test_the_fast_path_writes_what_the_walk_writes(value: Any) -> None:
    assert encode_result(value).text == slow(value)


@settings(max_examples=400)
@given(anything)
def test_anything_is_kept_by_the_rules_or_refused_with_a_reason(value: Any) -> None:
    try:
        stored = encode_result(value)
    except ResultRejected as err:
        assert " at $" in str(err) or "bytes" in str(err)
        with pytest.raises(ResultRejected):
            slow(value)
        return
    assert stored.text == slow(value)
    assert read_json(json.loads(stored.text)) == as_read(value)


@pytest.mark.parametrize(
    "value",
    [1e16, 1e20, -1.5e300, 1.7976931348623157e308, 123456789012345680000.0, 1.0, 5e-324],
    ids=repr,
)
def test_floats_are_written_so_jsonb_keeps_them_floats(value: float) -> None:
    text = encode_result({"f": value}).text
    number = text[len('{"f":') : -1]
    assert "e+" not in number and ("." in number or "e-" in number), number
    assert float(number) == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_no_float_is_written_as_jsonb_would_read_an_integer(value: float) -> None:
    # jsonb keeps a number's decimal digits: "1e+20" comes back as 100000000000000000000
    number = encode_result([value]).text[1:-1]
    assert "e+" not in number and ("." in number or "e-" in number), number
    assert float(number) == value


def test_mappings_tuples_and_subclasses_are_kept_as_json() -> None:
    class Kind(enum.IntEnum):
        A = 1

    class Name(str):
        pass

    view = TaskView.build(1, 1, "t", {"a": [1, {"b": "c"}]}, 1)
    assert encode_result(view.payload).text == '{"a":[1,{"b":"c"}]}'
    assert encode_result(OrderedDict(x=Kind.A, y=Name("n"))).text == '{"x":1,"y":"n"}'


def test_a_stored_json_passes_through() -> None:
    stored = encode_result({"a": 1})
    assert encode_result(stored) is stored
    assert ensure_json({"a": "\x00"}) == StoredJson('{"a":"\ue0000000"}')


# -- JSON: refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({1: "int", "1": "str"}, ["key 1", "at $"]),
        ({"a": {None: 1}}, ["key None", "at $.a"]),
        ({"a b": [0, {False: 1}]}, ["key False", "at $['a b'][1]"]),
        ([math.nan], ["nan", "at $[0]"]),
        ({"x": -math.inf}, ["-inf", "at $.x"]),
        ({"n": 2**64}, ["64-bit", "at $.n"]),
        ({"n": -(2**63) - 1}, ["64-bit", "at $.n"]),
        ({"u": uuid.UUID(int=1)}, ["UUID", "at $.u"]),
        ({"s": {1, 2}}, ["set", "at $.s"]),
        ({"b": b"bytes"}, ["bytes", "at $.b"]),
        (nested(255), ["nested deeper than 254", "more"]),
        (nested(100_000), ["nested deeper than 254"]),
    ],
    ids=["int-key", "none-key", "bool-key", "nan", "inf", "int-2-64", "int-below", "uuid", "set",
         "bytes", "depth-255", "depth-100000"],
)  # fmt: skip
def test_what_json_cannot_keep_is_refused_with_its_path(value: Any, words: list[str]) -> None:
    with pytest.raises(ResultRejected) as info:
        encode_result(value)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert len(str(info.value)) < 300


def test_a_cycle_is_refused_not_a_recursion_error() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ResultRejected, match="nested deeper"):
        encode_result(cycle)


def test_the_depth_limit_is_orjsons() -> None:
    encode_result(nested(c.MAX_JSON_DEPTH))
    orjson.dumps(nested(c.MAX_JSON_DEPTH))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(nested(c.MAX_JSON_DEPTH + 1))


def test_sizes_are_capped_as_stored() -> None:
    fits = "x" * (c.MAX_PAYLOAD_BYTES - len('{"a":""}'))
    assert len(encode_payload({"a": fits}).text) == c.MAX_PAYLOAD_BYTES
    with pytest.raises(InvalidPayload, match="bytes"):
        encode_payload({"a": fits + "x"})
    with pytest.raises(InvalidPayload, match="bytes"):  # each NUL is stored as 5 characters
        encode_payload({"a": "\x00" * (c.MAX_PAYLOAD_BYTES // 5)})
    with pytest.raises(ResultRejected, match="bytes"):
        encode_result("x" * c.MAX_RESULT_BYTES)


@pytest.mark.parametrize("payload", [[], "x", 1, (("a", 1),)], ids=repr)
def test_a_payload_is_an_object(payload: Any) -> None:
    with pytest.raises(InvalidPayload, match="JSON object"):
        encode_payload(payload)
    assert encode_payload(None).text == "{}"


# -- the other fields ---------------------------------------------------------------------


@pytest.mark.parametrize("good", [0, 1, 2**63 - 1])
def test_client_ids_in_range(good: int) -> None:
    assert check_client_id(good) == good


@pytest.mark.parametrize("bad", [-1, 2**63, True, 1.0, "1", None, [1]], ids=repr)
def test_client_ids_out_of_range_or_not_integers(bad: Any) -> None:
    with pytest.raises(InvalidClientId, match="from 0 to 2\\*\\*63-1"):
        check_client_id(bad)


@pytest.mark.parametrize("bad", ["", "k\x00", "\ud800", "x" * 256, 1, b"k"], ids=repr)
def test_bad_idempotency_keys(bad: Any) -> None:
    with pytest.raises(InvalidIdempotencyKey) as info:
        check_idempotency_key(bad)
    assert isinstance(info.value, InvalidPayload)
    assert str(info.value).startswith("invalid idempotency key: ")


def test_good_idempotency_keys() -> None:
    assert check_idempotency_key(None) is None
    assert check_idempotency_key("k" * 255) == "k" * 255
    assert check_idempotency_key("\ue000 €") == "\ue000 €"


@pytest.mark.parametrize("bad", [None, 1, ["a"], "", "x" * 65, "a\x00", "\udc80"], ids=repr)
def test_task_types_of_a_form_no_agent_can_have(bad: Any) -> None:
    with pytest.raises(InvalidTaskType, match="task type must be a string") as info:
        check_task_type(bad)
    assert isinstance(info.value, UnknownTaskType)


# -- the worker's check of a loaded row ----------------------------------------------------


@settings(max_examples=300)
@given(st.dictionaries(texts, storable, max_size=5))
def test_every_accepted_payload_passes_the_workers_check_as_stored(payload: Any) -> None:
    stored = json.loads(encode_payload(payload).text)
    check_task_row(1, "payroll", stored)
    view = TaskView.build(1, 1, "payroll", stored, 1)
    assert as_read(view.payload) == as_read(payload)


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ((-1, "t", {}), InvalidClientId),
        ((2**63, "t", {}), InvalidClientId),
        ((1, None, {}), InvalidTaskType),
        ((1, "t", []), InvalidPayload),
        ((1, "t", None), InvalidPayload),
        ((1, "t", {"a": nested(300)}), InvalidPayload),
        ((1, "t", {"a": 2**70}), InvalidPayload),
        ((1, "t", {"a": "\ud800"}), InvalidPayload),
        ((1, "t", {"a": "x" * c.MAX_PAYLOAD_BYTES}), InvalidPayload),
    ],
    ids=["negative", "2**63", "no-type", "list", "none", "deep", "big-int", "surrogate", "big"],
)
def test_rows_the_producer_would_refuse_fail_the_workers_check(
    row: tuple[Any, Any, Any], error: type[InputError]
) -> None:
    with pytest.raises(error):
        check_task_row(*row)


def test_a_stored_payload_with_a_nul_from_an_older_version_runs() -> None:
    check_task_row(1, "t", {"a": "x\x00"})  # SQLite kept it; the worker can run it


def test_a_view_of_a_payload_too_deep_to_walk_is_an_input_error() -> None:
    with pytest.raises(InvalidPayload, match="nested"):
        TaskView.build(1, 1, "t", {"a": nested(100_000)}, 1)


def test_the_view_undoes_the_escapes_in_keys_and_values() -> None:
    stored = json.loads(encode_payload({"k\x00": ["\ud800", {"\ue000": "x"}]}).text)
    view = TaskView.build(1, 1, "t", stored, 1)
    assert view.payload["k\x00"][0] == "\ud800"
    assert view.payload["k\x00"][1]["\ue000"] == "x"
    assert isinstance(view.payload, MappingProxyType)
