"""The people's commands: find tasks (``list``), handle an escalation (``claim``,
``unclaim``, ``resolve``, ``reopen``, ``reject``), and ``cancel`` or ``retry`` one task
or every task a filter matches.

A move on one task prints ``task 5 resolved by ana`` (``--json``: its id and new
status). A bulk move (``--status`` and filters instead of an id) prints how many it
moved and how many it skipped because they moved on meanwhile; ``--dry-run`` prints how
many and which would move, and changes nothing.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from orchestration import constants as c
from orchestration.errors import (
    InputError,
    InvalidFilter,
    InvalidNumber,
    InvalidPayload,
    ResultRejected,
    shown_input,
)
from orchestration.ops.cli.app import (
    STATUS_STYLE,
    JsonFlag,
    app,
    command,
    current_client,
    err,
    out,
    print_json,
)
from orchestration.ops.cli_edge import literal, parse_number

if TYPE_CHECKING:
    from orchestration.api import BulkResult
    from orchestration.filters import TaskFilter
    from orchestration.store.records import TaskRecord

Progress = Callable[[int, int], None]

TaskArg = Annotated[str, typer.Argument(metavar="TASK_ID", help="Task id.")]
TaskOrFilter = Annotated[
    str | None,
    typer.Argument(metavar="TASK_ID", help="Task id; or give --status to act by filter."),
]
By = Annotated[str | None, typer.Option("--by", help="Who acts (default: the OS user).")]
Note = Annotated[str | None, typer.Option("--note", help="A note for the audit trail.")]
Statuses = Annotated[
    list[str] | None,
    typer.Option("--status", help="Status; repeat it or separate several with commas."),
]
TaskType = Annotated[str | None, typer.Option("--type", help="Task type.")]
Client = Annotated[str | None, typer.Option("--client", help="Client id.")]
Agent = Annotated[str | None, typer.Option("--agent", help="Assigned agent.")]
Since = Annotated[
    str | None,
    typer.Option("--since", help="Created since: 90s, 30m, 1h, 2d, 1w back, or an ISO time."),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Say how many and which; change nothing.")]

# What a move on one task says it did, and the status it leaves the task in.
_DONE = {
    "claim": ("claimed", "escalated"),
    "unclaim": ("unclaimed", "escalated"),
    "resolve": ("resolved", "completed"),
    "reopen": ("reopened", "pending"),
    "reject": ("rejected", "failed"),
    "cancel": ("cancelled", "cancelled"),
    "retry": ("retried", "pending"),
}
_LAST_ERROR_CHARS = 60


# -- parsing -----------------------------------------------------------------------------


def _actor(by: str | None) -> str:
    """``--by``, checked; the OS user when not given. Raises InvalidField."""
    # Imported here: the filters import the models (SQLAlchemy), which `--help` need not.
    from orchestration.filters import check_actor

    return check_actor(by)


def _statuses(given: list[str] | None) -> list[str] | None:
    """``--status`` values, each possibly comma-separated, as one list of names."""
    if not given:
        return None
    return [part for item in given for part in item.split(",")]


def _json_option(text: str | None, error: Callable[[str], InputError]) -> Any:
    """``text`` parsed as JSON; bad JSON raises ``error("not valid JSON: ...")``."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"not valid JSON: {exc}") from None


def _limit(text: str | None) -> int:
    """``--limit``: 1 to MAX_LIST_LIMIT. Raises InvalidFilter."""
    from orchestration.filters import check_limit

    if text is None:
        return c.DEFAULT_LIST_LIMIT
    try:
        return check_limit(parse_number(text, "limit"))
    except InvalidNumber:
        raise InvalidFilter(
            "limit", f"expected an integer from 1 to {c.MAX_LIST_LIMIT}, got {shown_input(text)}"
        ) from None


