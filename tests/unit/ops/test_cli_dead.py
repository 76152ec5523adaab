"""``taskrail dead`` and ``taskrail dead purge``, run as the real console script.

On the embedded default (dead letters as files under ``.taskrail/broker/dead``) and on
a Redis broker of the module's own (the list ``<broker key prefix>taskrail.dead``),
each seeded with entries as the workers write them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orchestration import constants as c
from orchestration.messaging.deadletters import FileDeadLetters, RedisDeadLetters, make_entry
from tests.support import REPO, OwnRedis, free_port, run_cli

MARKUP = "[bold red]not markup[/] [link=http://x]y[/link]"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRAIL_")}
    env.update(TASKRAIL_AGENTS="demo_agents", PYTHONPATH=str(REPO), COLUMNS="200", **extra)
    return env


def seed(store: FileDeadLetters | RedisDeadLetters) -> None:
    store.add(make_entry("taskrail.hops", "not JSON", b"garbage", "host:1"))
    store.add(make_entry("taskrail.execute", f"unregistered task {MARKUP!r}", MARKUP.encode()))
    store.add(make_entry("taskrail.control", "not JSON (not UTF-8 text)", b"\xff\x1b[31m"))


def test_dead_on_the_embedded_default_lists_and_purges(tmp_path: Path) -> None:
    # Given three dead letters in the embedded broker's folder
    seed(FileDeadLetters(tmp_path / c.DEFAULT_DATA_DIR / "broker" / c.DEAD_LETTER_FOLDER))
    env = cli_env()
    # When they are listed as JSON
    listed = run_cli(["dead", "--json"], env=env, cwd=tmp_path)
    # Then they come newest first, as stored
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [e["queue"] for e in entries] == [
        "taskrail.control",
        "taskrail.execute",
        "taskrail.hops",
    ]
    assert entries[1]["raw"] == MARKUP
    assert entries[0]["encoding"] == "base64"
    limited = run_cli(["dead", "--json", "--limit", "1"], env=env, cwd=tmp_path)
    assert [e["queue"] for e in json.loads(limited.stdout)] == ["taskrail.control"]
    # and as a table: when, queue, reason, excerpt, the stored text printed literally
    table = run_cli(["dead"], env=env, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    for column in ("when", "queue", "reason", "excerpt"):
        assert column in table.stdout
    assert MARKUP in table.stdout  # Rich markup shown, not interpreted
    assert "garbage" in table.stdout and "base64:" in table.stdout
    assert "\x1b" not in table.stdout
    # When they are purged, the count is printed and none are left
    purged = run_cli(["dead", "purge"], env=env, cwd=tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert "purged 3 dead letters" in purged.stdout
    assert json.loads(run_cli(["dead", "--json"], env=env, cwd=tmp_path).stdout) == []
    assert "no dead letters" in run_cli(["dead"], env=env, cwd=tmp_path).stdout
    again = run_cli(["dead", "purge", "--json"], env=env, cwd=tmp_path)
    assert json.loads(again.stdout) == {"purged": 0}


@pytest.fixture(scope="module")
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis().start()
    yield server
    server.stop()


def test_dead_on_a_redis_broker_reads_the_list_under_the_key_prefix(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    # Given dead letters of two deployments on one Redis, told apart by their key prefix
    url = own_redis.url
    client = redis.Redis.from_url(url)
    seed(RedisDeadLetters(client, "a:" + c.DEAD_LETTER_KEY))
    RedisDeadLetters(client, "b:" + c.DEAD_LETTER_KEY).add(make_entry("q", "other", b"x"))
    env = cli_env(TASKRAIL_BROKER_URL=url, TASKRAIL_BROKER_KEY_PREFIX="a:")
    # When deployment a lists and purges its own
    listed = run_cli(["dead", "--json"], env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 3
    table = run_cli(["dead"], env=env, cwd=tmp_path)
    assert "a:taskrail.dead" in table.stdout and MARKUP in table.stdout
    purged = run_cli(["dead", "purge", "--json"], env=env, cwd=tmp_path)
    assert json.loads(purged.stdout) == {"purged": 3}
    # Then deployment b's are untouched
    assert client.llen("a:" + c.DEAD_LETTER_KEY) == 0
    assert client.llen("b:" + c.DEAD_LETTER_KEY) == 1


def test_dead_with_the_broker_down_is_one_line_without_the_password(tmp_path: Path) -> None:
    env = cli_env(TASKRAIL_BROKER_URL=f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    for args in (["dead"], ["dead", "--json"], ["dead", "purge"]):
        done = run_cli(args, env=env, cwd=tmp_path, timeout=60)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert "unreachable" in lines[0]
        assert "s3cret" not in done.stderr
