"""Helpers for the deployment tests: the Procfile and compose file, ports, HTTP, processes."""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from honcho.environ import parse_procfile

from tests.support import REPO

# The Procfile's processes the compose file must run with the same command.
SHARED_PROCESSES = ("worker", "executor", "beat", "flower", "metrics")
# Options that say where to listen: a laptop binds loopback, a container every interface.
BIND_OPTIONS = ("--address", "--host")


def procfile() -> dict[str, str]:
    """The Procfile's processes, parsed by honcho itself."""
    return dict(parse_procfile((REPO / "Procfile").read_text()).processes)


def compose() -> dict[str, Any]:
    with open(REPO / "docker-compose.yml") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def command_words(command: str | list[str]) -> list[str]:
    """A service's command as words, without its shell guard and bind-address options.

    The Procfile's ``: "${VAR:?...}" && exec cmd`` guard refuses to start without a
    required variable; compose does the same with ``${VAR:?...}`` in ``environment``.
    """
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if "exec" in words:
        words = words[words.index("exec") + 1 :]
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in BIND_OPTIONS:
            skip = "=" not in word
            continue
        kept.append(word)
    return kept


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, auth: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
    """Status and body of a GET; ``auth`` is ``user:password`` for basic auth."""
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 40.0) -> None:
    """Wait until ``url`` answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if http_get(url, timeout=2)[0] == 200:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}:\n{read(log)[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{url} not answering after {timeout}s:\n{read(log)[-3000:]}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def start_shell(command: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Run a Procfile line as honcho does (``sh -c``), in its own process group."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            shell=True,
            cwd=REPO,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
