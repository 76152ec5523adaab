"""A person's moves through the producer API (issue 21): retry, resolve, reopen, reject,
claim, unclaim and cancel, allowed and refused from every state, on the embedded SQLite
and on the real PostgreSQL with a Redis broker.

An allowed move leads to the right state with exactly one audit event (the actor, the
note, the reason as detail, worker "api"); a refused one raises a one-line
TaskrailError naming the task's state and writes nothing: not the row, not the
history, not a hop message.
"""

from __future__ import annotations

import getpass
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestration import api
from orchestration.constants import MAX_ACTOR_CHARS, MAX_NOTE_CHARS, MAX_REASON_CHARS
from orchestration.errors import (
    AlreadyClaimed,
    InputError,
    InvalidField,
    InvalidPayload,
    NotClaimed,
    NotRetryable,
    ResultRejected,
    TaskNotFound,
    TaskrailError,
    WriteConflict,
    WrongState,
)
from orchestration.models import TaskStatus
from orchestration.moves import RUN_COLUMNS
from orchestration.values import read_json
from tests.support import json_types
from tests.unit.domain.people_support import Backend, move_to

S = TaskStatus

EVENTS = ("retry", "resolve", "reopen", "reject", "claim", "unclaim", "cancel")
# Where each event may start and where it leads (unclaim: an escalated task someone claimed).
VALID: dict[str, dict[TaskStatus, TaskStatus]] = {
    "retry": {S.FAILED: S.PENDING},
    "resolve": {S.ESCALATED: S.COMPLETED},
    "reopen": {S.ESCALATED: S.PENDING},
    "reject": {S.ESCALATED: S.FAILED},
    "claim": {S.ESCALATED: S.ESCALATED},
    "unclaim": {S.ESCALATED: S.ESCALATED},
    "cancel": {S.PENDING: S.CANCELLED, S.ASSIGNED: S.CANCELLED, S.IN_PROGRESS: S.CANCELLED},
}
RESULT = {"refund": 120.5, "forms": ["W-2"]}
REASONS = {"reject": "no W-2 will come", "cancel": "client withdrew"}
NOTE = "called the client"


def call(
    trail: api.Taskrail, event: str, task_id: Any, *, by: Any = None, note: Any = None
) -> None:
    """``event`` on ``task_id`` with typical arguments."""
    if event == "retry":
        trail.retry(task_id, by=by, note=note)
    elif event == "resolve":
        trail.resolve(task_id, RESULT, by=by, note=note)
    elif event == "reopen":
        trail.reopen(task_id, payload={"w2": "scan.pdf"}, by=by, note=note)
    elif event == "reject":
        trail.reject(task_id, REASONS["reject"], by=by, note=note)
    elif event == "claim":
        trail.claim(task_id, by=by, note=note)
    elif event == "unclaim":
        trail.unclaim(task_id, by=by, note=note)
    else:
        trail.cancel(task_id, reason=REASONS["cancel"], by=by, note=note)


def short(value: Any) -> str:
    return repr(value)[:16]


def start_state(event: str) -> TaskStatus:
    return next(iter(VALID[event]))


def put_for(backend: Backend, event: str, status: TaskStatus | None = None) -> int:
    """A task ``event`` may move (in ``status``, default the first allowed one)."""
    status = status or start_state(event)
    claimed = "bob" if event == "unclaim" and status is S.ESCALATED else None
    return backend.put(status, claimed_by=claimed)


def assert_refused(
    backend: Backend, task_id: int, error: type[Exception], run: Callable[[], Any]
) -> Exception:
    """``run()`` raises ``error`` (a one-line TaskrailError) and writes nothing."""
    before = backend.snapshot(task_id)
    with pytest.raises(error) as info:
        run()
    assert isinstance(info.value, TaskrailError)
    assert "\n" not in str(info.value) and str(info.value)
    assert backend.snapshot(task_id) == before
    return info.value


# -- allowed moves -------------------------------------------------------------------


VALID_CASES = [(event, status) for event, moves in VALID.items() for status in moves]


