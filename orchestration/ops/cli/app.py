"""The ``taskrail`` app: its settings, its consoles, and how a failure ends a command.

The settings are read once, in the app's callback, and kept on the command's context
(:class:`CliState`); each command reads them from there (:func:`current_settings`,
:func:`current_client`).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestration.errors import TaskrailError
from orchestration.logging import configure_logging
from orchestration.ops.cli_edge import exit_code, make_console, print_error, settings_error
from orchestration.settings import Settings, get_settings

if TYPE_CHECKING:
    from orchestration.api import Taskrail

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
dead_app = typer.Typer(
    help="Dead letters (messages on taskrail's queues that were not valid hops): "
    "list them (default) or purge them.",
    invoke_without_command=True,
)
app.add_typer(dead_app, name="dead")

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
    "cancelled": "magenta",
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


@dataclass
class CliState:
    """What one ``taskrail`` invocation shares: its settings, and the producer client
    built from them on first use (closed when the invocation ends)."""

    settings: Settings
    _client: Taskrail | None = field(default=None, repr=False)

    def client(self) -> Taskrail:
        """The invocation's :class:`~orchestration.api.Taskrail`, built on first use."""
        if self._client is None:
            from orchestration.api import Taskrail

            self._client = Taskrail(self.settings)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def state(ctx: typer.Context) -> CliState:
    """The invocation's :class:`CliState` (the app's callback sets it)."""
    found = ctx.find_object(CliState)
    assert found is not None, "the app's callback sets the state before any command runs"
    return found


def current_settings(ctx: typer.Context) -> Settings:
    """The invocation's settings."""
    return state(ctx).settings


def current_client(ctx: typer.Context) -> Taskrail:
    """The invocation's producer client."""
    return state(ctx).client()


def command(func: Callable[..., None]) -> Callable[..., None]:
    """Wrap a command so that taskrail's errors exit cleanly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with errors_as_exit():
            func(*args, **kwargs)

    return wrapper


@app.callback()
def _main(ctx: typer.Context) -> None:
    from pydantic import ValidationError

    with errors_as_exit():
        try:
            read = get_settings()
        except ValidationError as exc:
            raise settings_error(exc) from None
    configure_logging(read.log_format, "WARNING")
    ctx.obj = CliState(read)
    ctx.call_on_close(ctx.obj.close)
