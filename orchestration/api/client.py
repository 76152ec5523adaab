""":class:`Taskrail`, a producer's handle: submitting tasks here; reading them back
(:mod:`.base`), a person's moves (:mod:`.people`) and many tasks at once (:mod:`.bulk`)
in the classes it is made of."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from orchestration import constants as c
from orchestration.agents import registry
from orchestration.api.bulk import BulkMoves
from orchestration.api.people import PeopleMoves
from orchestration.errors import InputError, InvalidTaskItem, short_repr
from orchestration.store.inserts import NewRow, insert_tasks
from orchestration.values import (
    check_client_id,
    check_idempotency_key,
    check_task_type,
    encode_payload,
)

MAX_KEY_LENGTH = c.MAX_IDEMPOTENCY_KEY_CHARS


@dataclass(frozen=True, slots=True)
class NewTask:
    """One item of :meth:`Taskrail.submit_many`."""

    task_type: str
    client_id: int
    payload: Mapping[str, Any] | None = None
    idempotency_key: str | None = None


_FIELDS = tuple(f.name for f in fields(NewTask))
_REQUIRED = ("task_type", "client_id")


def _new_task(item: Any, index: int) -> NewTask:
    """``item`` of submit_many as a NewTask. Raises InvalidTaskItem."""
    if isinstance(item, NewTask):
        return item
    if not isinstance(item, Mapping):
        raise InvalidTaskItem(index, f"must be a NewTask or a mapping, got {type(item).__name__}")
    for name in item:
        if name not in _FIELDS:
            raise InvalidTaskItem(
                index, f"unknown field {short_repr(name)}; the fields are {', '.join(_FIELDS)}"
            )
    for name in _REQUIRED:
        if name not in item:
            raise InvalidTaskItem(index, f"missing field {name}")
    return NewTask(**item)


def _check(new: NewTask, known: set[str]) -> NewRow:
    """One task checked by the rules the worker applies to a loaded row; ``known`` holds
    the task types found in the registry so far (a batch looks each up once).

    Raises UnknownTaskType, InvalidClientId, InvalidPayload, InvalidIdempotencyKey.
    """
    task_type = check_task_type(new.task_type)
    if task_type not in known:
        registry.for_task_type(task_type)
        known.add(task_type)
    return NewRow(
        check_client_id(new.client_id),
        task_type,
        encode_payload(new.payload).text,
        check_idempotency_key(new.idempotency_key),
    )


def _at_item(err: InputError, index: int) -> InputError:
    """``err`` (of item ``index`` of a batch) with the index in its message."""
    if not isinstance(err, InvalidTaskItem):
        err.item = index  # type: ignore[attr-defined]
        err.args = (f"item {index}: {err}",)
    return err


class Taskrail(PeopleMoves, BulkMoves):
    """A producer's handle on one database and one broker.

    ``Taskrail(settings=None, *, db=None, dispatcher=None)``: the settings default to
    the ``TASKRAIL_*`` environment; the database and the broker to the settings' own.
    """

    def submit(
        self,
        task_type: str,
        client_id: int,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        """Record a new pending task and send its first hop; returns its id.

        With an ``idempotency_key`` already used, returns that task's id and creates
        nothing. Raises UnknownTaskType, InvalidClientId, InvalidPayload,
        InvalidIdempotencyKey (nothing written), DatabaseUnavailable, WriteConflict.
        """
        row = _check(NewTask(task_type, client_id, payload, idempotency_key), set())
        return self._submit_rows([row])[0]

    def submit_many(self, items: Iterable[NewTask | Mapping[str, Any]]) -> list[int]:
        """Submit many tasks in one transaction; returns their ids in input order.

        Every item is validated before anything is written: one bad item raises (its
        error names the item's index, from 0) and no task is created.
        """
        try:
            listed = list(items)
        except TypeError:
            raise InputError(
                f"submit_many takes NewTask items or mappings, got {type(items).__name__}"
            ) from None
        rows: list[NewRow] = []
        known: set[str] = set()
        for index, item in enumerate(listed):
            try:
                rows.append(_check(_new_task(item, index), known))
            except InputError as err:
                raise _at_item(err, index) from None
        return self._submit_rows(rows)

    def _submit_rows(self, rows: list[NewRow]) -> list[int]:
        if not rows:
            return []
        created = insert_tasks(self.db, rows)
        fresh = [
            (task_id, row.task_type)
            for (task_id, is_new), row in zip(created, rows, strict=True)
            if is_new
        ]
        self._enqueue_first_hops(fresh)
        return [task_id for task_id, _ in created]