@dataclass(frozen=True, slots=True)
class _Filter:
    """The filter options of ``list`` and the bulk moves, as typed."""

    status: list[str] | None = None
    task_type: str | None = None
    client: str | None = None
    agent: str | None = None
    since: str | None = None
    claimed_by: str | None = None

    def given(self) -> list[str]:
        """The bulk moves' filter options given, other than ``--status``."""
        named = zip(
            ("--type", "--client", "--agent", "--since"),
            (self.task_type, self.client, self.agent, self.since),
            strict=True,
        )
        return [flag for flag, value in named if value is not None]

    def task_filter(self) -> TaskFilter:
        """The filter, checked before the database is opened; ``since`` as the instant it
        names now. Raises InvalidFilter, InvalidNumber, InvalidClientId."""
        from orchestration.filters import TaskFilter

        return TaskFilter.build(
            status=_statuses(self.status),
            task_type=self.task_type,
            client_id=None if self.client is None else parse_number(self.client, "client id"),
            agent=self.agent,
            claimed_by=self.claimed_by,
            since=self.since,
        )

    def checked(self) -> dict[str, Any]:
        """:meth:`task_filter` as keyword arguments of the API's ``list_tasks``."""
        flt = self.task_filter()
        query: dict[str, Any] = {
            "status": [s.value for s in flt.statuses] or None,
            "task_type": flt.task_type,
            "client_id": flt.client_id,
            "agent": flt.agent,
            "since": flt.since,
        }
        if flt.claimed_by is not None:
            query["claimed_by"] = flt.claimed_by
        return query


# -- list --------------------------------------------------------------------------------


