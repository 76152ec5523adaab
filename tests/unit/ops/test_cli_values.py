"""``taskrail show`` of a task whose payload, result and reasons hold NUL and surrogates
(text from PDFs): the table shows them escaped, ``--json`` gives them back exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestration import api
from orchestration.models import TaskStatus
from orchestration.settings import Settings
from orchestration.store.transitions import apply_transition
from tests.support import REPO, run_cli

ODD = "page\x00one \ud800 \udc80 \ue000"


def test_show_prints_odd_text_escaped_and_json_gives_it_back(
    embedded: Settings, tmp_path: Path
) -> None:
    # Given a failed task whose payload and reason hold NUL and lone surrogates
    task_id = api.submit("payroll", 1, {"text": ODD})
    db = api.client().db
    apply_transition(db, task_id, "assign", expected=TaskStatus.PENDING, agent="payroll_agent")
    apply_transition(db, task_id, "start", expected=TaskStatus.ASSIGNED)
    apply_transition(
        db, task_id, "fail", expected=TaskStatus.IN_PROGRESS, reason=ODD, set_={"last_error": ODD}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(TASKRAIL_AGENTS="demo_agents,tests.agents", PYTHONPATH=str(REPO))

    # When an operator shows it, as a table and as JSON
    table = run_cli(["show", str(task_id)], env, cwd=tmp_path)
    as_json = run_cli(["show", str(task_id), "--json"], env, cwd=tmp_path)

    # Then the table prints, with the odd characters written out
    assert table.returncode == 0, table.stderr
    assert "page\\x00one \\ud800 \\udc80" in table.stdout
    # and the JSON holds exactly what was given
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["task"]["payload"] == {"text": ODD}
    assert doc["task"]["last_error"] == ODD
    assert doc["history"][-1]["detail"] == ODD
