"""Dead-letter commands: ``dead`` (list, newest first) and ``dead purge``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from orchestration.ops.cli.app import (
    JsonFlag,
    command,
    current_settings,
    dead_app,
    out,
    print_json,
)


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

    store = store_for(current_settings(ctx))
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
def dead_purge(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Remove every dead letter; prints how many."""
    from rich.text import Text

    from orchestration.messaging.deadletters import close_store, store_for

    store = store_for(current_settings(ctx))
    try:
        count = store.purge()
    finally:
        close_store(store)
    if as_json:
        print_json({"purged": count})
        return
    out.print(Text(f"purged {count} dead letters from {store.where}"))
