"""Task commands: ``submit``, ``show``, ``status`` (``list``, ``retry`` and the people's
moves are in :mod:`.people`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.columns import Columns
from rich.table import Table

from orchestration.errors import InfrastructureError, InvalidPayload
from orchestration.ops.cli.app import (
    STATUS_STYLE,
    JsonFlag,
    app,
    command,
    current_client,
    out,
    print_json,
)
from orchestration.ops.cli_edge import literal, parse_number
from orchestration.redact import redact_text


@app.command()
@command
def submit(
    ctx: typer.Context,
    task_type: Annotated[str, typer.Argument(help="Task type, e.g. personal_tax.")],
    client: Annotated[str, typer.Option("--client", help="Client id (an integer).")],
    payload: Annotated[str | None, typer.Option("--payload", help="JSON object.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Submit a task; prints its id."""
    client_id = parse_number(client, "client id")
    data = None
    if payload is not None:
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise InvalidPayload(f"not valid JSON: {exc}") from None
    task_id = current_client(ctx).submit(task_type, client_id, data, idempotency_key=key)
    if as_json:
        print_json({"id": task_id})
    else:
        out.print(task_id)


@app.command()
@command
def show(
    ctx: typer.Context,
    task_text: Annotated[str, typer.Argument(metavar="TASK_ID", help="Task id.")],
    as_json: JsonFlag = False,
) -> None:
    """Show a task and its history."""
    task_id = parse_number(task_text, "task id")
    trail = current_client(ctx)
    task = trail.get(task_id)
    history = trail.history(task_id)
    if as_json:
        print_json({"task": task.to_dict(), "history": [e.to_dict() for e in history]})
        return
    # Stored text is printed as stored (literal()): a payload's "[red]" is not a style.
    t = Table(show_header=False, box=None)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    for name, value in task.to_dict().items():
        if isinstance(value, dict | list):
            value = json.dumps(value, ensure_ascii=False)
        style = STATUS_STYLE.get(value, "white") if name == "status" else ""
        t.add_row(literal(name, "bold"), literal(value, style))
    out.print(t)
    h = Table(title=f"history of task {task_id}")
    for col in ("at", "event", "from", "to", "actor", "agent", "worker", "detail", "note"):
        h.add_column(col, overflow="fold")
    for e in history:
        h.add_row(
            *(
                literal(cell)
                for cell in (
                    e.at.isoformat(timespec="milliseconds"),
                    e.event,
                    e.from_status.value,
                    e.to_status.value,
                    e.actor,
                    e.agent,
                    e.worker,
                    e.detail,
                    e.note,
                )
            )
        )
    out.print(h)


@app.command()
@command
def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """One screen: tasks by state, throughput, tasks not moving and why, the sweeper."""
    from orchestration.ops.cli.operations import BREAKER_STYLE, breaker_infos
    from orchestration.ops.status import status_report

    trail = current_client(ctx)
    report = status_report(
        trail.db,
        redrive_after_s=trail.settings.redrive_after_s,
        sweep_interval_s=trail.settings.sweep_interval_s,
    )
    doc = report.to_dict()

    try:
        infos = breaker_infos(trail.settings)
        doc["breakers"] = [info.to_dict() for info in infos]
    except InfrastructureError as exc:  # the rest of the screen is still worth showing
        infos = []
        doc["breakers"] = []
        doc["breakers_error"] = redact_text(str(exc))
    if as_json:
        print_json(doc)
        return
    at = report.at.strftime("%Y-%m-%d %H:%M:%S UTC")
    out.print(f"[bold]taskrail status[/]  {trail.db.where}  {at}")
    states = Table(title="tasks by state", title_justify="left")
    states.add_column("state")
    states.add_column("tasks", justify="right")
    for state, n in report.counts.items():
        states.add_row(f"[{STATUS_STYLE.get(state, 'white')}]{state}[/]", str(n))
    states.add_row("[bold]total[/]", f"[bold]{report.total}[/]")
    rates = Table(title="finished per minute", title_justify="left")
    rates.add_column("state")
    windows = [f"{w}m" for w in report.throughput.windows_min]
    for window in windows:
        rates.add_column(f"last {window}", justify="right")
    for state in report.throughput.states:
        per_min = report.throughput.per_min(state)
        style = STATUS_STYLE.get(state, "white")
        rates.add_row(f"[{style}]{state}[/]", *(f"{per_min[w]:g}" for w in windows))
    out.print(Columns([states, rates], padding=(0, 4)))
    for line in _not_moving_lines(doc, trail.settings.redrive_after_s):
        out.print(line)
    if "breakers_error" in doc:
        out.print(f"[red]breakers:[/] {doc['breakers_error']}")
    else:
        not_closed = [i for i in infos if i.state != "closed"]
        summary = ", ".join(
            f"[{BREAKER_STYLE.get(i.state, 'white')}]{i.name} {i.state}[/]" for i in not_closed
        )
        out.print(f"breakers: {len(infos)}, " + (summary or "all closed"))


def _not_moving_lines(doc: dict[str, Any], redrive_after_s: float) -> list[str]:
    """``taskrail status``'s lines on stuck, over-time-limit and deferred tasks, the sweeper."""
    stuck, over, deferred, sweeper = (
        doc[k] for k in ("stuck", "over_time_limit", "deferred", "sweeper")
    )
    lines = []
    if stuck["count"]:
        queued = (
            f"; {stuck['preclaimed']} of them pre-claimed (their execute message is queued, "
            "or lost: re-driven once the execute queue is empty)"
            if stuck["preclaimed"]
            else ""
        )
        lines.append(
            f"[yellow]stuck:[/] {stuck['count']} tasks with nothing in flight for over "
            f"{redrive_after_s:g}s (no live lease, no re-drive, no retry due); oldest "
            f"{stuck['oldest_age_s']}s{queued}. The sweeper re-drives them; "
            "`taskrail sweep` does it now"
        )
    else:
        lines.append("stuck: none")
    if over["count"]:
        lines.append(
            f"[yellow]over time limit:[/] {over['count']} tasks running under a live lease "
            f"past their agent's time limit; oldest {over['oldest_age_s']}s"
        )
    if deferred["count"]:
        lines.append(
            f"deferred: {deferred['count']} tasks waiting on an open breaker or a retry "
            f"backoff (not stuck); longest deferral {deferred['longest_deferral_s']}s"
        )
    every = f"every {sweeper['interval_s']:g} s"
    if sweeper["last_run_at"] is None:
        lines.append(f"[red]sweeper: never ran ({every}); is `celery -A workers beat` running?[/]")
    else:
        ran = (
            f"sweeper: last ran {sweeper['age_s']:g} s ago ({every}), re-drove "
            f"{sweeper['redriven']} in {sweeper['duration_s']:g} s"
        )
        late = "; late: is `celery -A workers beat` running?"
        lines.append(f"[red]{ran}{late}[/]" if sweeper["late"] else ran)
    return lines
