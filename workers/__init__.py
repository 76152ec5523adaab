"""The Celery edge of taskrail: the app, the hops and the sweeper.

``celery -A workers worker``, ``celery -A workers beat`` and ``celery -A workers flower``
find :data:`app` here.
"""

from workers import aio, hops, sweeper  # noqa: F401  (registers the hop tasks on app)
from workers.celery_app import app
from workers.flower_guard import guard_flower_command

aio.install(app)  # `--async-calls N`: the async executor (workers.aio)
guard_flower_command()  # `celery -A workers flower`: authentication required, localhost

__all__ = ["app"]
