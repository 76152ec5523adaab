"""The console's moves (POST): a person's move on a task, and a breaker reset.

Every POST is checked before anything else is read from it: its Origin (or Referer)
must be this host, and it must carry the CSRF token of the page it came from (the
``csrf_token`` field, or the ``X-CSRF-Token`` header htmx sends); otherwise 403 and
nothing is done. The person acting is the basic-auth user (``by=`` of every call), so
the audit event names them.

A move that works answers with a redirect (303) to the task or the inbox, whose page
says what was done; from htmx (the inbox's buttons) with the inbox row as it is now.
A move that does not (bad JSON, a wrong state, no such task) answers with the page
and the error's one line (400, 404 or 409), the person's input kept in the form.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from orchestration.api import Taskrail
from orchestration.errors import InvalidField, InvalidNumber, TaskNotFound, TaskrailError
from orchestration.logging import get_logger
from orchestration.ops.web.app import console_of, error_line, status_for
from orchestration.ops.web.guard import CSRF_FIELD, CSRF_HEADER, same_origin
from orchestration.ops.web.pages import (
    BREAKER_RESET,
    DONE,
    breakers_view,
    render_inbox,
    render_overview,
    render_task,
)
from orchestration.ops.web.queries import form_json, form_text, task_id_from

log = get_logger("taskrail.web")

MOVES = ("claim", "unclaim", "resolve", "reopen", "reject", "cancel", "retry")
BACK = ("task", "escalations")
MAX_FORM_BYTES = 2 * 1024 * 1024  # a result of MAX_RESULT_BYTES, form-encoded, fits
MAX_BREAKER_NAME = 200


async def checked_form(request: Request) -> FormData:
    """The POST's form, once it is known to come from one of the console's own pages.

    Raises HTTPException 403 (another origin, no or a bad CSRF token), 413 (too big),
    400 (a form that does not parse).
    """
    if not same_origin(request.headers, request.headers.get("host", "")):
        raise HTTPException(403, "refused: the request came from another site")
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > MAX_FORM_BYTES:
        raise HTTPException(413, f"refused: the form is larger than {MAX_FORM_BYTES} bytes")
    form = await request.form(max_files=0, max_fields=20, max_part_size=MAX_FORM_BYTES)
    token = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not console_of(request).csrf.valid(request.state.user, token):
        raise HTTPException(
            403, "refused: the form's token is missing or out of date; reload the page and retry"
        )
    return form


def apply_move(trail: Taskrail, task_id: int, move: str, form: FormData, by: str) -> None:
    """``move`` on task ``task_id`` with the form's fields, as ``by``.

    Every field is parsed before the API is called: bad input writes nothing. Raises
    what the API raises, and InvalidField for a field that is not JSON.
    """
    note = form_text(form, "note")
    if move == "claim":
        trail.claim(task_id, by=by, note=note)
    elif move == "unclaim":
        trail.unclaim(task_id, by=by, note=note)
    elif move == "resolve":
        trail.resolve(task_id, form_json(form, "result", required=True), by=by, note=note)
    elif move == "reopen":
        payload = form_json(form, "payload", required=False)
        trail.reopen(task_id, payload=payload, by=by, note=note)
    elif move == "reject":
        trail.reject(task_id, form_text(form, "reason") or "", by=by, note=note)
    elif move == "cancel":
        trail.cancel(task_id, reason=form_text(form, "reason"), by=by, note=note)
    elif move == "retry":
        trail.retry(task_id, by=by, note=note)
    else:  # the route lets only MOVES through
        raise InvalidField("move", f"unknown move {move!r}")


def _kept(form: FormData, task_id: int, event: str) -> dict[str, Any]:
    """The person's input, to show again in the form of ``event`` after an error."""
    kept: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str) and k != CSRF_FIELD}
    kept.update(task_id=task_id, event=event)
    return kept


async def move(request: Request) -> Response:
    console = console_of(request)
    form = await checked_form(request)
    event = request.path_params["move"]
    if event not in MOVES:
        raise HTTPException(404, "no such move")
    back = form.get("back")
    back = back if isinstance(back, str) and back in BACK else "task"
    htmx = request.headers.get("hx-request") == "true"
    user = request.state.user
    task_id: int | None = None
    try:
        task_id = task_id_from(request.path_params["task_id"])
        await run_in_threadpool(apply_move, console.trail, task_id, event, form, user)
    except TaskrailError as err:
        status = status_for(err)
        if htmx or task_id is None or isinstance(err, TaskNotFound | InvalidNumber):
            return console.error_page(request, err, status)
        kept = _kept(form, task_id, event)
        if back == "escalations":
            return await render_inbox(request, status_code=status, error=error_line(err), form=kept)
        return await render_task(
            request, task_id, status_code=status, error=error_line(err), form=kept
        )
    log.info("web_move", task_id=task_id, move=event, by=user)
    if htmx and back == "escalations":
        task = await run_in_threadpool(console.trail.get, task_id)
        return console.render(
            request,
            "_inbox_row.html",
            task=task,
            form={},
            oob_flash=DONE[event].format(id=task_id),
        )
    if back == "escalations":
        return RedirectResponse(f"/escalations?done={event}&task={task_id}", status_code=303)
    return RedirectResponse(f"/tasks/{task_id}?done={event}", status_code=303)


async def reset_breaker(request: Request) -> Response:
    console = console_of(request)
    form = await checked_form(request)
    htmx = request.headers.get("hx-request") == "true"
    try:
        name = form_text(form, "name")
        if name is None or len(name) > MAX_BREAKER_NAME:
            raise InvalidField("name", f"a breaker's name, 1 to {MAX_BREAKER_NAME} characters")
        await run_in_threadpool(console.breakers.reset, name)
    except TaskrailError as err:
        if htmx:
            return console.error_page(request, err, status_for(err))
        return await render_overview(request, status_code=status_for(err), error=error_line(err))
    log.info("web_breaker_reset", name=name, by=request.state.user)
    if htmx:
        infos, why = await run_in_threadpool(breakers_view, console)
        return console.render(
            request,
            "_breakers.html",
            breakers=infos,
            breakers_error=why,
            shared=console.breakers.shared,
            oob_flash=BREAKER_RESET.format(name=name),
        )
    return RedirectResponse("/?done=reset", status_code=303)


def routes() -> list[Route]:
    return [
        Route("/tasks/{task_id}/{move}", move, methods=["POST"]),
        Route("/breakers/reset", reset_breaker, methods=["POST"]),
    ]
