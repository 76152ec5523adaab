"""The console's pages (GET): the overview, the task list, a task, the escalation inbox.

Each reads through the producer API (blocking calls, run on Starlette's thread pool)
and renders a template. A bad filter or id renders the page with the error's one line
and a 400 (404 for a task that does not exist), never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestration.api import Taskrail
from orchestration.breakers import BreakerInfo
from orchestration.errors import InputError, TaskrailError
from orchestration.models import TaskStatus
from orchestration.ops.status import StatusReport, status_report
from orchestration.ops.web.app import Console, console_of, error_line, status_for
from orchestration.ops.web.chart import Chart, bar_chart, hourly_throughput
from orchestration.ops.web.queries import ListQuery, task_id_from
from orchestration.store.records import EventRecord, TaskRecord

# The inbox shows this many escalated tasks, the unclaimed first, then the oldest
# (Taskrail.inbox: two reads of small partial indexes).
INBOX_ROWS = 200

DONE = {
    "claim": "Task {id} is yours: claimed.",
    "unclaim": "Task {id} is back in the inbox: unclaimed.",
    "resolve": "Task {id} resolved: completed with your result.",
    "reopen": "Task {id} reopened: back to the agents.",
    "reject": "Task {id} rejected: failed.",
    "cancel": "Task {id} cancelled.",
    "retry": "Task {id} retried: back to the agents.",
}
BREAKER_RESET = "Breaker {name} reset: it is closed."


def flash_for(request: Request, task_id: int | None = None) -> str | None:
    """The message of a move just made (``?done=<event>``), from a fixed list: the
    query string never puts words of its own on the page."""
    done = request.query_params.get("done")
    if done == "reset":
        return "Breaker reset: it is closed."
    if done not in DONE:
        return None
    if task_id is None:
        text = request.query_params.get("task", "")
        task_id = int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None
    return DONE[done].format(id=task_id) if task_id is not None else None


# -- the overview --------------------------------------------------------------------------


@dataclass
class Overview:
    report: StatusReport
    chart: Chart
    breakers: list[BreakerInfo]
    breakers_error: str | None
    breakers_shared: bool


def breakers_view(console: Console) -> tuple[list[BreakerInfo], str | None]:
    """The breakers, or none and why (Redis down): the rest of the page still shows."""
    try:
        return console.breakers.list(), None
    except TaskrailError as err:
        return [], error_line(err)


def _overview(console: Console) -> Overview:
    trail = console.trail
    report = status_report(
        trail.db,
        redrive_after_s=trail.settings.redrive_after_s,
        sweep_interval_s=trail.settings.sweep_interval_s,
    )
    bins, states = hourly_throughput(trail.db, now=report.at)
    infos, why = breakers_view(console)
    return Overview(report, bar_chart(bins, states), infos, why, console.breakers.shared)


async def render_overview(
    request: Request,
    *,
    status_code: int = 200,
    error: str | None = None,
    flash: str | None = None,
) -> Response:
    console = console_of(request)
    view = await run_in_threadpool(_overview, console)
    return console.render(
        request, "overview.html", status_code, view=view, error=error, flash=flash
    )


async def overview(request: Request) -> Response:
    return await render_overview(request, flash=flash_for(request))


# -- the task list -------------------------------------------------------------------------


def list_page(trail: Taskrail, query: ListQuery) -> tuple[list[TaskRecord], bool]:
    found = trail.list_tasks(**query.api(), limit=query.limit, after=query.after)
    more = len(found) == query.limit and bool(
        trail.list_tasks(**query.api(), limit=1, after=found[-1].id)
    )
    return found, more


async def tasks(request: Request) -> Response:
    console = console_of(request)
    try:
        query = ListQuery.parse(request.query_params)
        found, more = await run_in_threadpool(list_page, console.trail, query)
    except InputError as err:
        return console.render(
            request,
            "tasks.html",
            status_for(err),
            error=error_line(err),
            query=None,
            raw=request.query_params,
            tasks=[],
            next_link=None,
        )
    next_link = query.link(after=found[-1].id) if more else None
    return console.render(
        request,
        "tasks.html",
        query=query,
        raw=request.query_params,
        tasks=found,
        next_link=next_link,
    )


# -- one task ------------------------------------------------------------------------------


def read_task(trail: Taskrail, task_id: int) -> tuple[TaskRecord, list[EventRecord]]:
    return trail.get(task_id), trail.history(task_id)


async def render_task(
    request: Request,
    task_id: int,
    *,
    status_code: int = 200,
    error: str | None = None,
    form: dict[str, Any] | None = None,
    flash: str | None = None,
) -> Response:
    """The task page (raises TaskNotFound: the error page answers 404)."""
    console = console_of(request)
    task, history = await run_in_threadpool(read_task, console.trail, task_id)
    return console.render(
        request,
        "task.html",
        status_code,
        task=task,
        history=history,
        moves=moves_for(task),
        error=error,
        form=form or {},
        flash=flash,
    )


def moves_for(task: TaskRecord) -> list[str]:
    """The moves a person may make on ``task`` in its state (the forms the page shows)."""
    if task.status is TaskStatus.ESCALATED:
        return ["claim", "unclaim", "resolve", "reopen", "reject"]
    if task.status.is_active:
        return ["cancel"]
    if task.status is TaskStatus.FAILED:
        return ["retry"]
    return []


async def task(request: Request) -> Response:
    task_id = task_id_from(request.path_params["task_id"])
    return await render_task(request, task_id, flash=flash_for(request, task_id))


# -- the escalation inbox ------------------------------------------------------------------


@dataclass
class Inbox:
    tasks: list[TaskRecord]
    total: int


def read_inbox(trail: Taskrail) -> Inbox:
    """Escalated tasks, the unclaimed first, then the oldest first (by id)."""
    tasks, total = trail.inbox(limit=INBOX_ROWS)
    return Inbox(tasks, total)


async def render_inbox(
    request: Request,
    *,
    status_code: int = 200,
    error: str | None = None,
    flash: str | None = None,
    form: dict[str, Any] | None = None,
) -> Response:
    console = console_of(request)
    inbox = await run_in_threadpool(read_inbox, console.trail)
    return console.render(
        request,
        "escalations.html",
        status_code,
        inbox=inbox,
        error=error,
        flash=flash,
        form=form or {},
    )


async def escalations(request: Request) -> Response:
    return await render_inbox(request, flash=flash_for(request))


def routes() -> list[Route]:
    return [
        Route("/", overview, methods=["GET"]),
        Route("/tasks", tasks, methods=["GET"]),
        Route("/tasks/{task_id}", task, methods=["GET"]),
        Route("/escalations", escalations, methods=["GET"]),
    ]
