"""The Celery app that ``celery -A workers`` finds (``workers.app``).

Configuration comes from :func:`orchestration.dispatch.celery_config`, the same the
producers use, read from the ``TASKRAIL_*`` environment when the worker starts.
"""

from __future__ import annotations

from celery import Celery, signals

from orchestration.dispatch import make_celery
from orchestration.logging import configure_logging
from orchestration.settings import get_settings


def create_app() -> Celery:
    settings = get_settings()
    app = make_celery(settings, main="taskrail")
    app.conf.update(
        include=["workers.hops", "workers.sweeper"],
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        beat_schedule={
            "taskrail-sweep": {
                "task": "taskrail.sweep",
                "schedule": settings.sweep_interval_s,
                "options": {"expires": settings.sweep_interval_s * 2},
            }
        },
    )
    from workers.events import BatchedEvents

    app.steps["consumer"].add(BatchedEvents)
    return app


@signals.setup_logging.connect
def _setup_logging(**_: object) -> None:
    # taskrail's structlog set-up replaces Celery's own logging configuration.
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


@signals.import_modules.connect
def _make_data_dir(**_: object) -> None:
    # Beat keeps its schedule file in TASKRAIL_DATA_DIR and does not create the folder.
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)


@signals.worker_ready.connect
def _announce_ready(sender: object = None, **_: object) -> None:
    from orchestration.logging import get_logger

    get_logger("taskrail.worker").info("worker_ready", node=getattr(sender, "hostname", None))


app = create_app()
