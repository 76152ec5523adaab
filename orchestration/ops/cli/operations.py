"""Operations commands: ``sweep``, ``demo``, ``metrics``, ``breakers``, ``db upgrade``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from orchestration.ops.cli.app import (
    JsonFlag,
    app,
    breakers_app,
    command,
    current_client,
    current_settings,
    db_app,
    err,
    out,
    print_json,
)
from orchestration.ops.cli_edge import literal
from orchestration.settings import Settings


@app.command()
@command
def sweep(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Re-drive, once, the tasks nothing drives any more (the beat job does this on a schedule)."""
    from orchestration.store.recovery import sweep as sweep_once

    trail = current_client(ctx)
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
def demo(
    ctx: typer.Context,
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

    settings = current_settings(ctx)
    if not as_json:
        where = "embedded (SQLite, file-system broker)" if settings.embedded else "servers"
        out.print(
            f"taskrail demo: {n} tasks on {where}; {settings.describe()['database_url']}",
            markup=False,
            highlight=False,
        )
    result = run_demo(
        n,
        settings=settings,
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
    ctx: typer.Context,
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

    settings = current_settings(ctx)
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


def breaker_infos(settings: Settings) -> list[Any]:
    """Every breaker in the shared state, plus each registered agent's (closed if unseen)."""
    from orchestration.ops.breaker_views import opened

    with opened(settings) as views:
        return views.list()


BREAKER_STYLE = {"closed": "green", "open": "red", "half-open": "yellow"}


@breakers_app.callback()
@command
def breakers(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List every breaker: state, failures, opened at, next trial."""
    if ctx.invoked_subcommand is not None:
        return
    infos = breaker_infos(current_settings(ctx))
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
    if current_settings(ctx).redis_url is None:
        out.print("note: no TASKRAIL_REDIS_URL; each process keeps its own breaker state")


@breakers_app.command("reset")
@command
def breakers_reset(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Breaker name, e.g. agent:payroll_agent.")],
) -> None:
    """Close a breaker and zero its failure count, for every worker."""
    from orchestration.ops.breaker_views import opened

    with opened(current_settings(ctx)) as views:
        views.reset(name)
    out.print(f"breaker {name} is closed", markup=False, highlight=False)


@db_app.command("upgrade")
@command
def db_upgrade(ctx: typer.Context) -> None:
    """Apply every schema migration (Alembic)."""
    from orchestration.store.db import Database

    settings = current_settings(ctx)
    database = Database(settings.effective_database_url)
    database.upgrade()
    out.print(f"schema is current on {database.where}", markup=False, highlight=False)