@pytest.mark.parametrize(("event", "status"), VALID_CASES, ids=[f"{e}-{s}" for e, s in VALID_CASES])
def test_an_allowed_move_writes_one_audit_event_with_actor_and_note(
    backend: Backend, event: str, status: TaskStatus
) -> None:
    # Given a task the event may move, with its history and hops so far
    task_id = put_for(backend, event, status)
    history, hops = backend.events(task_id), backend.assign_hops()

    # When ana makes the move with a note
    call(backend.trail, event, task_id, by="ana", note=NOTE)

    # Then the task is where the event leads, with exactly one new audit event
    target = VALID[event][status]
    assert backend.trail.get(task_id).status is target
    events = backend.events(task_id)
    assert events[:-1] == history
    new = events[-1]
    assert (new["event"], new["from_status"], new["to_status"]) == (event, status, target)
    assert (new["actor"], new["note"], new["worker"]) == ("ana", NOTE, "api")
    assert new["detail"] == REASONS.get(event)
    last = backend.trail.history(task_id)[-1]
    assert (last.event, last.actor, last.note, last.detail) == (
        event,
        "ana",
        NOTE,
        REASONS.get(event),
    )
    # and a task that goes back to pending is sent to the workers: one assign hop
    sent = backend.assign_hops()[len(hops) :]
    assert sent == ([task_id] if target is S.PENDING else [])


@pytest.mark.parametrize("event", EVENTS)
def test_the_actor_is_the_os_user_when_no_one_is_named(backend: Backend, event: str) -> None:
    task_id = put_for(backend, event)

    call(backend.trail, event, task_id)

    last = backend.trail.history(task_id)[-1]
    assert (last.event, last.actor, last.note, last.worker) == (
        event,
        getpass.getuser(),
        None,
        "api",
    )


def test_module_functions_make_the_same_moves(backend: Backend) -> None:
    # Given an escalated task, a failed one and a pending one
    escalated = backend.put(S.ESCALATED)
    failed = backend.put(S.FAILED)
    pending = backend.put(S.PENDING)

    # When the module-level functions move them
    api.claim(escalated, by="ana")
    api.unclaim(escalated, by="ana")
    api.claim(escalated, by="bob")
    api.resolve(escalated, {"done": True}, by="bob", note="ok")
    api.retry(failed, by="ana")
    api.cancel(pending, reason="duplicate", by="ana")

    # Then each move is in the history, made by whom the call named
    assert [(e.event, e.actor) for e in api.history(escalated)[-4:]] == [
        ("claim", "ana"),
        ("unclaim", "ana"),
        ("claim", "bob"),
        ("resolve", "bob"),
    ]
    assert api.get(escalated).result == {"done": True}
    assert api.get(failed).status is S.PENDING
    assert (api.get(pending).status, api.get(pending).last_error) == (S.CANCELLED, "duplicate")


def test_resolve_stores_the_result_and_completes(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED, claimed_by="ana")
    result = {"refund": 1e20, "text": "page 1\x00page 2 \ud800 \ue000", "n": [1, 2.0, None]}

    backend.trail.resolve(task_id, result, by="ana")

    task = backend.trail.get(task_id)
    assert task.result == result
    assert [type(v) for v in task.result["n"]] == [int, float, type(None)]
    assert task.completed_at is not None
    assert task.claimed_by == "ana"  # who handled it stays on record
    assert task.last_error == "missing W-2"


def test_reopen_merges_the_payload_and_hands_the_task_back_to_the_agents(
    backend: Backend,
) -> None:
    # Given an escalated task, claimed by ana, whose agent wanted a W-2
    task_id = backend.put(S.ESCALATED, claimed_by="ana")
    before = backend.trail.get(task_id)
    assert (before.attempts, before.assigned_agent, before.claimed_by) == (
        1,
        "personal_tax_agent",
        "ana",
    )
    hops = backend.assign_hops()

    # When bob reopens it with the document (and a new year)
    backend.trail.reopen(task_id, payload={"w2": "scan.pdf", "year": 2024}, by="bob")

    # Then it is pending with the merged payload, no attempts, no agent, no claim,
    # and one assign hop is on its way
    task = backend.trail.get(task_id)
    assert task.status is S.PENDING
    assert task.payload == {"year": 2024, "w2": "scan.pdf"}
    assert (task.attempts, task.assigned_agent, task.claimed_by, task.claimed_at) == (
        0,
        None,
        None,
        None,
    )
    row = backend.row(task_id)
    assert [row[c] for c in RUN_COLUMNS] == [None] * len(RUN_COLUMNS)
    assert backend.assign_hops() == [*hops, task_id]
    assert backend.trail.history(task_id)[-1].actor == "bob"


