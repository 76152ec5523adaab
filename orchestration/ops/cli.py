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
from rich.columns import Columns
from rich.table import Table

from orchestration.errors import InvalidPayload, TaskrailError
from orchestration.logging import configure_logging
from orchestration.ops.cli_edge import (
    exit_code,
    literal,
    make_console,
    parse_number,
    print_error,
    settings_error,
)
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
breakers_app = typer.Typer(
    help="Circuit breakers: list them (default) or reset one.", invoke_without_command=True
)
app.add_typer(breakers_app, name="breakers")

out = make_console()
err = make_console(stderr=True)

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
    except TaskrailError as exc:
        print_error(err, str(exc))
        raise typer.Exit(exit_code(exc)) from None


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
    from pydantic import ValidationError

    with errors_as_exit():
        try:
            settings = get_settings()
        except ValidationError as exc:
            raise settings_error(exc) from None
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
    client_id = parse_number(client, "client id")
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
    task_text: Annotated[str, typer.Argument(metavar="TASK_ID", help="Task id.")],
    as_json: JsonFlag = False,
) -> None:
    """Show a task and its history."""
    task_id = parse_number(task_text, "task id")
    trail = _client()
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
    for col in ("at", "event", "from", "to", "agent", "worker", "detail"):
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
                    e.agent,
                    e.worker,
                    e.detail,
                )
            )
        )
    out.print(h)


@app.command()
@command
def status(as_json: JsonFlag = False) -> None:
    """One screen: tasks by state, throughput, tasks not moving and why, the sweeper."""
    from orchestration.ops.status import status_report

    trail = _client()
    report = status_report(
        trail.db,
        redrive_after_s=trail.settings.redrive_after_s,
        sweep_interval_s=trail.settings.sweep_interval_s,
    )
    doc = report.to_dict()
    from orchestration.errors import InfrastructureError

    try:
        infos = breaker_infos()
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
    for state in ("completed", "failed", "escalated"):
        per_min = report.throughput.per_min(state)
        rates.add_row(f"[{STATUS_STYLE[state]}]{state}[/]", *(f"{per_min[w]:g}" for w in windows))
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


@app.command()
@command
def sweep(as_json: JsonFlag = False) -> None:
    """Re-drive, once, the tasks nothing drives any more (the beat job does this on a schedule)."""
    from orchestration.store.recovery import sweep as sweep_once

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
def retry(
    task_text: Annotated[str, typer.Argument(metavar="TASK_ID", help="Id of a failed task.")],
    as_json: JsonFlag = False,
) -> None:
    """Send a failed task back to pending."""
    task_id = parse_number(task_text, "task id")
    _client().retry(task_id)
    if as_json:
        print_json({"id": task_id, "status": "pending"})
    else:
        out.print(f"task {task_id} is pending again", markup=False, highlight=False)


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
    from orchestration.ops.demo import render, run_demo

    settings = get_settings()
    if not as_json:
        where = "embedded (SQLite, in-process worker)" if settings.embedded else "servers"
        out.print(
            f"taskrail demo: {n} tasks on {where}; {settings.describe()['database_url']}",
            markup=False,
            highlight=False,
        )
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


