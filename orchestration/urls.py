"""The URLs of the settings: checked once at the edge, and where the embedded broker lives.

The checks raise ``ValueError`` (pydantic turns it into a validation error naming the
``TASKRAIL_*`` variable) with a message that never repeats the URL: it may hold a
password.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from orchestration.redact import redact_url

DATABASE_BACKENDS = ("postgresql", "sqlite")
DATABASE_DRIVERS = {"postgresql": ("psycopg",), "sqlite": ("pysqlite",)}
REDIS_SCHEMES = ("redis", "rediss", "unix")
EMBEDDED_BROKER_FOLDER = "broker"


def _scheme(url: str, what: str) -> str:
    scheme, sep, _rest = url.partition("://")
    if not sep or not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ValueError(f"not a URL: expected scheme://..., e.g. {what}")
    return scheme.lower()


def _check_port(url: str) -> None:
    try:
        port = urlsplit(url).port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("the port is not a number from 1 to 65535")


def check_database_url(url: str) -> str:
    """``url`` if taskrail can use it: PostgreSQL (psycopg 3) or SQLite, a valid port."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    scheme = _scheme(url, "postgresql://user@host:5432/taskrail")
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg"
    backend, _, driver = scheme.partition("+")
    if backend not in DATABASE_BACKENDS:
        raise ValueError(
            f"unsupported database {backend!r}: taskrail runs on postgresql:// or sqlite:///"
        )
    if driver and driver not in DATABASE_DRIVERS[backend]:
        raise ValueError(
            f"unsupported driver {driver!r}: use {backend}:// "
            f"or {backend}+{DATABASE_DRIVERS[backend][0]}://"
        )
    if backend == "postgresql":
        _check_port(url)
    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError("not a database URL that SQLAlchemy can read") from None
    return url


# kombu's transport names (kombu.transport.TRANSPORT_ALIASES; a test keeps them equal)
# and taskrail's own: the domain does not import the transport to check a URL.
TRANSPORT_ALIASES = frozenset(
    {
        "SLMQ", "SQS", "amqp", "amqps", "azureservicebus", "azurestoragequeues",
        "confluentkafka", "consul", "etcd", "filesystem", "gcpubsub", "kafka", "librabbitmq",
        "memory", "mongodb", "pgmq", "pyamqp", "pyro", "qpid", "redis", "rediss", "sentinel",
        "slmq", "sqla", "sqlalchemy", "sqs", "zookeeper", "taskrail-redis", "taskrailfs",
    }
)  # fmt: skip


def check_broker_url(url: str) -> str:
    """``url`` if it names a transport Celery knows, each failover URL with a valid port."""
    for part in url.split(";"):
        scheme = _scheme(part.strip(), "redis://host:6379/0 or amqp://user@host//")
        base = scheme.partition("+")[0]
        if base not in TRANSPORT_ALIASES and scheme not in TRANSPORT_ALIASES:
            raise ValueError(f"unknown broker transport {scheme!r}; e.g. redis:// or amqp://")
        _check_port(part.strip())
    return url


def check_redis_url(url: str) -> str:
    """``url`` if it is a Redis URL with a valid port."""
    scheme = _scheme(url, "redis://host:6379/1")
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}: use redis://, rediss:// or unix://")
    _check_port(url)
    return url


def password_in_userinfo(url: str) -> str:
    """``url`` with a ``?password=`` query parameter moved into its user information.

    kombu reads the password from either place and fails with both (a ``TypeError``);
    the user-information form is the one every client reads.
    """
    if "password=" not in url:
        return url
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    passwords = [value for key, value in query if key == "password"]
    if not passwords:
        return url
    kept = urlencode([(key, value) for key, value in query if key != "password"])
    userinfo, at, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    netloc = f"{user}:{quote(passwords[-1], safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, kept, parts.fragment))


def embedded_broker_folder(data_dir: Path, database_url: str | None) -> Path:
    """Where the embedded (file-system) broker keeps its queues: beside the database.

    The default database (``data_dir/taskrail.db``) has ``data_dir/broker``; a SQLite file
    elsewhere has ``<file>.broker`` beside it; any other database a folder in ``data_dir``
    named after its URL (password masked). Two deployments with two databases never
    share a queue, so a worker never takes the other's messages.
    """
    if not database_url:
        return data_dir / EMBEDDED_BROKER_FOLDER
    if database_url.startswith("sqlite") and ":///" in database_url:
        path = database_url.split(":///", 1)[1].split("?", 1)[0]
        if path and path != ":memory:":
            file = Path(path)
            if file.resolve() == (data_dir / "taskrail.db").resolve():
                return data_dir / EMBEDDED_BROKER_FOLDER
            return file.with_name(file.name + "." + EMBEDDED_BROKER_FOLDER)
    digest = hashlib.sha256(redact_url(database_url).encode()).hexdigest()[:12]
    return data_dir / f"{EMBEDDED_BROKER_FOLDER}-{digest}"