def test_a_reopen_merges_into_the_payload_as_it_is_when_it_writes(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an escalated task, and a reader that lets bob reopen it with a document and
    # the agent escalate it again right after ana's reopen has read it
    task_id = backend.put(S.ESCALATED)
    bob = api.Taskrail(backend.settings)
    real_get = api.Taskrail.get
    reads: list[int] = []

    def get_then_bob(self: api.Taskrail, task_id: int) -> Any:
        task = real_get(self, task_id)
        reads.append(task_id)
        if self is not bob and len(reads) == 1:
            bob.reopen(task_id, payload={"w2": "bob.pdf"}, by="bob")
            move_to(backend.db, task_id, S.ESCALATED)
        return task

    monkeypatch.setattr(api.Taskrail, "get", get_then_bob)

    # When ana reopens it with another field
    backend.trail.reopen(task_id, payload={"note": "ana's"}, by="ana")
    bob.close()

    # Then her write saw the task had changed, read it again and merged into bob's payload
    assert backend.trail.get(task_id).payload == {"year": 2025, "w2": "bob.pdf", "note": "ana's"}
    reopens = [e.actor for e in backend.trail.history(task_id) if e.event == "reopen"]
    assert reopens == ["bob", "ana"]


def test_a_move_on_a_task_that_keeps_changing_gives_up_with_write_conflict(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an escalated task that a hop re-escalates after every read (an endless loop)
    task_id = backend.put(S.ESCALATED)
    real_get = api.Taskrail.get
    other = api.Taskrail(backend.settings)

    def get_then_move(self: api.Taskrail, task_id: int) -> Any:
        task = real_get(self, task_id)
        if self is not other:
            other.reopen(task_id, by="bob")
            move_to(backend.db, task_id, S.ESCALATED)
        return task

    monkeypatch.setattr(api.Taskrail, "get", get_then_move)

    # When ana reopens it with a payload, each write finds it changed
    with pytest.raises(WriteConflict) as info:
        backend.trail.reopen(task_id, payload={"x": 1}, by="ana")
    other.close()

    # Then she is told after a few tries, and none of her moves was written
    assert "kept changing" in str(info.value)
    assert "ana" not in {e.actor for e in backend.trail.history(task_id)}
    assert "x" not in backend.trail.get(task_id).payload


def test_reopen_without_a_payload_keeps_the_payload(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED, payload={"year": 2025, "forms": ["1099"]})

    backend.trail.reopen(task_id, note="the service is back")

    assert backend.trail.get(task_id).payload == {"year": 2025, "forms": ["1099"]}
    assert backend.trail.history(task_id)[-1].note == "the service is back"


def test_reject_stores_the_reason(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED)

    backend.trail.reject(task_id, "client closed the account \x00", by="ana")

    task = backend.trail.get(task_id)
    assert (task.status, task.last_error) == (S.FAILED, "client closed the account \x00")
    assert backend.trail.history(task_id)[-1].detail == "client closed the account \x00"


def test_claim_marks_who_handles_the_escalation(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED)

    backend.trail.claim(task_id, by="ana")

    task = backend.trail.get(task_id)
    assert (task.status, task.claimed_by) == (S.ESCALATED, "ana")
    assert task.claimed_at is not None
    assert [t.id for t in backend.trail.list_tasks(claimed_by="ana")] == [task_id]


def test_claiming_a_task_one_holds_does_nothing(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED, claimed_by="ana")
    before = backend.snapshot(task_id)

    backend.trail.claim(task_id, by="ana")

    assert backend.snapshot(task_id) == before


def test_claiming_a_task_someone_else_holds_is_refused(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED, claimed_by="bob")

    err = assert_refused(
        backend, task_id, AlreadyClaimed, lambda: backend.trail.claim(task_id, by="ana")
    )

    assert isinstance(err, AlreadyClaimed)
    assert err.claimed_by == "bob"
    assert str(err) == f"task {task_id} is claimed by 'bob'; unclaim it first"


def test_unclaiming_an_unclaimed_task_is_refused(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED)

    err = assert_refused(
        backend, task_id, NotClaimed, lambda: backend.trail.unclaim(task_id, by="ana")
    )

    assert str(err) == f"task {task_id} is not claimed"


@pytest.mark.parametrize("event", ["resolve", "reopen", "reject"])
def test_anyone_may_close_a_claimed_task_and_the_audit_says_who(
    backend: Backend, event: str
) -> None:
    task_id = backend.put(S.ESCALATED, claimed_by="bob")

    call(backend.trail, event, task_id, by="ana")

    last = backend.trail.history(task_id)[-1]
    assert (last.event, last.actor) == (event, "ana")


def test_cancel_of_a_running_task_releases_its_lease(backend: Backend) -> None:
    # Given a task in progress, leased to a worker
    task_id = backend.put(S.IN_PROGRESS)
    assert backend.row(task_id)["lease_owner"] == "r:w-1/1"

    # When it is cancelled
    backend.trail.cancel(task_id, by="ana")

    # Then it is cancelled (final) with no lease, and the default reason
    row = backend.row(task_id)
    assert row["status"] == S.CANCELLED
    assert [row[c] for c in RUN_COLUMNS] == [None] * len(RUN_COLUMNS)
    task = backend.trail.get(task_id)
    assert task.last_error == "cancelled"
    assert task.assigned_agent == "personal_tax_agent"
    last = backend.trail.history(task_id)[-1]
    assert (last.detail, last.agent) == ("cancelled", "personal_tax_agent")


def test_retry_after_a_reject_clears_the_claim_like_reopen(backend: Backend) -> None:
    # Given an escalated task ana claimed, then rejected
    task_id = backend.put(S.ESCALATED, claimed_by="ana")
    backend.trail.reject(task_id, "wrong client", by="ana")
    assert backend.trail.get(task_id).claimed_by == "ana"

    # When someone retries it, it goes back to the agents
    backend.trail.retry(task_id, by="bob")

    # Then, as after a reopen, no one holds it any more
    task = backend.trail.get(task_id)
    assert (task.status, task.attempts, task.assigned_agent, task.claimed_by) == (
        S.PENDING,
        0,
        None,
        None,
    )
    assert task.claimed_at is None


# -- refused moves -------------------------------------------------------------------


REFUSED_CASES = [(e, s) for e in EVENTS for s in TaskStatus if s not in VALID[e]]


@pytest.mark.parametrize(
    ("event", "status"), REFUSED_CASES, ids=[f"{e}-{s}" for e, s in REFUSED_CASES]
)
def test_a_move_from_another_state_says_the_state_and_writes_nothing(
    backend: Backend, event: str, status: TaskStatus
) -> None:
    task_id = backend.put(status)

    err = assert_refused(
        backend,
        task_id,
        NotRetryable if event == "retry" else WrongState,
        lambda: call(backend.trail, event, task_id, by="ana", note=NOTE),
    )

    assert isinstance(err, WrongState)
    assert (err.task_id, err.status) == (task_id, status.value)
    assert str(err).startswith(f"task {task_id} is {status.value}; only ")


def test_retry_of_an_escalated_task_stays_refused(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED)

    err = assert_refused(backend, task_id, NotRetryable, lambda: backend.trail.retry(task_id))

    assert str(err) == f"task {task_id} is escalated; only failed tasks can be retried"


BAD_IDS = [987654, 0, -1, 2**63, "1", True, None, 1.0]
# Each event with an absent id and one of the others in turn.
BAD_ID_CASES = [(e, i) for n, e in enumerate(EVENTS) for i in (BAD_IDS[0], BAD_IDS[1 + n])]


@pytest.mark.parametrize(("event", "task_id"), BAD_ID_CASES, ids=short)
def test_an_unknown_task_id_is_not_found_and_writes_nothing(
    backend: Backend, event: str, task_id: Any
) -> None:
    other = put_for(backend, event)
    before = backend.snapshot(other)

    with pytest.raises(TaskNotFound) as info:
        call(backend.trail, event, task_id, by="ana")

    assert "\n" not in str(info.value)
    assert backend.snapshot(other) == before


@pytest.mark.parametrize(
    "result",
    [[1, 2], "done", None, 5, 1.5, True],
    ids=["list", "str", "none", "int", "float", "bool"],
)
def test_resolve_refuses_a_result_that_is_not_an_object(backend: Backend, result: Any) -> None:
    task_id = backend.put(S.ESCALATED)

    err = assert_refused(
        backend, task_id, ResultRejected, lambda: backend.trail.resolve(task_id, result)
    )

    assert "JSON object" in str(err)


@pytest.mark.parametrize(
    "result",
    [
        {"x": math.nan},
        {"x": math.inf},
        {"x": 2**64},
        {"x": {1: "int key"}},
        {"x": object()},
        {"big": "x" * (1024 * 1024)},
    ],
    ids=["nan", "inf", "big-int", "int-key", "object", "too-big"],
)
def test_resolve_refuses_a_result_that_cannot_be_stored(backend: Backend, result: Any) -> None:
    task_id = backend.put(S.ESCALATED)

    err = assert_refused(
        backend, task_id, ResultRejected, lambda: backend.trail.resolve(task_id, result)
    )

    assert str(err).startswith("result cannot be stored: ")


@pytest.mark.parametrize(
    "reason",
    [None, "", "   ", "\n", 5, b"why", "x" * (MAX_REASON_CHARS + 1)],
    ids=["none", "empty", "blank", "newline", "int", "bytes", "too-long"],
)
def test_reject_needs_a_reason(backend: Backend, reason: Any) -> None:
    task_id = backend.put(S.ESCALATED)

    err = assert_refused(
        backend, task_id, InvalidField, lambda: backend.trail.reject(task_id, reason)
    )

    assert isinstance(err, InvalidField) and err.name == "reason"


@pytest.mark.parametrize(
    "reason",
    ["", "  ", 5, "x" * (MAX_REASON_CHARS + 1)],
    ids=["empty", "blank", "int", "too-long"],
)
def test_cancel_refuses_a_bad_reason(backend: Backend, reason: Any) -> None:
    task_id = backend.put(S.PENDING)

    err = assert_refused(
        backend, task_id, InvalidField, lambda: backend.trail.cancel(task_id, reason=reason)
    )

    assert isinstance(err, InvalidField) and err.name == "reason"


BAD_ACTORS = [
    "",
    "   ",
    " ana",
    "ana ",
    "x" * (MAX_ACTOR_CHARS + 1),
    "ana\x00",
    "ana\nbob",
    "\ud800",
    "\ue000",
    "a\tb",
    5,
    b"ana",
]


# Every bad actor with one event, in turn; the empty name with every event.
BAD_ACTOR_CASES = [(EVENTS[n % len(EVENTS)], by) for n, by in enumerate(BAD_ACTORS)] + [
    (e, "") for e in EVENTS[1:]
]


@pytest.mark.parametrize(("event", "by"), BAD_ACTOR_CASES, ids=short)
def test_a_bad_actor_is_refused(backend: Backend, event: str, by: Any) -> None:
    task_id = put_for(backend, event)

    err = assert_refused(
        backend, task_id, InvalidField, lambda: call(backend.trail, event, task_id, by=by)
    )

    assert isinstance(err, InvalidField) and err.name == "by"


BAD_NOTES = ["x" * (MAX_NOTE_CHARS + 1), 5, b"note"]


@pytest.mark.parametrize(
    ("event", "note"), [(e, BAD_NOTES[n % 3]) for n, e in enumerate(EVENTS)], ids=short
)
def test_a_bad_note_is_refused(backend: Backend, event: str, note: Any) -> None:
    task_id = put_for(backend, event)

    err = assert_refused(
        backend, task_id, InvalidField, lambda: call(backend.trail, event, task_id, note=note)
    )

    assert isinstance(err, InvalidField) and err.name == "note"


def test_the_longest_actor_and_note_are_kept(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED)
    by, note = "é" * MAX_ACTOR_CHARS, "\x00" * MAX_NOTE_CHARS

    backend.trail.claim(task_id, by=by, note=note)

    last = backend.trail.history(task_id)[-1]
    assert (last.actor, last.note) == (by, note)
    assert backend.trail.get(task_id).claimed_by == by


@pytest.mark.parametrize(
    "payload",
    [["w2"], "w2", 5, {1: "int key"}, {"x": math.nan}, {"x": {"a": [object()]}}],
    ids=["list", "str", "int", "int-key", "nan", "object"],
)
def test_reopen_refuses_a_payload_it_cannot_store(backend: Backend, payload: Any) -> None:
    task_id = backend.put(S.ESCALATED)

    err = assert_refused(
        backend, task_id, InvalidPayload, lambda: backend.trail.reopen(task_id, payload=payload)
    )

    assert str(err).startswith("invalid payload: ")


def test_reopen_refuses_a_merged_payload_over_the_size_limit(backend: Backend) -> None:
    # Given an escalated task whose payload is 200 KB, and a 100 KB document
    task_id = backend.put(S.ESCALATED, payload={"scan": "x" * 200_000})

    # When it is reopened with it, the merged payload would pass the 256 KiB limit:
    # refused, nothing written
    err = assert_refused(
        backend,
        task_id,
        InvalidPayload,
        lambda: backend.trail.reopen(task_id, payload={"w2": "y" * 100_000}),
    )

    assert "larger than" in str(err)
    # while replacing the big field keeps it under the limit
    backend.trail.reopen(task_id, payload={"scan": "y" * 100_000})
    assert backend.trail.get(task_id).payload == {"scan": "y" * 100_000}


def test_reopen_refuses_a_payload_nested_too_deep(backend: Backend) -> None:
    task_id = backend.put(S.ESCALATED)
    deep: dict[str, Any] = {}
    for _ in range(254):  # with the payload's own level: 255
        deep = {"a": deep}

    err = assert_refused(
        backend, task_id, InvalidPayload, lambda: backend.trail.reopen(task_id, payload=deep)
    )

    assert "nested deeper" in str(err)


# -- any input: refused cleanly, or stored and read back exactly --------------------------

chars = st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ue000", " ", "\n", "a"]
)
texts = st.text(chars, max_size=12)
long_texts = st.builds(lambda ch, n: ch * n, chars, st.integers(3990, 4010))
names = st.text(chars, min_size=0, max_size=8) | st.builds(
    lambda ch, n: ch * n, st.sampled_from(["a", "é", " "]), st.integers(126, 130)
)
anything = st.none() | st.integers() | st.binary(max_size=3) | st.floats()
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats()
    | texts
)
json_like = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(texts | st.integers() | st.none(), inner, max_size=3)
    ),
    max_leaves=12,
)
objects = st.dictionaries(texts, json_like, max_size=4)


