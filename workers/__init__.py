"""The Celery edge of taskrail: the app, the hops and the sweeper.

``celery -A workers worker``, ``celery -A workers beat`` and ``celery -A workers flower``
find :data:`app` here.
"""

from workers.celery_app import app
from workers import hops, sweeper  # noqa: E402,F401  (registers the hop tasks on app)

__all__ = ["app"]
