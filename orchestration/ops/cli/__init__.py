"""The ``taskrail`` command line: producers submit, operators look and act.

Every read command takes ``--json`` and then prints one JSON document on stdout.
Errors print one line on stderr (never a traceback, never a password) and exit
non-zero: 2 for bad input, 1 for a server that cannot be reached.

The app and its shared parts are in :mod:`.app`; the commands, by concern, in
:mod:`.tasks`, :mod:`.people`, :mod:`.operations` and :mod:`.deadletters`.
"""

from __future__ import annotations

import sys

from orchestration.errors import TaskrailError
from orchestration.ops.cli.app import app, err
from orchestration.ops.cli_edge import exit_code, print_error
from orchestration.redact import redact_text

# The commands register on import, in the order the help lists them.
# isort: off
from orchestration.ops.cli import tasks  # noqa: F401
from orchestration.ops.cli import people  # noqa: F401
from orchestration.ops.cli import operations  # noqa: F401
from orchestration.ops.cli import deadletters  # noqa: F401
from orchestration.ops.cli import web  # noqa: F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """The console script: every failure is one line on stderr and an exit code.

    Usage errors exit 2; taskrail's errors as :func:`.app.errors_as_exit` says; anything
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
