"""Validation of hop message arguments. A bad message is dropped, never retried."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestration.errors import MalformedMessage

__all__ = [  # MalformedMessage lives in orchestration.errors
    "MalformedMessage",
    "agent_name",
    "attempts",
    "lease_token",
    "parse",
    "task_id",
    "task_type",
]


def _int(hop: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedMessage(hop, f"{name} must be a non-negative integer, got {value!r}")
    return value


def parse(
    hop: str, args: Sequence[Any], kwargs: dict[str, Any], names: Sequence[str], required: int
) -> list[Any]:
    """Positional-or-keyword arguments ``names``; the first ``required`` must be present."""
    if kwargs.keys() - set(names):
        raise MalformedMessage(hop, f"unexpected arguments {sorted(kwargs.keys() - set(names))}")
    if len(args) > len(names):
        raise MalformedMessage(hop, f"at most {len(names)} arguments, got {len(args)}")
    values: list[Any] = list(args) + [None] * (len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            if i < len(args):
                raise MalformedMessage(hop, f"{name} given twice")
            values[i] = kwargs[name]
    for i in range(required):
        if values[i] is None:
            raise MalformedMessage(hop, f"missing {names[i]}")
    return values


def task_id(hop: str, value: Any) -> int:
    return _int(hop, "task_id", value)


def attempts(hop: str, value: Any) -> int:
    return _int(hop, "attempts", value)


def task_type(hop: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise MalformedMessage(hop, f"task_type must be a short string, got {value!r}")
    return value


def agent_name(hop: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 128:
        raise MalformedMessage(hop, f"agent must be a short string, got {value!r}")
    return value


def lease_token(hop: str, value: Any) -> str | None:
    """The lease an execute message names: a pre-claim, or a run lease to take over.

    Messages of earlier releases carried an object with the token in it.
    """
    if isinstance(value, dict):
        value = value.get("token")
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 255:
        raise MalformedMessage(hop, f"lease token must be a short string, got {value!r}")
    return value
