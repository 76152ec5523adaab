"""Hop message arguments (``workers.messages``): what a hop accepts, and what it drops."""

from __future__ import annotations

from typing import Any

import pytest

from orchestration.errors import InputError
from workers import messages
from workers.messages import MalformedMessage

NAMES = ("task_id", "attempts", "agent", "token")


def test_positional_and_keyword_arguments_fill_the_names_in_order() -> None:
    assert messages.parse("execute", [1, 0], {"agent": "a"}, NAMES, required=2) == [
        1,
        0,
        "a",
        None,
    ]
    assert messages.parse("execute", [], {"task_id": 1, "attempts": 2}, NAMES, 2) == [
        1,
        2,
        None,
        None,
    ]


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ([1, 0, "a", "t", "extra"], {}, "at most 4 arguments, got 5"),
        ([1, 0], {"color": "red"}, "unexpected arguments ['color']"),
        ([1, 0], {"task_id": 2}, "task_id given twice"),
        ([1], {}, "missing attempts"),
        ([None, 0], {}, "missing task_id"),
    ],
)
def test_a_message_with_bad_arguments_is_malformed(
    args: list[Any], kwargs: dict[str, Any], reason: str
) -> None:
    with pytest.raises(MalformedMessage) as caught:
        messages.parse("execute", args, kwargs, NAMES, required=2)
    err = caught.value
    assert (err.hop, err.reason) == ("execute", reason)
    assert str(err) == f"malformed execute message: {reason}"
    assert isinstance(err, InputError)  # a bad message is dropped, never retried


@pytest.mark.parametrize("check", [messages.task_id, messages.attempts])
@pytest.mark.parametrize("value", [-1, True, False, 1.0, "1", None, [1]])
def test_ids_and_counts_are_non_negative_integers(check: Any, value: Any) -> None:
    with pytest.raises(MalformedMessage, match="must be a non-negative integer"):
        check("execute", value)


@pytest.mark.parametrize("check", [messages.task_id, messages.attempts])
def test_zero_and_large_integers_are_accepted(check: Any) -> None:
    assert check("execute", 0) == 0
    assert check("execute", 2**62) == 2**62


@pytest.mark.parametrize("value", ["", "x" * 65, 7, None, b"payroll"])
def test_a_task_type_is_a_short_string(value: Any) -> None:
    with pytest.raises(MalformedMessage, match="task_type must be a short string"):
        messages.task_type("assign", value)


def test_a_task_type_of_64_characters_is_accepted() -> None:
    assert messages.task_type("assign", "x" * 64) == "x" * 64


@pytest.mark.parametrize("value", ["", "x" * 129, 7, ["a"]])
def test_an_agent_is_absent_or_a_short_string(value: Any) -> None:
    assert messages.agent_name("execute", None) is None
    assert messages.agent_name("execute", "x" * 128) == "x" * 128
    with pytest.raises(MalformedMessage, match="agent must be a short string"):
        messages.agent_name("execute", value)


def test_a_lease_token_is_absent_a_string_or_an_older_releases_object() -> None:
    assert messages.lease_token("execute", None) is None
    assert messages.lease_token("execute", "q:w/1") == "q:w/1"
    assert messages.lease_token("execute", {"token": "q:w/1", "until": 5}) == "q:w/1"
    assert messages.lease_token("execute", {}) is None


@pytest.mark.parametrize("value", ["", "x" * 256, 7, {"token": 7}, ["q:w/1"]])
def test_a_bad_lease_token_is_malformed(value: Any) -> None:
    with pytest.raises(MalformedMessage, match="lease token must be a short string"):
        messages.lease_token("execute", value)
