"""structlog and stdlib logging as ``configure_logging`` sets them up: format and redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from orchestration.logging import configure_logging, get_logger
from orchestration.settings import Settings

SECRET = "s3cret-Pa55"
PG_URL = f"postgresql://bob:{SECRET}@db.internal:5432/taskrail"
REDIS_URL = f"redis://:{SECRET}@cache.internal:6379/9"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def configured() -> Iterator[Any]:
    """Calls configure_logging(stream=...) for the test and undoes it afterwards."""
    root = logging.getLogger()
    level = root.level

    def configure(
        fmt: str = "auto", level: str = "INFO", stream: io.StringIO | None = None
    ) -> io.StringIO:
        stream = stream if stream is not None else io.StringIO()
        configure_logging(fmt, level, stream)
        return stream

    yield configure
    for handler in list(root.handlers):
        if getattr(handler, "_taskrail", False):
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# -- format -----------------------------------------------------------------------------


def test_writes_json_lines_when_the_stream_is_not_a_terminal(configured: Any) -> None:
    stream = configured()

    get_logger("taskrail.test").info("task_transition", task_id=7, to_status="assigned")
    get_logger("taskrail.test").warning("breaker_opened", breaker="agent:payroll_agent")

    first, second = json_lines(stream)
    assert first["event"] == "task_transition"
    assert (first["task_id"], first["to_status"], first["level"]) == (7, "assigned", "info")
    assert first["timestamp"].endswith("Z")  # ISO, UTC
    assert (second["event"], second["level"], second["breaker"]) == (
        "breaker_opened",
        "warning",
        "agent:payroll_agent",
    )


def test_writes_console_lines_on_a_terminal(configured: Any) -> None:
    stream = configured(stream=_Terminal())

    get_logger().info("task_transition", task_id=7)

    line = stream.getvalue().strip()
    assert "task_transition" in line
    assert "task_id=7" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_json_can_be_forced_on_a_terminal(configured: Any) -> None:
    stream = configured("json", stream=_Terminal())

    get_logger().info("hello", n=1)

    assert json_lines(stream)[0]["n"] == 1


def test_level_filters_structlog_events(configured: Any) -> None:
    stream = configured(level="WARNING")

    get_logger().info("not_shown")
    get_logger().warning("shown")

    assert [e["event"] for e in json_lines(stream)] == ["shown"]


def test_configuring_twice_keeps_one_stdlib_handler(configured: Any) -> None:
    configured()
    stream = configured()

    logging.getLogger("kombu").warning("once")

    assert stream.getvalue().count("once") == 1


# -- redaction: structlog ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_url_with_password_in_a_field_is_masked(configured: Any, fmt: str) -> None:
    stream = configured(fmt)

    get_logger().info("connecting", database_url=PG_URL, broker=REDIS_URL)

    out = stream.getvalue()
    assert SECRET not in out
    assert "postgresql://bob:***@db.internal:5432/taskrail" in out
    assert "redis://:***@cache.internal:6379/9" in out


def test_url_with_password_in_the_event_text_is_masked(configured: Any) -> None:
    stream = configured()

    get_logger().warning("cannot reach %s", PG_URL)
    get_logger().warning(f"cannot reach {REDIS_URL}")

    out = stream.getvalue()
    assert SECRET not in out
    assert out.count("***@") == 2


def test_exception_message_with_a_password_is_masked(configured: Any) -> None:
    # Given an exception whose message carries a URL with a password
    stream = configured()
    log = get_logger()
    try:
        raise ConnectionError(f"could not connect to {PG_URL}")
    except ConnectionError as err:
        # When it is logged with its traceback, and as a field
        log.exception("database_down")
        log.error("database_down", error=err)

    # Then neither line shows the password, yet both keep the rest of the message
    logged_tb, logged_field = json_lines(stream)
    assert SECRET not in stream.getvalue()
    assert "Traceback" in logged_tb["exception"]
    assert "could not connect to postgresql://bob:***@db.internal" in logged_tb["exception"]
    assert (
        logged_field["error"]
        == "could not connect to postgresql://bob:***@db.internal:5432/taskrail"
    )


@pytest.mark.parametrize("key", ["password", "PASSWORD", "passwd", "secret", "token", "api_key"])
def test_secret_named_fields_are_masked(configured: Any, key: str) -> None:
    stream = configured()

    get_logger().info("login", user="bob", **{key: SECRET})

    [event] = json_lines(stream)
    assert event[key] == "***"
    assert event["user"] == "bob"
    assert SECRET not in stream.getvalue()


def test_password_field_on_a_bound_logger_is_masked(configured: Any) -> None:
    stream = configured()

    get_logger().bind(password=SECRET).info("bound")

    assert SECRET not in stream.getvalue()
    assert json_lines(stream)[0]["password"] == "***"


def test_urls_inside_containers_and_reprs_are_masked(configured: Any) -> None:
    stream = configured()
    settings = Settings(database_url=PG_URL, redis_url=REDIS_URL)

    get_logger().info("config", urls=[PG_URL], nested={"broker": {"url": REDIS_URL}})
    get_logger().info("settings", settings=settings)

    assert SECRET not in stream.getvalue()
    assert len(json_lines(stream)) == 2


def test_settings_describe_masks_every_url() -> None:
    settings = Settings(database_url=PG_URL, broker_url=REDIS_URL, redis_url=REDIS_URL)

    described = settings.describe()

    assert SECRET not in json.dumps(described)
    assert described["database_url"] == "postgresql+psycopg://bob:***@db.internal:5432/taskrail"


# -- redaction: stdlib ----------------------------------------------------------------------------


def test_stdlib_records_with_a_url_are_masked(configured: Any) -> None:
    stream = configured()

    logging.getLogger("x").warning("broker at %s", REDIS_URL)
    logging.getLogger("celery.worker").error("database %s refused", PG_URL)

    out = stream.getvalue()
    assert SECRET not in out
    assert "WARNING x: broker at redis://:***@cache.internal:6379/9" in out
    assert "postgresql://bob:***@db.internal" in out


def test_stdlib_exception_tracebacks_are_masked(configured: Any) -> None:
    stream = configured()

    try:
        raise OSError(f"lost {REDIS_URL}")
    except OSError:
        logging.getLogger("kombu").exception("connection lost")

    out = stream.getvalue()
    assert "Traceback" in out
    assert "lost redis://:***@cache.internal:6379/9" in out
    assert SECRET not in out


def test_stdlib_below_warning_is_not_written(configured: Any) -> None:
    stream = configured()

    logging.getLogger("x").info("chatty %s", PG_URL)

    assert stream.getvalue() == ""


def test_redact_fields_masks_in_place_what_redact_value_masks() -> None:
    from orchestration.redact import redact_fields, redact_value

    fields: dict[str, Any] = {
        "Authorization": "Bearer abc",
        "token": None,  # nothing to hide
        "url": PG_URL,
        "plain": "no url here",
        "error": ConnectionError(f"cannot reach {REDIS_URL}"),
        "n": 3,
        "flag": True,
    }
    expected = {k: redact_value(k, v) for k, v in fields.items()}

    out = redact_fields(fields)

    assert out is fields
    assert fields == expected
    assert fields["Authorization"] == "***"
    assert fields["token"] is None
    assert SECRET not in repr(fields)