@app.command()
@command
def metrics(
    port: Annotated[
        int | None,
        typer.Option(
            "--port", min=1, max=65535, help="TCP port (default: TASKRAIL_METRICS_PORT, 9808)."
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Address to bind (default: TASKRAIL_METRICS_HOST, 127.0.0.1)."),
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", help="Serve without basic auth (a trusted network only)."),
    ] = False,
) -> None:
    """Serve Prometheus metrics: workers' counters (PROMETHEUS_MULTIPROC_DIR), tasks by state.

    Basic auth with TASKRAIL_METRICS_AUTH=user:password, or --no-auth.
    """
    from orchestration.agents import load_agent_modules
    from orchestration.errors import ConfigurationError
    from orchestration.ops.exposition import make_metrics_server, parse_credentials
    from orchestration.ops.metrics import MULTIPROC_ENV, multiprocess_dir
    from orchestration.store.db import Database

    settings = get_settings()
    if settings.metrics_auth is None and not no_auth:
        raise ConfigurationError(
            "set TASKRAIL_METRICS_AUTH=user:password, or pass --no-auth to serve without auth"
        )
    credentials = (
        None
        if no_auth or settings.metrics_auth is None
        else parse_credentials(settings.metrics_auth.get_secret_value())
    )
    if not multiprocess_dir():
        err.print(
            f"warning: {MULTIPROC_ENV} is not set; only the database gauges are served "
            "(workers record their counters in that shared directory)",
            markup=False,
        )
    load_agent_modules(settings.agents)  # their time limits, for the over-time-limit gauge
    database = Database(settings.effective_database_url, pool_size=1)
    host = host or settings.metrics_host
    port = port or settings.metrics_port
    server = make_metrics_server(
        database,
        host=host,
        port=port,
        credentials=credentials,
        redrive_after_s=settings.redrive_after_s,
        sweep_interval_s=settings.sweep_interval_s,
    )
    auth = "basic auth" if credentials else "NO auth"
    err.print(f"serving metrics on http://{host}:{port}/metrics ({auth})", markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        database.dispose()


def breaker_infos() -> list[Any]:
    """Every breaker in the shared state, plus each registered agent's (closed if unseen)."""
    from orchestration.agents import load_agent_modules, registry
    from orchestration.breakers import BreakerBoard, BreakerInfo

    settings = get_settings()
    load_agent_modules(settings.agents)
    board = BreakerBoard(settings.redis_url, namespace=settings.breaker_namespace)
    try:
        infos = {info.name: info for info in board.list()}
    finally:
        board.close()
    for spec in registry.agents():
        infos.setdefault(
            spec.breaker_name,
            BreakerInfo(
                name=spec.breaker_name,
                state="closed",
                fail_count=0,
                fail_max=spec.fail_max,
                reset_timeout_s=spec.reset_timeout_s,
                opened_at=None,
                next_trial_at=None,
                trial_in_progress=False,
            ),
        )
    return sorted(infos.values(), key=lambda info: info.name)


BREAKER_STYLE = {"closed": "green", "open": "red", "half-open": "yellow"}


@breakers_app.callback()
@command
def breakers(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List every breaker: state, failures, opened at, next trial."""
    if ctx.invoked_subcommand is not None:
        return
    infos = breaker_infos()
    if as_json:
        print_json([info.to_dict() for info in infos])
        return
    t = Table(title="circuit breakers")
    for col in ("name", "state", "failures", "opened at", "next trial"):
        t.add_column(col, overflow="fold")
    for info in infos:
        t.add_row(
            literal(info.name),
            literal(info.state, BREAKER_STYLE.get(info.state, "white")),
            literal(f"{info.fail_count}/{info.fail_max}" if info.fail_max else info.fail_count),
            literal(info.opened_at.isoformat(timespec="seconds") if info.opened_at else ""),
            literal(info.next_trial_at.isoformat(timespec="seconds") if info.next_trial_at else ""),
        )
    out.print(t)
    if get_settings().redis_url is None:
        out.print("note: no TASKRAIL_REDIS_URL; each process keeps its own breaker state")


@breakers_app.command("reset")
@command
def breakers_reset(
    name: Annotated[str, typer.Argument(help="Breaker name, e.g. agent:payroll_agent.")],
) -> None:
    """Close a breaker and zero its failure count, for every worker."""
    from orchestration.agents import load_agent_modules, registry
    from orchestration.breakers import BreakerBoard, BreakerNotFound

    settings = get_settings()
    load_agent_modules(settings.agents)
    board = BreakerBoard(settings.redis_url, namespace=settings.breaker_namespace)
    try:
        board.reset(name)
    except BreakerNotFound:
        # An agent's breaker that no worker has used yet is closed already.
        if name not in {spec.breaker_name for spec in registry.agents()}:
            raise
    finally:
        board.close()
    out.print(f"breaker {name} is closed", markup=False, highlight=False)


# -- dead letters -------------------------------------------------------------------------

dead_app = typer.Typer(
    help="Dead letters (messages on taskrail's queues that were not valid hops): "
    "list them (default) or purge them.",
    invoke_without_command=True,
)
app.add_typer(dead_app, name="dead")


@dead_app.callback()
@command
def dead(
    ctx: typer.Context,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Show at most this many, newest first.")
    ] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List dead letters, newest first: when, queue, reason, the start of the message."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.text import Text

    from orchestration.messaging.deadletters import close_store, excerpt, printable, store_for

    store = store_for(get_settings())
    try:
        entries = store.list(limit)
    finally:
        close_store(store)
    if as_json:
        print_json(entries)
        return
    if not entries:
        out.print(Text(f"no dead letters in {store.where}"))
        return
    t = Table(title=Text(f"dead letters in {store.where}"))
    for col in ("when", "queue", "reason", "excerpt"):
        t.add_column(col, overflow="fold")
    for entry in entries:
        t.add_row(
            Text(printable(str(entry.get("at") or ""), 40)),
            Text(printable(str(entry.get("queue") or ""), 60)),
            Text(printable(str(entry.get("reason") or ""), 200)),
            Text(excerpt(entry, 80)),
        )
    out.print(t)


@dead_app.command("purge")
@command
def dead_purge(as_json: JsonFlag = False) -> None:
    """Remove every dead letter; prints how many."""
    from rich.text import Text

    from orchestration.messaging.deadletters import close_store, store_for

    store = store_for(get_settings())
    try:
        count = store.purge()
    finally:
        close_store(store)
    if as_json:
        print_json({"purged": count})
        return
    out.print(Text(f"purged {count} dead letters from {store.where}"))


@db_app.command("upgrade")
@command
def db_upgrade() -> None:
    """Apply every schema migration (Alembic)."""
    from orchestration.store.db import Database

    settings = get_settings()
    database = Database(settings.effective_database_url)
    database.upgrade()
    out.print(f"schema is current on {database.where}", markup=False, highlight=False)


def main() -> None:
    """The console script: every failure is one line on stderr and an exit code.

    Usage errors exit 2; taskrail's errors as :func:`errors_as_exit` says; anything
    unexpected exits 1 with its type and message (and the traceback, redacted, when
    TASKRAIL_LOG_LEVEL=DEBUG).
    """
    from typer.exceptions import Abort, TyperException

    from orchestration.ops.cli_edge import debug_requested, unexpected_error_line

    try:
        code = app(standalone_mode=False)
    except TyperException as exc:  # usage: a missing option, no such command, ...
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `taskrail`: the help
            message = exc.format_message()  # empty when Rich printed the help itself
            if message:
                sys.stderr.write(message + "\n")
        else:
            print_error(err, exc.format_message())
        code = exc.exit_code
    except Abort:
        print_error(err, "aborted")
        code = 1
    except TaskrailError as exc:
        print_error(err, str(exc))
        code = exit_code(exc)
    except Exception as exc:
        if debug_requested():
            import traceback

            sys.stderr.write(redact_text("".join(traceback.format_exception(exc))))
        print_error(err, unexpected_error_line(exc))
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
