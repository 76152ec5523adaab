"""The ``taskrail`` command line: producers submit, operators look and act.

Every read command takes ``--json`` and then prints one JSON document on stdout.
Errors print one line on stderr (never a traceback, never a password) and exit
non-zero: 2 for bad input, 1 for a server that cannot be reached.
"""

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from orchestration.errors import InputError, InvalidPayload, TaskrailError
from orchestration.logging import configure_logging
from orchestration.redact import redact_text
from orchestration.settings import get_settings

app = typer.Typer(
    name="taskrail",
    help="Drive domain tasks through a validated lifecycle on Celery workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]

STATUS_STYLE = {
    "pending": "white",
    "assigned": "cyan",
    "in_progress": "blue",
    "completed": "green",
    "failed": "red",
    "escalated": "yellow",
}


@contextmanager
def errors_as_exit() -> Iterator[None]:
    """Turn taskrail's errors into one line on stderr and an exit code."""
    try:
        yield
    except InputError as exc:
        err.print(f"error: {redact_text(str(exc))}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    except TaskrailError as exc:
        err.print(f"error: {redact_text(str(exc))}", markup=False, highlight=False)
        raise typer.Exit(1) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _client() -> Any:
    from orchestration import api

    return api.client()


def command(func: Callable[..., None]) -> Callable[..., None]:
    """Wrap a command so that taskrail's errors exit cleanly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with errors_as_exit():
            func(*args, **kwargs)

    return wrapper


@app.callback()
def _main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format, "WARNING")


@app.command()
@command
def submit(
    task_type: Annotated[str, typer.Argument(help="Task type, e.g. personal_tax.")],
    client: Annotated[str, typer.Option("--client", help="Client id (an integer).")],
    payload: Annotated[str | None, typer.Option("--payload", help="JSON object.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Submit a task; prints its id."""
    from orchestration.errors import InvalidClientId

    try:
        client_id = int(client.strip())
    except ValueError:
        raise InvalidClientId(client) from None
    data = None
    if payload is not None:
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise InvalidPayload(f"not valid JSON: {exc}") from None
    task_id = _client().submit(task_type, client_id, data, idempotency_key=key)
    if as_json:
        print_json({"id": task_id})
    else:
        out.print(task_id)


@app.command()
@command
def show(
    task_id: Annotated[int, typer.Argument(help="Task id.")],
    as_json: JsonFlag = False,
) -> None:
    """Show a task and its history."""
    trail = _client()
    task = trail.get(task_id)
    history = trail.history(task_id)
    if as_json:
        print_json({"task": task.to_dict(), "history": [e.to_dict() for e in history]})
        return
    t = Table(show_header=False, box=None)
    for name, value in task.to_dict().items():
        if name == "status":
            value = f"[{STATUS_STYLE.get(value, 'white')}]{value}[/]"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        t.add_row(f"[bold]{name}[/]", "" if value is None else str(value))
    out.print(t)
    h = Table(title=f"history of task {task_id}")
    for col in ("at", "event", "from", "to", "agent", "worker", "detail"):
        h.add_column(col)
    for e in history:
        h.add_row(
            e.at.isoformat(timespec="milliseconds"),
            e.event,
            e.from_status.value,
            e.to_status.value,
            e.agent or "",
            e.worker or "",
            e.detail or "",
        )
    out.print(h)


@app.command()
@command
def status(as_json: JsonFlag = False) -> None:
    """Counts by state and stuck tasks."""
    from orchestration.recovery import stuck_summary

    trail = _client()
    counts = trail.counts()
    stuck = stuck_summary(trail.db, redrive_after_s=trail.settings.redrive_after_s).to_dict()
    if as_json:
        print_json({"counts": counts, "total": sum(counts.values()), "stuck": stuck})
        return
    t = Table(title="tasks by state")
    t.add_column("state")
    t.add_column("tasks", justify="right")
    for state, n in counts.items():
        t.add_row(f"[{STATUS_STYLE.get(state, 'white')}]{state}[/]", str(n))
    t.add_row("[bold]total[/]", f"[bold]{sum(counts.values())}[/]")
    out.print(t)
    if stuck["count"]:
        out.print(
            f"[yellow]stuck:[/] {stuck['count']} active tasks unchanged for over "
            f"{trail.settings.redrive_after_s:g}s; oldest {stuck['oldest_age_s']}s"
        )
    else:
        out.print("stuck: none")


@app.command()
@command
def sweep(as_json: JsonFlag = False) -> None:
    """Re-drive, once, the tasks nothing drives any more (the beat job does this on a schedule)."""
    from orchestration.recovery import sweep as sweep_once

    trail = _client()
    redriven = sweep_once(
        trail.db,
        trail.dispatcher,
        redrive_after_s=trail.settings.redrive_after_s,
        batch=trail.settings.sweep_batch,
    )
    if as_json:
        print_json(
            {
                "redriven": [
                    {"task_id": r.task_id, "status": r.status.value, "hop": r.hop} for r in redriven
                ]
            }
        )
        return
    out.print(f"re-drove {len(redriven)} tasks")
    for r in redriven:
        out.print(f"  task {r.task_id}: {r.status.value} -> {r.hop}")


@app.command()
@command
def retry(task_id: Annotated[int, typer.Argument(help="Id of a failed task.")]) -> None:
    """Send a failed task back to pending."""
    _client().retry(task_id)
    out.print(f"task {task_id} is pending again")


@app.command()
@command
def demo(
    n: Annotated[int, typer.Option("-n", "--tasks", min=1, help="How many demo tasks.")] = 60,
    spawn: Annotated[
        int,
        typer.Option(
            "--workers", min=0, help="Worker processes to start (server mode; 0: use running ones)."
        ),
    ] = 2,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Give up after this many seconds.")
    ] = 600.0,
    as_json: JsonFlag = False,
) -> None:
    """Run demo tasks to a final state and print the outcome and throughput."""
    from orchestration.demo import render, run_demo

    settings = get_settings()
    if not as_json:
        where = "embedded (SQLite, in-process worker)" if settings.embedded else "servers"
        out.print(f"taskrail demo: {n} tasks on {where}; {settings.describe()['database_url']}")
    result = run_demo(
        n,
        console=err if as_json else out,
        spawn=spawn,
        timeout_s=timeout,
        show_progress=not as_json,
    )
    if as_json:
        print_json(result.to_dict())
    else:
        render(result, out)
    if result.counts != {k: v for k, v in result.expected.items() if v}:
        err.print("error: final states differ from the expected ones", markup=False)
        raise typer.Exit(1)


@db_app.command("upgrade")
@command
def db_upgrade() -> None:
    """Apply every schema migration (Alembic)."""
    from orchestration.db import Database

    settings = get_settings()
    database = Database(settings.effective_database_url)
    database.upgrade()
    out.print(f"schema is current on {database.where}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
