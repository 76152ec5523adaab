"""The web console (``taskrail web``) through Starlette's TestClient, on the embedded
SQLite default (and PostgreSQL where marked): auth on every route, every page, the JSON
mirrors against the CLI's shapes, every move audited under the basic-auth user, CSRF,
bad input (4xx, one line, nothing written), escaping, and random input (never a 500).
The real process in a real browser is tests/integration/test_web_browser.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import escape
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from orchestration.api import Taskrail
from orchestration.errors import ConfigurationError
from orchestration.models import TaskStatus
from orchestration.ops.web import CsrfTokens, create_app, parse_credentials
from orchestration.ops.web.guard import Credentials, same_origin
from orchestration.settings import Settings
from orchestration.store.db import Database
from orchestration.store.transitions import apply_transition
from tests.support import REPO, free_port, run_cli

USER, PASSWORD = "ana", "s3cret: with a colon"
AUTH = (USER, PASSWORD)
AGENT = "personal_tax_agent"
ATTACK = "<script>alert('x')</script>{{ 7*7 }}"
WEB_DIR = REPO / "orchestration" / "ops" / "web"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Web:
    trail: Taskrail
    client: TestClient
    app: Any

    def token(self) -> str:
        page = self.client.get("/escalations")
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text) or re.search(
            r'"X-CSRF-Token": "([^"]+)"', page.text
        )
        assert found, page.text
        return found.group(1)

    def post(self, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        form = {"csrf_token": self.token(), **(data or {})}
        return self.client.post(path, data=form, follow_redirects=False, **kwargs)

    def events(self, task_id: int) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.trail.history(task_id)]

    def escalated(self, reason: str = "missing W-2 for 2025", **payload: Any) -> int:
        task_id = self.trail.submit("personal_tax", 42, {"year": 2025, **payload})
        apply_transition(self.trail.db, task_id, "assign", agent=AGENT)
        apply_transition(self.trail.db, task_id, "start", agent=AGENT)
        apply_transition(self.trail.db, task_id, "escalate", agent=AGENT, reason=reason)
        return task_id

    def failed(self) -> int:
        task_id = self.trail.submit("personal_tax", 43, {"year": 2025})
        apply_transition(self.trail.db, task_id, "assign", agent=AGENT)
        apply_transition(self.trail.db, task_id, "start", agent=AGENT)
        apply_transition(self.trail.db, task_id, "fail", agent=AGENT, reason="tax id mismatch")
        return task_id

    def completed(self) -> int:
        task_id = self.trail.submit("personal_tax", 44)
        apply_transition(self.trail.db, task_id, "assign", agent=AGENT)
        apply_transition(self.trail.db, task_id, "start", agent=AGENT)
        apply_transition(self.trail.db, task_id, "complete", agent=AGENT)
        return task_id

    def pending(self) -> int:
        return self.trail.submit("payroll", 45)


@contextmanager
def open_web(settings: Settings, db: Database | None = None) -> Iterator[Web]:
    trail = Taskrail(settings, db=db)
    app = create_app(trail, Credentials(USER, PASSWORD))
    try:
        with TestClient(app, headers=basic(*AUTH), raise_server_exceptions=False) as client:
            yield Web(trail, client, app)
    finally:
        trail.close()


@pytest.fixture
def web(embedded: Settings) -> Iterator[Web]:
    """The console on the embedded default (SQLite file, file-system broker)."""
    with open_web(embedded) as console:
        yield console


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def any_web(request: pytest.FixtureRequest, embedded: Settings) -> Iterator[Web]:
    """The console on SQLite, and on PostgreSQL."""
    db = request.getfixturevalue("pg_db") if request.param == "postgresql" else None
    with open_web(embedded, db) as console:
        yield console


def sample_paths(app: Any) -> list[tuple[str, str]]:
    """One concrete (method, path) per route of the app, the static files included."""
    found: list[tuple[str, str]] = []
    for route in app.routes:
        if isinstance(route, Mount):
            found += [("GET", "/static/style.css"), ("GET", "/static/htmx.min.js")]
            continue
        assert isinstance(route, Route)
        path = route.path.replace("{task_id}", "1").replace("{move}", "claim")
        found += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return found


# -- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(USER, "wrong"),
        basic("bob", PASSWORD),
        basic(USER, PASSWORD + "x"),
        {"Authorization": "Bearer " + PASSWORD},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},
    ],
    ids=["none", "wrong-password", "wrong-user", "longer", "bearer", "garbage", "no-colon"],
)
def test_every_route_answers_401_without_the_credentials(web: Web, headers: dict[str, str]) -> None:
    task_id = web.escalated()
    before = web.events(task_id)
    paths = [*sample_paths(web.app), ("GET", "/no/such/page"), ("POST", "/no/such/page")]
    assert {"/", "/tasks", "/tasks/1", "/escalations", "/api/tasks", "/api/tasks/1"} <= {
        p for _, p in paths
    }
    with TestClient(web.app, raise_server_exceptions=False) as anonymous:
        for method, path in paths:
            answer = anonymous.request(method, path, headers=headers)
            assert answer.status_code == 401, (method, path)
            assert answer.headers["www-authenticate"].startswith('Basic realm="taskrail console"')
            assert "csrf" not in answer.text.lower()
    assert web.events(task_id) == before


def test_the_credentials_open_every_page_and_static_file(web: Web) -> None:
    for method, path in sample_paths(web.app):
        if method == "GET":
            answer = web.client.get(path)
            assert answer.status_code in (200, 404), path  # 404: no task 1 yet
            assert answer.headers["content-security-policy"].startswith("default-src 'none'")
            assert answer.headers["x-frame-options"] == "DENY"
    htmx = web.client.get("/static/htmx.min.js")
    assert htmx.status_code == 200 and "htmx" in htmx.text[:200]
    assert (WEB_DIR / "static" / "htmx.LICENSE").read_text().startswith("Zero-Clause BSD")


def test_credentials_must_be_user_colon_password() -> None:
    assert parse_credentials("ana:pw:with:colons") == Credentials("ana", "pw:with:colons")
    for bad in ("ana", ":pw", "ana:", "", " ana:pw", "a\x00na:pw", "x" * 200 + ":pw"):
        with pytest.raises(ConfigurationError) as info:
            parse_credentials(bad)
        assert "pw" not in str(info.value).replace("password", "")


def test_web_auth_is_a_secret_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRAIL_WEB_AUTH", "ana:hunter2")
    read = Settings()
    assert read.web_auth is not None and read.web_auth.get_secret_value() == "ana:hunter2"
    assert "hunter2" not in repr(read) and "hunter2" not in str(read.describe())


# -- pages ---------------------------------------------------------------------------------


def test_overview_shows_counts_throughput_and_breakers(any_web: Web) -> None:
    web = any_web
    web.escalated()
    web.failed()
    web.completed()
    cancelled = web.pending()
    web.trail.cancel(cancelled, by="ops")
    page = web.client.get("/")
    assert page.status_code == 200
    for state in TaskStatus:
        assert f'href="/tasks?status={state.value}"' in page.text
    assert re.search(r'<span class="n">1</span>\s*<span class="label">cancelled</span>', page.text)
    assert "<svg" in page.text and 'class="bar s-completed"' in page.text
    assert "3 tasks came to rest" in page.text or "4 tasks came to rest" in page.text
    assert "agent:personal_tax_agent" in page.text
    assert 'action="/breakers/reset"' in page.text


def test_overview_shows_the_database_with_its_password_masked(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql://bob:pg-s3cret@db.example:5432/taskrail",
        data_dir=tmp_path,
        agents=["demo_agents"],
    )
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with open_web(settings, db) as web:
        page = web.client.get("/")
    assert page.status_code == 200
    assert "db.example" in page.text and "pg-s3cret" not in page.text


def test_task_page_shows_the_timeline_the_result_and_the_allowed_moves(web: Web) -> None:
    task_id = web.escalated()
    page = web.client.get(f"/tasks/{task_id}")
    assert page.status_code == 200
    for move in ("claim", "resolve", "reopen", "reject"):
        assert f'action="/tasks/{task_id}/{move}"' in page.text
    assert f'action="/tasks/{task_id}/cancel"' not in page.text
    assert "missing W-2 for 2025" in page.text
    for event in ("assign", "start", "escalate"):
        assert f'class="ev-{event}"' in page.text

    web.post(f"/tasks/{task_id}/claim")
    web.post(f"/tasks/{task_id}/resolve", {"result": '{"refund": 120}', "note": "by phone"})
    page = web.client.get(f"/tasks/{task_id}")
    assert "completed" in page.text and "&#34;refund&#34;: 120" in page.text
    rows = re.findall(r'<tr class="ev-(\w+)">(.*?)</tr>', page.text, re.S)
    assert [name for name, _ in rows] == ["assign", "start", "escalate", "claim", "resolve"]
    assert USER in rows[3][1] and USER in rows[4][1] and "by phone" in rows[4][1]
    assert "<form" not in page.text.split("Timeline")[0].split("</h1>")[1]  # no moves left

    failed, pending = web.failed(), web.pending()
    assert f'action="/tasks/{failed}/retry"' in web.client.get(f"/tasks/{failed}").text
    assert f'action="/tasks/{pending}/cancel"' in web.client.get(f"/tasks/{pending}").text


def test_inbox_lists_unclaimed_first_then_oldest_first(web: Web) -> None:
    first, second, third = web.escalated(), web.escalated(), web.escalated()
    web.completed()
    web.trail.claim(first, by="bob")
    page = web.client.get("/escalations")
    assert page.status_code == 200
    rows = re.findall(r'<tr id="task-(\d+)" class="(\w+)"', page.text)
    assert rows == [(str(second), "unclaimed"), (str(third), "unclaimed"), (str(first), "claimed")]
    assert "3 waiting for a person" in page.text


def test_task_list_filters_like_taskrail_list_and_pages_by_after(web: Web) -> None:
    ids = [web.pending() for _ in range(5)]
    escalated = web.escalated()
    page = web.client.get("/tasks", params={"status": "pending", "limit": "2"})
    assert page.status_code == 200
    shown = [int(i) for i in re.findall(r'<td class="num"><a href="/tasks/(\d+)">', page.text)]
    assert shown == [ids[4], ids[3]]
    next_link = re.search(r'rel="next" href="/tasks\?([^"]+)"', page.text)
    assert next_link and f"after={ids[3]}" in next_link.group(1)
    page = web.client.get("/tasks?" + next_link.group(1).replace("&amp;", "&"))
    shown = [int(i) for i in re.findall(r'<td class="num"><a href="/tasks/(\d+)">', page.text)]
    assert shown == [ids[2], ids[1]]
    last = web.client.get("/tasks", params={"status": "pending", "limit": "2", "after": ids[1]})
    assert 'rel="next"' not in last.text
    both = web.client.get("/api/tasks", params=[("status", "pending"), ("status", "escalated")])
    assert [t["id"] for t in both.json()] == [escalated, *reversed(ids)]
    assert web.client.get("/api/tasks?status=pending,escalated").json() == both.json()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=bogus", "unknown status 'bogus'"),
        ("client=-1", "client id must be an integer"),
        ("client=1.5", "client id must be an integer"),
        ("since=yesterday", "invalid since"),
        ("limit=0", "invalid limit"),
        ("limit=100000", "invalid limit"),
        ("after=abc", "invalid after"),
        ("type=a&type=b", "invalid type: give it once"),
        ("stauts=failed", "unknown 'stauts'"),
        ("type=" + "x" * 65, "invalid task type"),
    ],
)
def test_a_bad_filter_is_a_400_with_its_message(web: Web, query: str, message: str) -> None:
    page = web.client.get(f"/tasks?{query}")
    assert page.status_code == 400
    assert message.replace("'", "&#39;") in page.text
    assert '<form class="filters"' in page.text  # the page, to fix the filter in
    api = web.client.get(f"/api/tasks?{query}")
    assert api.status_code == 400 and message in api.json()["error"]


def test_unknown_or_malformed_task_ids(web: Web) -> None:
    assert web.client.get("/tasks/999").status_code == 404
    assert "no task with id 999" in web.client.get("/tasks/999").text
    assert web.client.get("/api/tasks/999").json() == {"error": "no task with id 999"}
    for bad in ("abc", "-1", "1.0", "99999999999999999999", "%00"):
        page = web.client.get(f"/tasks/{bad}")
        assert page.status_code == 400 and "task id must be an integer" in page.text
        assert web.client.get(f"/api/tasks/{bad}").status_code == 400


# -- the JSON mirrors ----------------------------------------------------------------------


def test_api_shapes_are_the_records_to_dict(any_web: Web) -> None:
    web = any_web
    escalated = web.escalated(note=ATTACK)
    web.trail.claim(escalated, by="bob", note="mine \u2014 \ud800")
    web.pending()
    listed = web.client.get("/api/tasks")
    assert listed.status_code == 200 and listed.headers["content-type"] == "application/json"
    assert listed.json() == [t.to_dict() for t in web.trail.list_tasks()]
    shown = web.client.get(f"/api/tasks/{escalated}").json()
    assert shown == {
        "task": web.trail.get(escalated).to_dict(),
        "history": [e.to_dict() for e in web.trail.history(escalated)],
    }
    assert shown["history"][-1]["note"] == "mine \u2014 \ud800"
    assert listed.headers.get("link") is None
    paged = web.client.get("/api/tasks?limit=1")
    assert paged.headers["link"] == f'</api/tasks?limit=1&after={escalated + 1}>; rel="next"'


def test_api_matches_the_cli_json(web: Web, embedded: Settings) -> None:
    task_id = web.escalated(note=ATTACK)
    web.trail.claim(task_id, by="bob")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(TASKRAIL_AGENTS="demo_agents,tests.agents", PYTHONPATH=str(REPO))
    listed = run_cli(["list", "--json", "--status", "escalated"], env, cwd=Path.cwd())
    shown = run_cli(["show", "--json", str(task_id)], env, cwd=Path.cwd())
    assert listed.returncode == 0 and shown.returncode == 0, listed.stderr + shown.stderr
    assert web.client.get("/api/tasks?status=escalated").json() == json.loads(listed.stdout)
    assert web.client.get(f"/api/tasks/{task_id}").json() == json.loads(shown.stdout)


# -- moves ---------------------------------------------------------------------------------


def _setup(web: Web, move: str) -> int:
    if move in ("cancel",):
        return web.pending()
    if move == "retry":
        return web.failed()
    task_id = web.escalated()
    if move == "unclaim":
        web.trail.claim(task_id, by="bob")
    return task_id


MOVE_CASES = {
    "claim": ({}, "escalated"),
    "unclaim": ({}, "escalated"),
    "resolve": ({"result": '{"refund": 120, "why": "W-2 read from the scan"}'}, "completed"),
    "reopen": ({"payload": '{"w2": "scan-42.pdf"}'}, "pending"),
    "reject": ({"reason": "client withdrew"}, "failed"),
    "cancel": ({"reason": "duplicate"}, "cancelled"),
    "retry": ({}, "pending"),
}


@pytest.mark.parametrize("move", list(MOVE_CASES))
def test_every_move_works_and_is_audited_under_the_user(any_web: Web, move: str) -> None:
    web = any_web
    task_id = _setup(web, move)
    form, status = MOVE_CASES[move]
    # When the person makes the move on the task's page
    answer = web.post(f"/tasks/{task_id}/{move}", {**form, "note": "checked by phone"})
    # Then they are sent back to the task, which says what was done
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/tasks/{task_id}?done={move}"
    page = web.client.get(answer.headers["location"])
    assert 'class="flash ok"' in page.text and f"Task {task_id}" in page.text
    # and the move is made and audited under the basic-auth user, with the note
    task = web.trail.get(task_id)
    assert task.status.value == status
    last = web.trail.history(task_id)[-1]
    assert (last.event, last.actor, last.note) == (move, USER, "checked by phone")
    if move == "claim":
        assert task.claimed_by == USER
    if move == "unclaim":
        assert task.claimed_by is None
    if move == "resolve":
        assert task.result == {"refund": 120, "why": "W-2 read from the scan"}
    if move == "reopen":
        assert task.payload == {"year": 2025, "w2": "scan-42.pdf"}
    if move in ("reject", "cancel"):
        assert task.last_error == form["reason"]


def test_inbox_moves_return_to_the_inbox_or_swap_the_row(web: Web) -> None:
    task_id = web.escalated()
    answer = web.post(f"/tasks/{task_id}/claim", {"back": "escalations"})
    assert answer.headers["location"] == f"/escalations?done=claim&task={task_id}"
    assert f"Task {task_id} is yours" in web.client.get(answer.headers["location"]).text
    # htmx: the token in its header, the row as it is now, and the flash out of band
    token = web.token()
    swapped = web.client.post(
        f"/tasks/{task_id}/resolve",
        data={"back": "escalations", "result": '{"ok": true}'},
        headers={"HX-Request": "true", "X-CSRF-Token": token},
    )
    assert swapped.status_code == 200
    assert swapped.text.lstrip().startswith(f'<tr id="task-{task_id}" class="moved">')
    assert 'hx-swap-oob="true"' in swapped.text and "resolved" in swapped.text
    assert web.trail.get(task_id).status is TaskStatus.COMPLETED
    # an htmx error lands in the flash area, nothing else swapped
    refused = web.client.post(
        f"/tasks/{task_id}/claim",
        data={"back": "escalations"},
        headers={"HX-Request": "true", "X-CSRF-Token": token},
    )
    assert refused.status_code == 409
    assert refused.headers["hx-retarget"] == "#flash"
    assert "only escalated tasks can be claimed" in refused.text


def test_breakers_are_reset_from_the_overview(web: Web) -> None:
    answer = web.post("/breakers/reset", {"name": "agent:personal_tax_agent"})
    assert answer.status_code == 303 and answer.headers["location"] == "/?done=reset"
    assert "Breaker reset" in web.client.get("/?done=reset").text
    unknown = web.post("/breakers/reset", {"name": "agent:nobody"})
    assert unknown.status_code == 400 and "no breaker named &#39;agent:nobody&#39;" in unknown.text
    swapped = web.client.post(
        "/breakers/reset",
        data={"name": "agent:payroll_agent"},
        headers={"HX-Request": "true", "X-CSRF-Token": web.token()},
    )
    assert swapped.status_code == 200 and "agent:payroll_agent" in swapped.text
    assert "<html" not in swapped.text


@pytest.mark.integration
def test_a_shared_breaker_is_reset_for_every_worker(
    embedded: Settings, breaker_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestration.breakers import BreakerBoard
    from tests.support import BREAKER_NAMESPACE

    # Given a breaker opened in the shared state (as a worker would)
    settings = embedded.model_copy(
        update={"redis_url": breaker_redis_url, "breaker_namespace": BREAKER_NAMESPACE}
    )
    board = BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE)
    breaker = board.breaker("agent:payroll_agent", fail_max=5, reset_timeout_s=60)
    breaker.force_open()
    with open_web(settings) as web:
        assert re.search(r"agent:payroll_agent</code></td>\s*<td><span class=\"badge b-open\"",
                         web.client.get("/").text)  # fmt: skip
        # When it is reset in the console
        answer = web.post("/breakers/reset", {"name": "agent:payroll_agent"})
        assert answer.status_code == 303
    # Then it is closed for everyone
    assert (
        BreakerBoard(breaker_redis_url, namespace=BREAKER_NAMESPACE)
        .breaker("agent:payroll_agent", fail_max=5, reset_timeout_s=60)
        .state
        == "closed"
    )
    board.close()


# -- CSRF ----------------------------------------------------------------------------------


def _post_routes(web: Web) -> list[str]:
    return [path for method, path in sample_paths(web.app) if method == "POST"]


@pytest.mark.parametrize(
    "forged",
    ["none", "garbage", "other-user", "other-console", "expired", "future"],
)
def test_a_post_without_a_valid_token_is_403_and_writes_nothing(web: Web, forged: str) -> None:
    task_id = web.escalated()
    before = (web.trail.get(task_id), web.events(task_id))
    now = time.time()
    tokens = {
        "none": None,
        "garbage": "123.abc",
        "other-user": CsrfTokens(Credentials(USER, PASSWORD)).issue("bob"),
        "other-console": CsrfTokens(Credentials(USER, "other")).issue(USER),
        "expired": CsrfTokens(Credentials(USER, PASSWORD), clock=lambda: now - 13 * 3600).issue(
            USER
        ),
        "future": CsrfTokens(Credentials(USER, PASSWORD), clock=lambda: now + 3600).issue(USER),
    }
    token = tokens[forged]
    paths = [p.replace("/1/", f"/{task_id}/") for p in _post_routes(web)]
    assert f"/tasks/{task_id}/claim" in paths and "/breakers/reset" in paths
    for path in [*paths, *(f"/tasks/{task_id}/{m}" for m in MOVE_CASES)]:
        data = {"result": "{}", "reason": "x", "name": "agent:payroll_agent"}
        if token is not None:
            data["csrf_token"] = token
        answer = web.client.post(path, data=data, follow_redirects=False)
        assert answer.status_code == 403, path
        assert "token is missing or out of date" in answer.text
        with_header = web.client.post(
            path, data=data, headers={"X-CSRF-Token": token or "", "HX-Request": "true"}
        )
        assert with_header.status_code == 403, path
    assert (web.trail.get(task_id), web.events(task_id)) == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Referer": "https://evil.example/page"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_a_post_from_another_site_is_403_even_with_a_token(
    web: Web, headers: dict[str, str]
) -> None:
    task_id = web.escalated()
    before = web.events(task_id)
    answer = web.post(f"/tasks/{task_id}/claim", headers=headers)
    assert answer.status_code == 403 and "another site" in answer.text
    assert web.events(task_id) == before
    same = web.post(f"/tasks/{task_id}/claim", headers={"Origin": "http://testserver"})
    assert same.status_code == 303


def test_same_origin_compares_hosts() -> None:
    assert same_origin({"origin": "https://console.example"}, "console.example")
    assert same_origin({"referer": "http://h:8080/tasks/1"}, "h:8080")
    assert same_origin({}, "h:8080")
    assert not same_origin({"origin": "http://h:8081"}, "h:8080")
    assert not same_origin({"origin": "http://[::1"}, "h")
    assert not same_origin({"sec-fetch-site": "cross-site"}, "h")


# -- bad input -----------------------------------------------------------------------------


BAD_MOVES = [
    ("resolve", "escalated", {"result": "not json"}, 400, "not valid JSON"),
    ("resolve", "escalated", {"result": "[1, 2]"}, 400, "must be a JSON object"),
    ("resolve", "escalated", {}, 400, "invalid result: required"),
    ("resolve", "pending", {"result": "{}"}, 409, "only escalated tasks can be resolved"),
    ("reopen", "escalated", {"payload": "[]"}, 400, "must be a JSON object"),
    ("reopen", "escalated", {"payload": "{bad"}, 400, "not valid JSON"),
    ("reject", "escalated", {}, 400, "invalid reason"),
    ("reject", "escalated", {"reason": "   "}, 400, "invalid reason"),
    ("cancel", "completed", {}, 409, "only pending, assigned or in_progress"),
    ("retry", "escalated", {}, 409, "only failed tasks can be retried"),
    ("claim", "pending", {}, 409, "only escalated tasks can be claimed"),
    ("unclaim", "escalated", {}, 409, "is not claimed"),
    ("claim", "claimed", {}, 409, "is claimed by &#39;bob&#39;"),
    ("resolve", "escalated", {"result": "{}", "note": "n" * 4001}, 400, "invalid note"),
    ("cancel", "pending", {"reason": "r" * 4001}, 400, "invalid reason"),
]


@pytest.mark.parametrize(("move", "state", "form", "status", "message"), BAD_MOVES)
def test_a_bad_move_shows_its_message_and_writes_nothing(
    web: Web, move: str, state: str, form: dict[str, str], status: int, message: str
) -> None:
    task_id = {
        "escalated": web.escalated,
        "claimed": web.escalated,
        "pending": web.pending,
        "completed": web.completed,
    }[state]()
    if state == "claimed":
        web.trail.claim(task_id, by="bob")
    before = (web.trail.get(task_id), web.events(task_id))
    answer = web.post(f"/tasks/{task_id}/{move}", form)
    assert answer.status_code == status
    assert message in answer.text
    assert 'class="flash error"' in answer.text and f"Task {task_id}" in answer.text
    assert (web.trail.get(task_id), web.events(task_id)) == before
    # the person's input is kept in the form they sent
    if "result" in form and status == 400:
        assert f">{escape(form['result'])}</textarea>" in answer.text
    # from the inbox, the inbox says it
    inbox = web.post(f"/tasks/{task_id}/{move}", {**form, "back": "escalations"})
    assert inbox.status_code == status and "Escalations" in inbox.text
    assert (web.trail.get(task_id), web.events(task_id)) == before


def test_unknown_task_or_move_is_404_and_a_malformed_id_400(web: Web) -> None:
    task_id = web.escalated()
    before = web.events(task_id)
    assert web.post("/tasks/999/claim").status_code == 404
    assert "no task with id 999" in web.post("/tasks/999/claim").text
    assert web.post("/tasks/abc/claim").status_code == 400
    assert web.post(f"/tasks/{task_id}/explode").status_code == 404
    assert web.client.get(f"/tasks/{task_id}/claim").status_code == 405
    assert web.events(task_id) == before


# -- escaping ------------------------------------------------------------------------------


def test_stored_text_is_escaped_everywhere(web: Web) -> None:
    # Given stored text that is markup and template syntax
    task_id = web.escalated(reason=ATTACK, note=ATTACK)
    web.trail.claim(task_id, by="bob<img src=x onerror=alert(1)>", note=ATTACK + "\ud800")
    for path in ("/", "/tasks", f"/tasks/{task_id}", "/escalations", f"/tasks?type={ATTACK}"):
        page = web.client.get(path)
        assert page.status_code in (200, 400), path
        # Then it shows as text: no tag of its own, the braces as typed
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
    page = web.client.get(f"/tasks/{task_id}")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;{{ 7*7 }}" in page.text
    assert "\\ud800" in page.text  # a lone surrogate shown escaped, not a failed page


def test_no_template_marks_anything_safe() -> None:
    for path in (WEB_DIR / "templates").glob("*.html"):
        text = path.read_text()
        assert not re.search(r"\|\s*safe\b", text), path
        assert "autoescape false" not in text, path
    for path in WEB_DIR.glob("*.py"):
        assert "Markup(" not in path.read_text(), path


# -- random input --------------------------------------------------------------------------

NAMES = st.sampled_from(
    ["status", "type", "client", "agent", "claimed_by", "since", "limit", "after", "done", "task"]
)
TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
VALUES = st.one_of(
    TEXT,
    st.sampled_from(["", "0", "-1", "1h", "escalated", "9" * 30, "1e3", "\x00", "2026-13-01"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)
FIELDS = st.sampled_from(["result", "payload", "note", "reason", "back", "name", "csrf_token"])
JSONISH = st.one_of(
    VALUES,
    st.recursive(
        st.none() | st.booleans() | st.integers() | TEXT,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
        max_leaves=8,
    ).map(json.dumps),
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/", "/tasks", "/tasks/1", "/escalations", "/api/tasks", "/api/tasks/1"])
    | TEXT.map(lambda s: "/tasks/" + quote(s, safe="")),
    params=st.lists(st.tuples(NAMES | TEXT, VALUES), max_size=6),
)
def test_random_queries_never_get_a_500(web: Web, path: str, params: list[Any]) -> None:
    if not web.trail.list_tasks(limit=1):
        web.escalated()
    answer = web.client.get(path, params=params)
    assert answer.status_code < 500, (path, params, answer.text[-500:])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    move=st.sampled_from([*MOVE_CASES, "explode"]),
    which=st.integers(0, 3),
    form=st.dictionaries(FIELDS, JSONISH, max_size=5),
    htmx=st.booleans(),
)
def test_random_forms_never_get_a_500(
    web: Web, move: str, which: int, form: dict[str, str], htmx: bool
) -> None:
    ids = [t.id for t in web.trail.list_tasks(limit=10)]
    if len(ids) < 4:
        ids = [web.escalated(), web.failed(), web.pending(), web.escalated()]
    task_id = ids[which % len(ids)]
    data = {**form}
    data.setdefault("csrf_token", web.token())
    headers = {"HX-Request": "true"} if htmx else {}
    answer = web.client.post(
        f"/tasks/{task_id}/{move}", data=data, headers=headers, follow_redirects=False
    )
    assert answer.status_code < 500, (move, form, answer.text[-500:])
    reset = web.client.post("/breakers/reset", data=data, headers=headers, follow_redirects=False)
    assert reset.status_code < 500, (form, reset.text[-500:])


# -- `taskrail web` --------------------------------------------------------------------------


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(
        TASKRAIL_AGENTS="demo_agents",
        TASKRAIL_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (None, "TASKRAIL_WEB_AUTH is not set"),
        ("", "TASKRAIL_WEB_AUTH must look like user:password"),
        ("ana", "TASKRAIL_WEB_AUTH must look like user:password"),
        ("ana:", "TASKRAIL_WEB_AUTH must look like user:password"),
    ],
)
def test_taskrail_web_refuses_to_start_without_credentials(
    tmp_path: Path, auth: str | None, message: str
) -> None:
    env = _cli_env(tmp_path) if auth is None else _cli_env(tmp_path, TASKRAIL_WEB_AUTH=auth)
    done = run_cli(["web", "--port", str(free_port())], env, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "serving" not in done.stderr and "Traceback" not in done.stderr


def test_taskrail_web_serves_the_console_behind_basic_auth(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    port = free_port()
    env = _cli_env(tmp_path, TASKRAIL_WEB_AUTH=f"{USER}:{PASSWORD}")
    log = tmp_path / "web.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("taskrail")), "web", "--port", str(port)],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        request = urllib.request.Request(url, headers=basic(*AUTH))
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    assert answer.status == 200
                    assert "Tasks by state" in answer.read().decode()
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        # a second console on the same port cannot listen: one line, exit 2
        again = run_cli(["web", "--port", str(port)], env, cwd=tmp_path, timeout=60)
        assert again.returncode == 2 and "cannot listen on 127.0.0.1:" in again.stderr
        assert f"serving the console on {url}" in log.read_text()
        assert PASSWORD not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(20)