def valid_actor(by: Any) -> bool:
    return (
        isinstance(by, str)
        and 0 < len(by) <= MAX_ACTOR_CHARS
        and by.isprintable()
        and by == by.strip()
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    move=st.sampled_from(EVENTS),
    by=st.none() | names | anything,
    note=st.none() | texts | long_texts | anything,
    data=st.data(),
)
def test_any_input_is_refused_cleanly_or_read_back_exactly(
    backend: Backend, move: str, by: Any, note: Any, data: st.DataObject
) -> None:
    # Given a task the move may apply to
    task_id = put_for(backend, move)
    before = backend.snapshot(task_id)
    old = backend.trail.get(task_id)
    trail = backend.trail
    arg: Any = None

    # When a person makes it with any actor, note and argument
    try:
        if move == "resolve":
            arg = data.draw(objects | json_like, label="result")
            trail.resolve(task_id, arg, by=by, note=note)
        elif move == "reopen":
            arg = data.draw(st.none() | objects | json_like, label="payload")
            trail.reopen(task_id, payload=arg, by=by, note=note)
        elif move in ("reject", "cancel"):
            arg = data.draw(texts | long_texts | anything, label="reason")
            if move == "reject":
                trail.reject(task_id, arg, by=by, note=note)
            else:
                trail.cancel(task_id, reason=arg, by=by, note=note)
        else:
            call(trail, move, task_id, by=by, note=note)
    except TaskrailError as err:
        # Then either it is refused with a one-line input error and nothing written
        event(f"{move}: {type(err).__name__} {getattr(err, 'name', '')}")
        assert isinstance(err, InputError), repr(err)
        assert "\n" not in str(err)
        assert backend.snapshot(task_id) == before
        if isinstance(err, InvalidField) and err.name == "by":
            assert by is not None and not valid_actor(by)
        return

    # or it is applied, and everything reads back exactly as given
    event(f"{move}: applied")
    assert by is None or valid_actor(by)
    assert note is None or (isinstance(note, str) and len(note) <= MAX_NOTE_CHARS)
    last = trail.history(task_id)[-1]
    assert last.event == move
    assert last.actor == (getpass.getuser() if by is None else by)
    assert last.note == note
    assert last.worker == "api"
    assert len(backend.events(task_id)) == len(before[1]) + 1
    task = trail.get(task_id)
    assert task.status is VALID[move][start_state(move)]
    if move == "resolve":
        assert task.result == arg
        assert json_types(task.result) == json_types(arg)
        assert read_json(backend.row(task_id)["result"]) == arg
    elif move == "reopen":
        merged = {**old.payload, **(arg or {})}
        assert task.payload == merged
        assert json_types(task.payload) == json_types(merged)
    elif move == "reject":
        assert (task.last_error, last.detail) == (arg, arg)
    elif move == "cancel":
        want = "cancelled" if arg is None else arg
        assert (task.last_error, last.detail) == (want, want)
    elif move == "claim":
        assert task.claimed_by == last.actor
