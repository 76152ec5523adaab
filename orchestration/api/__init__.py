"""The producer API: submit work, read it back, retry what failed, handle escalations.

::

    from orchestration import api

    task_id = api.submit("personal_tax", client_id=42, payload={"year": 2025})
    api.get(task_id).status          # TaskStatus.PENDING ... COMPLETED
    api.history(task_id)             # one EventRecord per transition
    api.retry(task_id)               # failed -> pending, and back to the workers
    api.list_tasks(status="escalated", since="1d")   # newest first; after=<last id>
    api.claim(task_id, by="ana")     # an escalation: claim, then resolve / reopen / reject
    api.resolve(task_id, {"refund": 120}, by="ana", note="W-2 read from the scan")
    api.cancel(task_id, reason="client withdrew")
    api.retry_many(status="failed", task_type="personal_tax", dry_run=True)

    trail = api.Taskrail(settings)   # a handle of one's own, with its own settings
    trail.submit_many([api.NewTask("payroll", 7), {"task_type": "payroll", "client_id": 8}])
    trail.close()

The module functions use one :class:`Taskrail` built from the ``TASKRAIL_*``
environment on first use (:func:`client`; :func:`reset_client` forgets it); build a
:class:`Taskrail` yourself for other settings. A task row is committed before its
first hop is sent; if the broker cannot take the message, the task stays pending and
the sweeper sends it later (nothing is lost).

Every failure is a TaskrailError: an InputError (nothing written) for what
:mod:`orchestration.values` refuses, the same rules the worker checks a loaded row by,
or an InfrastructureError. Payloads, results and reasons read back as they were given.

:class:`Taskrail` is made of one class per concern: :mod:`.base` (the database, the
broker, reading a task back), :mod:`.client` (submitting), :mod:`.people` (a person's
moves on one task) and :mod:`.bulk` (listing, and moves of many tasks by filter).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from orchestration.api.bulk import BulkResult
from orchestration.api.client import MAX_KEY_LENGTH, NewTask, Taskrail
from orchestration.store.records import EventRecord, TaskRecord

__all__ = [
    "MAX_KEY_LENGTH",
    "BulkResult",
    "NewTask",
    "Taskrail",
    "cancel",
    "cancel_many",
    "claim",
    "client",
    "get",
    "history",
    "list_tasks",
    "reject",
    "reopen",
    "reset_client",
    "resolve",
    "retry",
    "retry_many",
    "submit",
    "submit_many",
    "unclaim",
]

_default: Taskrail | None = None
_default_lock = threading.Lock()


def client() -> Taskrail:
    """The process-wide :class:`Taskrail`, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Taskrail()
        return _default


def reset_client() -> None:
    """Forget the process-wide client (settings changed, tests)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = None


def submit(
    task_type: str,
    client_id: int,
    payload: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
) -> int:
    """See :meth:`Taskrail.submit`."""
    return client().submit(task_type, client_id, payload, idempotency_key=idempotency_key)


def submit_many(items: Iterable[NewTask | Mapping[str, Any]]) -> list[int]:
    """See :meth:`Taskrail.submit_many`."""
    return client().submit_many(items)


def get(task_id: int) -> TaskRecord:
    """See :meth:`Taskrail.get`."""
    return client().get(task_id)


def history(task_id: int) -> list[EventRecord]:
    """See :meth:`Taskrail.history`."""
    return client().history(task_id)


def retry(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.retry`."""
    client().retry(task_id, by=by, note=note)


def list_tasks(**filters: Any) -> list[TaskRecord]:
    """See :meth:`Taskrail.list_tasks`."""
    return client().list_tasks(**filters)


def claim(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.claim`."""
    client().claim(task_id, by=by, note=note)


def unclaim(task_id: int, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.unclaim`."""
    client().unclaim(task_id, by=by, note=note)


def resolve(task_id: int, result: Any, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.resolve`."""
    client().resolve(task_id, result, by=by, note=note)


def reopen(
    task_id: int,
    *,
    payload: Mapping[str, Any] | None = None,
    by: str | None = None,
    note: str | None = None,
) -> None:
    """See :meth:`Taskrail.reopen`."""
    client().reopen(task_id, payload=payload, by=by, note=note)


def reject(task_id: int, reason: str, *, by: str | None = None, note: str | None = None) -> None:
    """See :meth:`Taskrail.reject`."""
    client().reject(task_id, reason, by=by, note=note)


def cancel(
    task_id: int, *, reason: str | None = None, by: str | None = None, note: str | None = None
) -> None:
    """See :meth:`Taskrail.cancel`."""
    client().cancel(task_id, reason=reason, by=by, note=note)


def retry_many(**filters: Any) -> BulkResult:
    """See :meth:`Taskrail.retry_many`."""
    return client().retry_many(**filters)


def cancel_many(**filters: Any) -> BulkResult:
    """See :meth:`Taskrail.cancel_many`."""
    return client().cancel_many(**filters)
