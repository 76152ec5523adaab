"""The console in a real browser: Playwright driving Debian's chromium against a real
``taskrail web`` process, with real Celery workers on PostgreSQL and the session's Redis.

A demo agent escalates a task (``missing_document``); a person opens the inbox, claims
it and resolves it with a result (htmx swapping the row), then reads the task's
timeline: the claim and the resolution under their user name. With
``TASKRAIL_SCREENSHOTS=1`` it also writes the screenshots in docs/screenshots/.

Chromium is ``apt-get install chromium`` (.ci/run installs it); without it the test
fails, it never skips.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo_agents import scenario_for
from orchestration import api
from orchestration.settings import Settings
from tests.support import REPO, WorkerFleet, free_port, taskrail_bin, wait_until_resting

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
USER, PASSWORD = "ana", "console-pw"
SCREENSHOTS = REPO / "docs" / "screenshots"
# Read at import: the settings fixtures clear every TASKRAIL_* variable during a test.
WANT_SCREENSHOTS = os.environ.get("TASKRAIL_SCREENSHOTS") == "1"


def _get(url: str) -> int:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def console(server_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A real ``taskrail web`` process on the test's servers; its base URL."""
    port = free_port()
    log = tmp_path / "web.log"
    # The demo's agents only: the console lists their breakers.
    env = {
        **server_env,
        "TASKRAIL_WEB_AUTH": f"{USER}:{PASSWORD}",
        "TASKRAIL_AGENTS": "demo_agents",
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [taskrail_bin(), "web", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")
            try:
                if _get(f"{base}/api/tasks?limit=1") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        yield base
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _screenshot(page: object, name: str) -> None:
    if WANT_SCREENSHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_a_person_claims_and_resolves_an_escalation_in_a_browser(
    server_settings: Settings, fleet: WorkerFleet, console: str, pg_url: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    # Given real workers and some demo work done, one task escalated by its agent
    fleet.start(concurrency=4)
    fleet.start_beat(extra_env={"TASKRAIL_SWEEP_INTERVAL_S": "1"})  # the overview shows its pass
    demo = api.submit_many(
        {
            "task_type": "personal_tax",
            "client_id": 100 + i,
            "payload": {"scenario": scenario_for(i)},
        }
        for i in range(40)
    )
    task_id = api.submit(
        "payroll", 7, {"scenario": "missing_document", "missing": "the signed W-2 for 2025"}
    )
    statuses = wait_until_resting(pg_url, [*demo, task_id], timeout=120)
    assert statuses[task_id] == "escalated"
    others = [i for i in demo if statuses[i] == "escalated"]
    api.claim(others[0], by="bob", note="calling the client")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD},
                viewport={"width": 1280, "height": 860},
            )
            page = context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None,
            )

            # When the person opens the inbox: the task is there, unclaimed, first
            page.goto(f"{console}/escalations")
            row = page.locator(f"#task-{task_id}")
            expect(row).to_contain_text("the signed W-2 for 2025")
            expect(row.locator("td.claimer")).to_have_text("nobody")
            ids = page.locator("table.inbox tbody tr").evaluate_all("rows => rows.map(r => r.id)")
            assert ids[-1] == f"task-{others[0]}"  # the claimed one last
            _screenshot(page, "escalations")

            # and claims it: htmx swaps the row in place
            row.get_by_role("button", name="Claim").click()
            expect(row.locator("td.claimer")).to_have_text(USER)
            expect(page.locator("#flash")).to_contain_text(f"Task {task_id} is yours")
            assert "done=" not in page.url  # no page load: the row was swapped

            # and resolves it with a result and a note
            row.locator("summary").click()
            resolve = row.locator("form.move-resolve")
            resolve.locator("textarea[name=result]").fill(
                json.dumps({"gross_pay": 4200, "w2": "received by phone"})
            )
            resolve.locator("input[name=note]").fill("client read the W-2 out on the phone")
            resolve.get_by_role("button", name="Resolve").click()
            expect(row).to_contain_text("completed")
            expect(page.locator("#flash")).to_contain_text(f"Task {task_id} resolved")

            # Then its page shows it completed, the result, and the timeline with both moves
            page.goto(f"{console}/tasks/{task_id}")
            expect(page.locator("h1")).to_contain_text("completed")
            expect(page.locator("pre.result")).to_contain_text('"gross_pay": 4200')
            events = page.locator("table.timeline tbody tr")
            expect(events).to_have_count(5)
            names = events.evaluate_all("rows => rows.map(r => r.className)")
            assert names == ["ev-assign", "ev-start", "ev-escalate", "ev-claim", "ev-resolve"]
            expect(page.locator("tr.ev-escalate")).to_contain_text("the signed W-2 for 2025")
            expect(page.locator("tr.ev-claim .actor")).to_have_text(USER)
            expect(page.locator("tr.ev-resolve .actor")).to_have_text(USER)
            expect(page.locator("tr.ev-start .actor")).not_to_have_text(USER)  # a worker
            expect(page.locator("tr.ev-resolve")).to_contain_text("escalated")
            expect(page.locator("tr.ev-resolve")).to_contain_text("client read the W-2 out")
            _screenshot(page, "task-timeline")

            page.goto(f"{console}/")
            expect(page.locator(".counts")).to_contain_text("completed")
            expect(page.locator("svg.chart rect.bar").first).to_be_visible()
            _screenshot(page, "overview")
            assert problems == [], problems
        finally:
            browser.close()

    # and the audit trail names the person for both moves
    history = api.history(task_id)
    assert [(e.event, e.actor) for e in history[-2:]] == [("claim", USER), ("resolve", USER)]
    assert api.get(task_id).result == {"gross_pay": 4200, "w2": "received by phone"}
