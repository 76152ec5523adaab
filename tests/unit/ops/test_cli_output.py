"""Stored text is shown as stored (issue 19.4), and secrets are masked in every form (19.9).

``taskrail show`` and ``taskrail breakers`` print payloads, reasons, task types, agent
names and breaker names literally: Rich markup in them is text, not style, and output
that is not a terminal never cuts an id, a name or a timestamp, even at COLUMNS=40.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.api import Taskrail
from orchestration.redact import names_secret, redact_text
from orchestration.settings import Settings
from orchestration.store.transitions import apply_transition
from tests.support import REPO, OwnRedis, run_cli

AGENTS = "demo_agents,tests.agents"
MARKUP = ["[/]", "[red]FAKE: status completed[/red]", "[bold", "[link=x]y[/link]", "\\[x]"]
# Printable text (a terminal shows control characters escaped), with markup mixed in.
stored_text = st.one_of(
    st.sampled_from(MARKUP),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
        min_size=1,
        max_size=60,
    ).map(lambda t: t.strip() or "x"),
).map(lambda t: t + "[/]")


def _env(cwd: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(TASKRAIL_AGENTS=AGENTS, PYTHONPATH=str(REPO), COLUMNS="40", TERM="dumb")
    env.update(extra)
    return env


def _seed(cwd: Path, texts: list[str]) -> list[int]:
    """One task per text, moved to in_progress, then given the text in every stored field."""
    db = cwd / ".taskrail" / "taskrail.db"
    trail = Taskrail(
        Settings(
            data_dir=cwd / ".taskrail",
            database_url=f"sqlite:///{db}",
            agents=AGENTS.split(","),
        )
    )
    ids = []
    try:
        for text in texts:
            task_id = trail.submit("payroll", 9_000_000_000_000_000_000, {"note": text})
            for event in ("assign", "start"):
                apply_transition(trail.db, task_id, event, agent="payroll_agent", reason=text)
            ids.append(task_id)
    finally:
        trail.close()
    con = sqlite3.connect(db)
    try:
        for task_id, text in zip(ids, texts, strict=True):
            con.execute(
                "UPDATE tasks SET task_type = ?, assigned_agent = ?, last_error = ? WHERE id = ?",
                (text, text, text, task_id),
            )
            con.execute(
                "UPDATE task_events SET agent = ?, worker = ? WHERE task_id = ?",
                (text, "agent:bookkeeping_agent@a-long-host-name.example", task_id),
            )
        con.commit()
    finally:
        con.close()
    return ids


def _event_times(cwd: Path, task_id: int) -> list[str]:
    trail = Taskrail(Settings(data_dir=cwd / ".taskrail", agents=AGENTS.split(",")))
    try:
        return [e.at.isoformat(timespec="milliseconds") for e in trail.history(task_id)]
    finally:
        trail.close()


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(stored_text, min_size=3, max_size=6))
def test_show_prints_stored_text_literally_and_whole(tmp_path: Path, texts: list[str]) -> None:
    # Given tasks whose payload, reasons, task type and agent hold markup and odd text
    cwd = tmp_path / f"c{abs(hash(tuple(texts)))}"
    cwd.mkdir()
    ids = _seed(cwd, texts)
    for task_id, text in zip(ids, texts, strict=True):
        # When `taskrail show` prints it into a pipe at COLUMNS=40
        done = run_cli(["show", str(task_id)], _env(cwd), cwd=cwd, timeout=60)
        # Then every stored text is there as stored, and nothing is cut
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert "…" not in done.stdout
        out = done.stdout
        assert out.count(text) >= 4, (text, out)  # task type, agent, last error, events
        assert json.dumps({"note": text}, ensure_ascii=False) in out
        assert "9000000000000000000" in out
        assert "agent:bookkeeping_agent@a-long-host-name.example" in out
        for stamp in _event_times(cwd, task_id):
            assert stamp in out, (stamp, out)


def test_breakers_prints_names_and_timestamps_whole(tmp_path: Path) -> None:
    # Given a breaker with markup in its name, open in a Redis of the test's own
    from orchestration.breakers import BreakerBoard

    redis = OwnRedis().start()
    try:
        board = BreakerBoard(redis.url, namespace="t")
        breaker = board.breaker("agent:[red]FAKE[/red] [/]", fail_max=1, reset_timeout_s=600)

        def fail() -> None:
            raise RuntimeError("down")

        with contextlib.suppress(RuntimeError):
            breaker.call(fail)
        board.close()
        env = _env(tmp_path, TASKRAIL_REDIS_URL=redis.url, TASKRAIL_BREAKER_NAMESPACE="t")
        # When `taskrail breakers` prints into a pipe at COLUMNS=40
        done = run_cli(["breakers"], env, cwd=tmp_path, timeout=60)
    finally:
        redis.stop()
    # Then the name is printed as stored, and the timestamps whole
    assert done.returncode == 0, done.stderr
    assert "agent:[red]FAKE[/red] [/]" in done.stdout
    assert "agent:bookkeeping_agent" in done.stdout
    assert "…" not in done.stdout
    assert "open" in done.stdout


# -- redaction: every form of a secret -----------------------------------------------------

PASSWORD = "p@ss:w0rd/Zq"
ESCAPED = "p%40ss%3Aw0rd%2FZq"


def test_every_url_form_of_a_password_is_masked() -> None:
    for text in (
        f"redis://:{PASSWORD.replace('/', '%2F')}@127.0.0.1:6379/1",  # unescaped @ and :
        f"redis://user:{ESCAPED}@127.0.0.1:6379/1",
        f"redis://127.0.0.1:6379/1?password={ESCAPED}",
        f"redis://127.0.0.1:6379/1?db=2&password={ESCAPED}&x=1",
        f"postgresql://bob@127.0.0.1/db?sslmode=disable&password={ESCAPED}",
        f"amqp://guest:{PASSWORD}@rabbit//",
        f"error at postgresql://bob:{PASSWORD}@db:5432/x: connection refused",
        f'{{"url":"redis://:{ESCAPED}@h/0","other":"u@x"}}',
        f"host=db user=bob password={PASSWORD} dbname=x",
        f"host=db password='{PASSWORD} more' dbname=x",
        f"https://h/x?token={ESCAPED}",
    ):
        masked = redact_text(text)
        assert "w0rd" not in masked and "Zq" not in masked, (text, masked)
        assert "***" in masked


def test_text_without_secrets_is_unchanged() -> None:
    for text in (
        "redis://127.0.0.1:6379/0",
        "postgresql://bob@db/x",
        "bypass=1 passport=2 a=b",
        "https://example.com/a@b",
        "[red]FAKE[/red] [/]",
    ):
        assert redact_text(text) == text


@given(st.text(max_size=200))
def test_redact_text_never_raises_and_is_idempotent(text: str) -> None:
    once = redact_text(text)
    assert redact_text(once) == once


def test_secret_looking_keys() -> None:
    for key in ("password", "db_password", "metrics_auth", "api-key", "TOKEN", "client_secret"):
        assert names_secret(key), key
    for key in ("task_id", "passport", "author", "event", "url"):
        assert not names_secret(key), key