@app.command("list")
@command
def list_tasks(
    ctx: typer.Context,
    status: Statuses = None,
    task_type: TaskType = None,
    client: Client = None,
    agent: Agent = None,
    claimed_by: Annotated[
        str | None, typer.Option("--claimed-by", help="Who claimed the task.")
    ] = None,
    since: Since = None,
    limit: Annotated[
        str | None, typer.Option("--limit", help=f"Page size, 1 to {c.MAX_LIST_LIMIT}.")
    ] = None,
    after: Annotated[
        str | None, typer.Option("--after", help="The last id of the previous page.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Tasks matching every filter, newest first, a page at a time."""
    # `since` is fixed once: the next page's command names the same instant.
    query = _Filter(status, task_type, client, agent, since, claimed_by).checked()
    size = _limit(limit)
    cursor = None if after is None else parse_number(after, "--after")
    trail = current_client(ctx)
    tasks = trail.list_tasks(**query, limit=size, after=cursor)
    if as_json:
        print_json([task.to_dict() for task in tasks])
        return
    if not tasks:
        out.print("no more tasks" if cursor is not None else "no tasks", highlight=False)
        return
    out.print(_table(tasks))
    last = tasks[-1].id
    if len(tasks) == size and trail.list_tasks(**query, limit=1, after=last):
        args = ["taskrail", "list"]
        for name in status or []:
            args += ["--status", name]
        options = (
            ("--type", task_type),
            ("--client", client),
            ("--agent", agent),
            ("--claimed-by", claimed_by),
            ("--since", None if query["since"] is None else query["since"].isoformat()),
            ("--limit", limit),
        )
        for flag, value in options:
            if value is not None:
                args += [flag, value]
        args += ["--after", str(last)]
        out.print(literal(f"next page: {shlex.join(args)}"))


def _table(tasks: list[TaskRecord]) -> Table:
    # Stored text is printed as stored (literal()): a payload's "[red]" is not a style.
    # Ids, states, counts and times stay whole on a narrow terminal; text folds.
    t = Table()
    for name in ("id", "status", "type", "client", "agent", "claimed by", "attempts", "updated"):
        whole = name not in ("type", "agent", "claimed by")
        right = name in ("id", "client", "attempts")
        t.add_column(name, justify="right" if right else "left", no_wrap=whole, overflow="fold")
    t.add_column("last error", overflow="fold")
    for task in tasks:
        t.add_row(
            literal(task.id),
            literal(task.status.value, STATUS_STYLE.get(task.status.value, "white")),
            literal(task.task_type),
            literal(task.client_id),
            literal(task.assigned_agent),
            literal(task.claimed_by),
            literal(task.attempts),
            literal(task.updated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")),
            literal(_cut(task.last_error)),
        )
    return t


def _cut(text: str | None) -> str | None:
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= _LAST_ERROR_CHARS else flat[: _LAST_ERROR_CHARS - 3] + "..."


# -- a move on one task --------------------------------------------------------------------


def _moved(task_id: int, event: str, actor: str, as_json: bool) -> None:
    done, status = _DONE[event]
    if as_json:
        print_json({"id": task_id, "status": status})
        return
    if status == "pending":  # retried or reopened: back to the agents
        out.print(literal(f"task {task_id} is pending again ({done} by {actor})"))
    else:
        out.print(literal(f"task {task_id} {done} by {actor}"))


@app.command()
@command
def claim(
    ctx: typer.Context,
    task_text: TaskArg,
    by: By = None,
    note: Note = None,
    as_json: JsonFlag = False,
) -> None:
    """Take an escalated task: it shows as claimed by you (or --by)."""
    task_id, actor = parse_number(task_text, "task id"), _actor(by)
    current_client(ctx).claim(task_id, by=actor, note=note)
    _moved(task_id, "claim", actor, as_json)


@app.command()
@command
def unclaim(
    ctx: typer.Context,
    task_text: TaskArg,
    by: By = None,
    note: Note = None,
    as_json: JsonFlag = False,
) -> None:
    """Give a claimed escalated task back to the inbox."""
    task_id, actor = parse_number(task_text, "task id"), _actor(by)
    current_client(ctx).unclaim(task_id, by=actor, note=note)
    _moved(task_id, "unclaim", actor, as_json)


@app.command()
@command
def resolve(
    ctx: typer.Context,
    task_text: TaskArg,
    result: Annotated[str, typer.Option("--result", help="The result, a JSON object.")],
    by: By = None,
    note: Note = None,
    as_json: JsonFlag = False,
) -> None:
    """Close an escalated task with the result you worked out: it becomes completed."""
    task_id, actor = parse_number(task_text, "task id"), _actor(by)
    value = _json_option(result, ResultRejected)
    current_client(ctx).resolve(task_id, value, by=actor, note=note)
    _moved(task_id, "resolve", actor, as_json)


@app.command()
@command
def reopen(
    ctx: typer.Context,
    task_text: TaskArg,
    payload: Annotated[
        str | None,
        typer.Option("--payload", help="JSON object merged into the task's payload."),
    ] = None,
    by: By = None,
    note: Note = None,
    as_json: JsonFlag = False,
) -> None:
    """Hand an escalated task back to the agents (pending again), with more payload."""
    task_id, actor = parse_number(task_text, "task id"), _actor(by)
    fields = _json_option(payload, InvalidPayload)
    current_client(ctx).reopen(task_id, payload=fields, by=actor, note=note)
    _moved(task_id, "reopen", actor, as_json)


@app.command()
@command
def reject(
    ctx: typer.Context,
    task_text: TaskArg,
    reason: Annotated[str, typer.Option("--reason", help="Why the task fails.")],
    by: By = None,
    note: Note = None,
    as_json: JsonFlag = False,
) -> None:
    """Close an escalated task as failed, with a reason."""
    task_id, actor = parse_number(task_text, "task id"), _actor(by)
    current_client(ctx).reject(task_id, reason, by=actor, note=note)
    _moved(task_id, "reject", actor, as_json)


# -- cancel and retry: one task, or many by filter ------------------------------------------


def _one_task(event: str, task_text: str | None, flt: _Filter, dry_run: bool) -> int | None:
    """The id to act on, or None for a bulk move. Raises InputError unless exactly one of
    a task id and ``--status`` is given, and filters come only with ``--status``."""
    if task_text is not None and flt.status:
        raise InputError(f"give a task id or --status, not both ({event} one task or many)")
    if task_text is None:
        if not flt.status:
            raise InputError(f"give a task id, or --status (and filters) to {event} many")
        return None
    extra = flt.given() + (["--dry-run"] if dry_run else [])
    if extra:
        raise InputError(f"{', '.join(extra)} go with --status (a bulk {event}), not a task id")
    return parse_number(task_text, "task id")


@contextmanager
def _progress_bar(verb: str) -> Iterator[Progress | None]:
    """A progress bar on stderr when stderr is a terminal; its update function."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    with Bar(
        TextColumn(verb),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        job = bar.add_task(verb, total=None)

        def update(done: int, total: int) -> None:
            bar.update(job, completed=done, total=total)

        yield update


@dataclass(frozen=True, slots=True)
class _Act:
    """The options of ``cancel`` and ``retry`` besides the task or filter, as typed."""

    reason: str | None
    dry_run: bool
    by: str | None
    note: str | None
    as_json: bool


def _one_or_many(
    ctx: typer.Context, event: str, task_text: str | None, flt: _Filter, act: _Act
) -> None:
    """``event`` (cancel or retry) on the task ``task_text`` names, or on every task
    ``flt`` matches (``--status`` given). Raises InputError (both or neither given)."""
    task_id = _one_task(event, task_text, flt, act.dry_run)
    if task_id is None:
        chosen = flt.task_filter()
        trail = current_client(ctx)
        _bulk(
            event,
            lambda progress: trail.bulk(
                event,
                chosen,
                reason=act.reason,
                dry_run=act.dry_run,
                by=act.by,
                note=act.note,
                progress=progress,
            ),
            act.dry_run,
            act.as_json,
        )
        return
    actor = _actor(act.by)
    trail = current_client(ctx)
    if event == "cancel":
        trail.cancel(task_id, reason=act.reason, by=actor, note=act.note)
    else:
        trail.retry(task_id, by=actor, note=act.note)
    _moved(task_id, event, actor, act.as_json)


def _bulk(
    event: str, run: Callable[[Progress | None], BulkResult], dry_run: bool, as_json: bool
) -> None:
    done = _DONE[event][0]
    if dry_run:
        result = run(None)
    else:
        with _progress_bar(f"{event}:") as progress:
            result = run(progress)
    if as_json:
        print_json(result.to_dict())
        return
    if result.dry_run:
        ids = ", ".join(str(i) for i in result.first_ids)
        if result.matched > len(result.first_ids):
            ids += ", ..."
        which = f"; first ids: {ids}" if ids else ""
        line = f"dry run: {_tasks(result.matched)} would be {done}{which}; nothing changed"
    else:
        line = f"{done} {_tasks(result.moved)}"
        if result.skipped:
            line += f"; {result.skipped:,} skipped (moved on meanwhile)"
    out.print(line, markup=False, highlight=False)


def _tasks(n: int) -> str:
    return f"{n:,} task" if n == 1 else f"{n:,} tasks"


@app.command()
@command
def cancel(
    ctx: typer.Context,
    task_text: TaskOrFilter = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why.")] = None,
    status: Statuses = None,
    task_type: TaskType = None,
    client: Client = None,
    agent: Agent = None,
    since: Since = None,
    dry_run: DryRun = False,
    by: By = None,
    note: Note = None,
    as_json: JsonFlag = False,
) -> None:
    """Cancel a pending, assigned or in-progress task, or every one a filter matches."""
    flt = _Filter(status, task_type, client, agent, since)
    _one_or_many(ctx, "cancel", task_text, flt, _Act(reason, dry_run, by, note, as_json))


@app.command()
@command
def retry(
    ctx: typer.Context,
    task_text: TaskOrFilter = None,
    status: Statuses = None,
    task_type: TaskType = None,
    client: Client = None,
    agent: Agent = None,
    since: Since = None,
    dry_run: DryRun = False,
    by: By = None,
    note: Note = None,
    as_json: JsonFlag = False,
) -> None:
    """Send a failed task back to pending, or every failed task a filter matches."""
    flt = _Filter(status, task_type, client, agent, since)
    _one_or_many(ctx, "retry", task_text, flt, _Act(None, dry_run, by, note, as_json))
