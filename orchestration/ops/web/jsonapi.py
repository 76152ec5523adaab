"""The JSON mirrors: ``/api/tasks`` is ``taskrail list --json`` (same filters as
``/tasks``), ``/api/tasks/{id}`` is ``taskrail show --json``. An error is
``{"error": "<one line>"}`` with the page's status (400, 404, 503)."""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestration.ops.web.app import console_of
from orchestration.ops.web.pages import list_page, read_task
from orchestration.ops.web.queries import ListQuery, task_id_from


class CliJson(JSONResponse):
    """JSON as ``taskrail ... --json`` writes it (``json.dumps``, non-ASCII escaped: a
    stored lone surrogate cannot break the response)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=str).encode("ascii")


async def list_tasks(request: Request) -> Response:
    """``[TaskRecord.to_dict(), ...]``, newest first; a ``Link: <...>; rel="next"`` header
    when there is a next page."""
    query = ListQuery.parse(request.query_params)
    found, more = await run_in_threadpool(list_page, console_of(request).trail, query)
    headers = {}
    if more:
        headers["Link"] = f'</api/tasks?{query.link(after=found[-1].id)}>; rel="next"'
    return CliJson([task.to_dict() for task in found], headers=headers)


async def show_task(request: Request) -> Response:
    """``{"task": TaskRecord.to_dict(), "history": [EventRecord.to_dict(), ...]}``."""
    task_id = task_id_from(request.path_params["task_id"])
    task, history = await run_in_threadpool(read_task, console_of(request).trail, task_id)
    return CliJson({"task": task.to_dict(), "history": [e.to_dict() for e in history]})


def routes() -> list[Route]:
    return [
        Route("/api/tasks", list_tasks, methods=["GET"]),
        Route("/api/tasks/{task_id}", show_task, methods=["GET"]),
    ]
